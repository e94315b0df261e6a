"""The tests of arca. CPU only, nothing downloaded: tiny random Qwen3 checkpoints are built with
transformers (the oracle) and saved as safetensors; tests that read ../shared skip without it.

Run: python -m pytest -q
"""

import json
from pathlib import Path

import pytest
import torch
import transformers

from model import Qwen3, Qwen3Config, apply_rotary, generate, load_tokenizer, rotary_cos_sin, sample_next_token

SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"

# ================================================================================================
# Shared fixtures: tiny random Qwen3 checkpoints saved by transformers


def tiny_hf_config(**overrides):
    settings = dict(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, rope_theta=10000.0,
        tie_word_embeddings=True, eos_token_id=1, bos_token_id=1, pad_token_id=1,
        initializer_range=0.2,  # large enough that a wrong formula moves the logits well past 1e-4
    )
    settings.update(overrides)
    return transformers.Qwen3Config(**settings)


def save_tiny_checkpoint(directory, seed=0, max_shard_size=None, **overrides):
    """A random transformers Qwen3ForCausalLM saved as safetensors; returns (directory, hf_model)."""
    torch.manual_seed(seed)
    hf_model = transformers.Qwen3ForCausalLM(tiny_hf_config(**overrides)).eval()
    with torch.no_grad():  # norms start at 1: randomise them so a mixed-up norm cannot pass
        for name, param in hf_model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    hf_model.save_pretrained(directory, **kwargs)
    return Path(directory), hf_model


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def left_padded(prompts, pad=0):
    """input_ids and attention_mask (B, T) for a list of token lists, padded on the left."""
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


# ================================================================================================
# model.py: parity with transformers


@pytest.mark.parametrize(
    "name, overrides, shard",
    [
        ("tied", {}, None),
        ("untied", {"tie_word_embeddings": False}, None),
        ("wide-heads", {"num_attention_heads": 8, "head_dim": 16}, None),  # 8 * 16 = 128 != hidden 32
        ("tied-sharded", {}, "20KB"),
        ("untied-sharded", {"tie_word_embeddings": False}, "20KB"),
    ],
)
def test_logits_match_transformers(tmp_path, name, overrides, shard):
    directory, hf_model = save_tiny_checkpoint(tmp_path, max_shard_size=shard, **overrides)
    if shard:
        assert (directory / "model.safetensors.index.json").exists()
    model = Qwen3.from_pretrained(directory, dtype=torch.float32)
    prompts = [[5, 9, 2, 7, 3, 8], [4, 11, 6], [13]]
    ids, mask = left_padded(prompts)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model.lm_head(model(ids, attention_mask=mask))
        theirs = hf_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        unpadded = [model.lm_head(model(torch.tensor([p])))[0] for p in prompts]
    real = mask.bool()
    max_diff = (ours[real] - theirs[real]).abs().max().item()
    print(f"{name}: max |logit diff| vs transformers = {max_diff:.2e}")
    assert max_diff < 1e-4
    for row, prompt in enumerate(prompts):  # a padded row equals its unpadded sequence
        torch.testing.assert_close(ours[row, -len(prompt):], unpadded[row], atol=1e-5, rtol=1e-5)


def test_rope_matches_transformers():
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding, apply_rotary_pos_emb

    config = tiny_hf_config(head_dim=16)
    positions = torch.tensor([[0, 1, 2, 3, 40], [7, 8, 9, 10, 200]])
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
    cos_ref, sin_ref = Qwen3RotaryEmbedding(config)(q, positions)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos_ref, sin_ref)
    cos, sin = rotary_cos_sin(positions, 16, config.rope_parameters["rope_theta"], torch.float32)
    torch.testing.assert_close(apply_rotary(q, cos, sin), q_ref)
    torch.testing.assert_close(apply_rotary(k, cos, sin), k_ref)


def test_config_reads_head_dim_and_both_config_styles(tmp_path):
    official = {  # Qwen3-0.6B-Base's config.json (transformers 4 style): q is wider than hidden
        "model_type": "qwen3", "hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 128, "intermediate_size": 3072, "num_hidden_layers": 28, "rope_theta": 1000000,
        "rope_scaling": None, "torch_dtype": "bfloat16", "tie_word_embeddings": True, "vocab_size": 151936,
    }
    (tmp_path / "config.json").write_text(json.dumps(official))
    config = Qwen3Config.from_json(tmp_path / "config.json")
    assert (config.head_dim, config.hidden_size, config.rope_theta) == (128, 1024, 1000000)
    with torch.device("meta"):
        model = Qwen3(config)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (2048, 1024)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    new_style = dict(official, rope_parameters={"rope_type": "default", "rope_theta": 5.0}, dtype="float32")
    del new_style["rope_theta"], new_style["torch_dtype"]
    (tmp_path / "config.json").write_text(json.dumps(new_style))
    config = Qwen3Config.from_json(tmp_path / "config.json")
    assert (config.rope_theta, config.torch_dtype) == (5.0, "float32")


# ================================================================================================
# model.py: KV cache and sampling


def test_kv_cache_decoding_equals_full_forward(tiny_checkpoint):
    directory, hf_model = tiny_checkpoint
    model = Qwen3.from_pretrained(directory, dtype=torch.float32)
    prompts = [[5, 9, 2, 7], [4, 11]]
    tokens, mask = generate(model, prompts, 12, temperature=0, top_p=1.0, eos_token_id=1)
    for row, prompt in enumerate(prompts):
        completion = tokens[row][mask[row]].tolist()
        full = torch.tensor([prompt + completion])
        with torch.no_grad():
            greedy = model.lm_head(model(full)).argmax(-1)[0]  # (T,)
        # each generated token is the argmax of the full forward at the position before it
        assert greedy[len(prompt) - 1 : len(prompt) - 1 + len(completion)].tolist() == completion


def test_batch_equals_each_prompt_alone(tiny_checkpoint):
    model = Qwen3.from_pretrained(tiny_checkpoint[0], dtype=torch.float32)
    prompts = [[5, 9, 2, 7, 3], [4, 11], [13, 14, 15]]
    tokens, mask = generate(model, prompts, 16, temperature=0, top_p=1.0, eos_token_id=1)
    for row, prompt in enumerate(prompts):
        alone, alone_mask = generate(model, [prompt], 16, temperature=0, top_p=1.0, eos_token_id=1)
        assert tokens[row][mask[row]].tolist() == alone[0][alone_mask[0]].tolist()


def test_greedy_generate_matches_transformers(tmp_path):
    directory, hf_model = save_tiny_checkpoint(tmp_path, seed=3, vocab_size=64)
    model = Qwen3.from_pretrained(directory, dtype=torch.float32)
    prompts = [[5, 9, 2, 7, 3, 8], [4, 11, 6]]
    tokens, mask = generate(model, prompts, 40, temperature=0, top_p=1.0, eos_token_id=1)
    ids, attention = left_padded(prompts, pad=1)
    reference = hf_model.generate(
        input_ids=ids, attention_mask=attention, max_new_tokens=40, do_sample=False, eos_token_id=1, pad_token_id=1
    )[:, ids.shape[1] :]
    assert mask.sum() >= 32 or (tokens == 1).any()  # long enough to mean something
    for row in range(len(prompts)):
        ours = tokens[row][mask[row]].tolist()
        assert ours == reference[row, : len(ours)].tolist()
        assert len(ours) == 40 or ours[-1] == 1


def test_sampling_is_seeded_and_respects_max_tokens(tiny_checkpoint):
    model = Qwen3.from_pretrained(tiny_checkpoint[0], dtype=torch.float32)
    prompts = [[5, 9, 2]] * 8

    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        return generate(model, prompts, 10, temperature=1.0, top_p=0.95, eos_token_id=[], generator=g)

    (a, mask_a), (b, _), (c, _) = sample(0), sample(0), sample(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (8, 10) and mask_a.all()  # no EOS: exactly max_new_tokens
    assert len(set(a[:, 0].tolist())) > 1  # the samples of one prompt do not share their first token


def test_mask_stops_at_first_eos(tiny_checkpoint):
    model = Qwen3.from_pretrained(tiny_checkpoint[0], dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    tokens, mask, logprobs = generate(model, [[5, 9]] * 16, 20, temperature=2.0, top_p=1.0,
                                      eos_token_id=[1, 2, 3, 4, 5, 6], generator=g, return_logprobs=True)
    eos = torch.isin(tokens, torch.tensor([1, 2, 3, 4, 5, 6]))
    assert eos.any()
    for row in range(16):
        length = int(mask[row].sum())
        assert mask[row, :length].all() and not mask[row, length:].any()  # a prefix
        first_eos = eos[row].nonzero()
        if len(first_eos):
            assert length == first_eos[0].item() + 1  # up to and including the first EOS
    assert (logprobs[mask] < 0).all() and (logprobs[~mask] == 0).all()


def test_top_p_keeps_exactly_the_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    for top_p, nucleus in [(0.4, {1}), (0.6, {1, 3}), (0.9, {1, 3, 2}), (1.0, {0, 1, 2, 3})]:
        drawn = set(sample_next_token(logits, 1.0, top_p, g).tolist())
        assert drawn == nucleus, (top_p, drawn)
    assert sample_next_token(logits, 0, 0.5).unique().tolist() == [1]


def test_rows_past_the_real_vocabulary_are_never_drawn(tiny_checkpoint):
    model = Qwen3.from_pretrained(tiny_checkpoint[0], dtype=torch.float32)
    with torch.no_grad():  # make the padding rows the most likely tokens by far
        model.lm_head.weight[80:] = model.model.norm.weight * 50
    g = torch.Generator().manual_seed(0)
    unmasked, _ = generate(model, [[5, 9]] * 4, 8, temperature=1.0, top_p=1.0, eos_token_id=[], generator=g)
    assert (unmasked >= 80).any()  # the test can fail
    tokens, _ = generate(model, [[5, 9]] * 4, 8, temperature=1.0, top_p=1.0, eos_token_id=[], generator=g, vocab_size=80)
    assert (tokens < 80).all()


# ================================================================================================
# model.py: loader errors


def test_loader_errors_name_the_problem(tmp_path, tiny_checkpoint):
    import shutil

    from safetensors.torch import load_file, save_file

    source = tiny_checkpoint[0]

    def copy(name):
        target = tmp_path / name
        shutil.copytree(source, target)
        return target

    with pytest.raises(FileNotFoundError, match="config.json"):
        (lambda d: (d.joinpath("config.json").unlink(), Qwen3.from_pretrained(d)))(copy("noconfig"))

    directory = copy("llama")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
    with pytest.raises(ValueError, match="'llama'"):
        Qwen3.from_pretrained(directory)

    def with_tensors(name, edit):
        directory = copy(name)
        tensors = load_file(directory / "model.safetensors")
        edit(tensors)
        save_file(tensors, directory / "model.safetensors")
        return directory

    with pytest.raises(ValueError, match=r"missing tensor.*model\.norm\.weight"):
        Qwen3.from_pretrained(with_tensors("missing", lambda t: t.pop("model.norm.weight")))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.extra\.weight'"):
        Qwen3.from_pretrained(with_tensors("unexpected", lambda t: t.update({"model.extra.weight": torch.zeros(2)})))
    bad_shape = lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(65, 32)})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*\(65, 32\).*\(64, 32\)"):
        Qwen3.from_pretrained(with_tensors("shape", bad_shape))

    directory = copy("lfs")
    (directory / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n")
    with pytest.raises(ValueError, match="git-lfs pointer"):
        Qwen3.from_pretrained(directory)

    directory = copy("shards")
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        Qwen3.from_pretrained(directory)
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="plain file name"):
        Qwen3.from_pretrained(directory)

    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        Qwen3.from_pretrained(tmp_path / "does-not-exist")


# ================================================================================================
# model.py: tokenizer


def test_tokenizer_knows_eos_and_pad(tmp_path, tiny_checkpoint):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "a": 1, "b": 2, "[UNK]": 3}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)  # no config.json: <|endoftext|>
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.vocab_size) == (0, 0, 4)
    assert loaded.encode("a b a") == [1, 2, 1]
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert load_tokenizer(tmp_path).eos_token_id == 2


@pytest.mark.skipif(not (SHARED_DATA / "qwen3-tokenizer").exists(), reason="needs ../shared/data")
def test_real_qwen3_tokenizer_ids():
    tokenizer = load_tokenizer(SHARED_DATA / "qwen3-tokenizer")
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.vocab_size) == (151643, 151643, 151669)
    text = "Solve: \\boxed{\\frac{1}{2}}"
    ids = tokenizer.encode(text)
    assert ids == [50, 3948, 25, 1124, 79075, 35702, 37018, 90, 16, 15170, 17, 3417]
    assert tokenizer.decode(ids) == text
