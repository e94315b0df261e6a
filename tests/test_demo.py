"""demo.py: the CPU demo's problems, tokenizer, token roles, checkpoint build and warm-up, and the
controls trained end to end on it.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

import demo
import train
from conftest import parity_reward
from math_reward import math_reward
from model import Qwen3, load_tokenizer
from sampling import generate

DEMO_TARGET_ACCURACY = demo.WARMUP["target_accuracy"]


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    """A demo checkpoint built with a short warm-up that learns the layout, not yet the sums (the full one
    takes a minute)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(demo.WARMUP, "target_accuracy", 0.02)
        yield demo.build_demo_checkpoint(tmp_path_factory.mktemp("demo") / "demo-qwen3")


@pytest.fixture
def quick_recipe(monkeypatch):
    """The warm-up stops at its first check (5 steps): a build in about a second."""
    monkeypatch.setitem(demo.WARMUP, "target_accuracy", 0.0)


def test_splits_are_disjoint_and_cover_every_pair():
    train = demo.demo_problems("train", 7100, seed=0)
    test = demo.demo_problems("test", 1000, seed=0)
    train_texts, test_texts = {p["problem"] for p in train}, {p["problem"] for p in test}
    assert len(train_texts) == 7100 and len(test_texts) == 1000
    assert not train_texts & test_texts
    assert len(train_texts | test_texts) == len(demo.OPERANDS) ** 2 == 8100


def test_problems_are_seeded_samples_of_their_split():
    assert demo.demo_problems("train", 50, seed=3) == demo.demo_problems("train", 50, seed=3)
    assert demo.demo_problems("train", 50, seed=3) != demo.demo_problems("train", 50, seed=4)
    for p in demo.demo_problems("test", 100, seed=1):
        a, b = p["problem"].removesuffix("=").split("+")
        assert int(p["answer"]) == int(a) + int(b)
    with pytest.raises(ValueError, match="split 'valid'"):
        demo.demo_problems("valid", 10, seed=0)
    with pytest.raises(ValueError, match="count 1001"):
        demo.demo_problems("test", 1001, seed=0)


def test_gold_answers_score_one_and_wrong_answers_zero():
    assert demo.completion_text("47+85=") == "7+5=12,4+8+1=13,\\boxed{132}"
    assert demo.completion_text("23+45=") == "3+5=08,2+4+0=06,\\boxed{68}"
    for p in demo.demo_problems("test", 200, seed=0):
        a, b = (int(x) for x in p["problem"].removesuffix("=").split("+"))
        assert math_reward(demo.completion_text(p["problem"]), p["answer"]) == 1.0
        assert math_reward(demo.completion_text(p["problem"]).replace(f"{{{a + b}}}", f"{{{a + b + 1}}}"),
                           p["answer"]) == 0.0
    assert math_reward("7+5=12,4+8+1=13,", "132") == 0.0  # no \boxed{}: no reward


def test_token_roles_mark_the_column_sums():
    """Computed: the two digits of each column's sum; copies (operand digits, the carry, the answer) and
    format are not. A completion out of the layout (cut short, a wrong separator, junk after the box) is
    not parsed."""
    tokenizer = demo.build_tokenizer()
    pieces = lambda text: [tokenizer.decode([i]) for i in tokenizer.encode(text).ids] + [demo.EOS]
    completion = pieces(demo.completion_text("47+85="))  # 7 + 5 = 1 2 , 4 + 8 + 1 = 1 3 , \boxed{ 1 3 2 } EOS
    roles = demo.token_roles("47+85=", completion)
    assert len(roles) == len(completion) == 22
    assert [i for i, computed in enumerate(roles) if computed] == [4, 5, 13, 14]
    # truncated just before EOS: still parsed
    assert demo.token_roles("47+85=", completion[:-1]) == roles[:-1]
    # the arithmetic is wrong, the layout is not: the same roles
    wrong_sums = pieces("7+5=13,4+8+1=99,\\boxed{932}")
    assert demo.token_roles("47+85=", wrong_sums) == roles
    for broken in (completion[:10], completion[:4] + ["+"] + completion[5:],
                   completion[:-1] + ["7", demo.EOS], pieces("\\boxed{132}")):
        assert demo.token_roles("47+85=", broken) is None


def test_tokenizer_round_trips_every_problem_and_completion(demo_checkpoint):
    tokenizer = load_tokenizer(demo_checkpoint)
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 0
    assert tokenizer.vocab_size == len(demo.VOCAB)
    problems = demo.demo_problems("train", 7100, seed=0) + demo.demo_problems("test", 1000, seed=0)
    texts = [demo.DEMO_PROMPT_TEMPLATE.format(problem=p["problem"]) + demo.completion_text(p["problem"])
             + demo.EOS
             for p in problems]
    for text, encoding in zip(texts, tokenizer.tokenizer.encode_batch(texts, add_special_tokens=False)):
        assert tokenizer.decode(encoding.ids) == text
        assert encoding.ids[-1] == tokenizer.eos_token_id
        assert encoding.ids.count(tokenizer.tokenizer.token_to_id(demo.BOXED)) == 1  # \boxed{ is one token
    completions = [len(tokenizer.encode(demo.completion_text(p["problem"]))) + 1 for p in problems]
    # with EOS
    assert min(completions) == 21 and max(completions) == 22 and sum(completions) / len(completions) > 21
    assert train.DEMO.max_new_tokens >= max(completions)  # the demo's length limit fits every completion
    prompts = [len(tokenizer.encode(p["problem"])) for p in problems]
    # and the model's positions
    assert max(prompts) + train.DEMO.max_new_tokens <= demo.MODEL["max_position_embeddings"]
    with pytest.raises(Exception, match="UNK|unk"):
        tokenizer.encode("12/4=")  # a character outside the task is an error, not a silent token


def test_checkpoint_loads_like_a_real_one(demo_checkpoint):
    config = json.loads((demo_checkpoint / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["eos_token_id"] == 0 and config["tie_word_embeddings"]
    model = Qwen3.from_pretrained(demo_checkpoint)
    assert model.lm_head.weight.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.hidden_size == demo.MODEL["hidden_size"]
    assert model.config.num_hidden_layers == demo.MODEL["num_hidden_layers"]
    # the staging directory is gone
    assert not list(demo_checkpoint.parent.glob(f".{demo_checkpoint.name}.building-*"))


def test_warm_up_leaves_the_model_neither_hopeless_nor_perfect(tmp_path, monkeypatch):
    # the real recipe, whatever fixtures patched
    monkeypatch.setitem(demo.WARMUP, "target_accuracy", DEMO_TARGET_ACCURACY)
    checkpoint = demo.build_demo_checkpoint(tmp_path / "demo-qwen3")  # the full warm-up: 10-20 s
    model, tokenizer = Qwen3.from_pretrained(checkpoint), load_tokenizer(checkpoint)
    problems = demo.demo_problems("test", 400, seed=0)
    prompts = [tokenizer.encode(demo.DEMO_PROMPT_TEMPLATE.format(problem=p["problem"])) for p in problems]
    tokens, mask = generate(model, prompts, train.DEMO.max_new_tokens, temperature=0.0, top_p=1.0,
                            eos_token_id=tokenizer.eos_token_id)
    completions = [row[valid].tolist() for row, valid in zip(tokens, mask)]
    accuracy = sum(math_reward(tokenizer.decode(ids),
                               p["answer"]) for ids, p in zip(completions, problems)) / len(problems)
    assert 0.1 <= accuracy <= 0.6
    well_formed = [demo.token_roles(p["problem"], [tokenizer.decode([i]) for i in ids]) is not None
                   for ids, p in zip(completions, problems)]
    # the layout is learnt; the column sums are what is left to learn
    assert sum(well_formed) / len(completions) > 0.95


@pytest.mark.parametrize("credit", ["arca-shuffled", "entropy-top20"])
def test_the_controls_train_end_to_end_and_every_signal_finds_the_computed_tokens(demo_checkpoint, tmp_path,
                                                                                   credit, monkeypatch):
    """Each control trains a demo run (the adapter moves), and every step of a demo run logs every
    method's Gini and computed_mass (its weight's share on the column sums of the completions token_roles
    parses)."""
    # a reward earned half the time: every step has a gradient
    monkeypatch.setattr(train, "score", parity_reward)
    out = tmp_path / credit
    train.main(["--preset", "demo", "--model", str(demo_checkpoint), "--out", str(out), "--credit", credit,
                "--steps", "2", "--eval-every", "2", "--eval-problems", "8", "--prompts-per-micro-batch", "4",
                "--group-size", "4", "--lr", "1e-3", "--warmup-steps", "0"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in metrics:
        for method in ("uniform", "surprisal", "entropy", "divergence", "arca", "arca-shuffled",
                       "entropy-top20"):
            assert 0 <= row[f"gini/{method}"] < 1 and 0 <= row[f"computed_mass/{method}"] <= 1, (method, row)
        assert row["unparsed_completions"] <= 16
        assert 0.1 < row["computed_mass/uniform"] < 0.25  # 4 of the 21 or 22 tokens
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)
    report = train.report([out])
    assert "arca-shuffled" in report and "entropy-top20" in report


def test_cached_checkpoint_is_reused(demo_checkpoint):
    weights = demo_checkpoint / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert demo.build_demo_checkpoint(demo_checkpoint) == demo_checkpoint
    assert weights.stat().st_mtime_ns == before


def test_build_is_deterministic_given_the_seed(tmp_path, quick_recipe):
    rng_before = torch.get_rng_state()
    first = demo.build_demo_checkpoint(tmp_path / "a", seed=5)
    assert torch.equal(torch.get_rng_state(), rng_before)  # its own generator; the global RNG is untouched
    second = demo.build_demo_checkpoint(tmp_path / "b", seed=5)
    other = demo.build_demo_checkpoint(tmp_path / "c", seed=6)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()


def test_build_runs_on_one_thread_whatever_the_machine_has(tmp_path, quick_recipe, monkeypatch):
    threads_seen = []
    real_warm_up = demo.warm_up
    monkeypatch.setattr(demo, "warm_up",
                        lambda *args: (threads_seen.append(torch.get_num_threads()), real_warm_up(*args))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = demo.build_demo_checkpoint(tmp_path / "two", seed=3)
        torch.set_num_threads(1)
        one = demo.build_demo_checkpoint(tmp_path / "one", seed=3)
        assert torch.get_num_threads() == 1  # restored
    finally:
        torch.set_num_threads(before)
    assert threads_seen == [1, 1]
    assert (two / "model.safetensors").read_bytes() == (one / "model.safetensors").read_bytes()


def test_stale_or_incomplete_checkpoint_is_rebuilt(tmp_path, quick_recipe):
    directory = demo.build_demo_checkpoint(tmp_path / "demo", seed=0)
    weights = directory / "model.safetensors"
    assert demo.is_built(directory, seed=0) and not demo.is_built(directory, seed=1)
    recipe = json.loads((directory / "recipe.json").read_text())
    (directory / "recipe.json").write_text(json.dumps({**recipe, "hash": "an older recipe"}))
    assert not demo.is_built(directory, seed=0)
    before = weights.stat().st_mtime_ns
    demo.build_demo_checkpoint(directory, seed=0)
    assert demo.is_built(directory, seed=0) and weights.stat().st_mtime_ns != before
    weights.unlink()  # an interrupted copy by hand, say
    assert not demo.is_built(directory, seed=0)
    demo.build_demo_checkpoint(directory, seed=0)
    assert demo.is_built(directory, seed=0)
