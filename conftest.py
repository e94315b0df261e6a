"""What the tests share: the one tiny-checkpoint builder and the fixtures built on it, the tiny runs'
arguments and rewards, and small helpers. Every test runs on a CPU and downloads nothing: tiny random
Qwen3 checkpoints are built with transformers (the oracle) and saved as safetensors; tests that read
../shared skip without it.

    python -m pytest -q                 # every test (test_arca.py and tests/)
    python -m pytest -q test_arca.py    # the method's tests alone: model, lora, credit, grpo, math_reward
"""

import json
from pathlib import Path

import pytest
import torch
import transformers

import grpo
import runs
import step_log
from lora import apply_lora, lora_layers
from model import Qwen3

REPO = Path(__file__).resolve().parent
SHARED_DATA = REPO.parent / "shared" / "data"


def tiny_hf_config(**overrides):
    settings = dict(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, rope_theta=10000.0,
        tie_word_embeddings=True, eos_token_id=1, bos_token_id=1, pad_token_id=1,
        initializer_range=0.2,  # large enough that a wrong formula moves the logits well past 1e-4
    )
    settings.update(overrides)
    return transformers.Qwen3Config(**settings)


def save_tiny_checkpoint(directory, seed=0, max_shard_size=None, randomise_norms=True, **overrides):
    """The one tiny-checkpoint builder: a random transformers Qwen3ForCausalLM (tiny_hf_config with
    `overrides`), initialised from `seed` and saved as safetensors; returns (directory, hf_model).
    randomise_norms: norms start at 1 in transformers; random ones keep a mixed-up norm from passing."""
    torch.manual_seed(seed)
    hf_model = transformers.Qwen3ForCausalLM(tiny_hf_config(**overrides)).eval()
    if randomise_norms:
        with torch.no_grad():
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


def inductor_missing():
    """Why torch.compile cannot build here, or None (the compiled path's tests skip with the reason)."""
    try:
        torch.compile(lambda x: x * 2, fullgraph=True)(torch.ones(2))
        return None
    except Exception as err:  # no C++ compiler, an unsupported platform, ...
        return f"torch.compile (inductor) cannot build here: {type(err).__name__}: {str(err)[:200]}"


TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """A tiny random Qwen3 with transformers' own initialisation (small weights, norms at 1), saved as
    safetensors: the weights both our model and transformers + PEFT load in the LoRA tests."""
    directory, _ = save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen3"), randomise_norms=False,
                                        vocab_size=97, max_position_embeddings=64, initializer_range=0.02)
    return directory


def tiny_model(checkpoint_dir):
    return Qwen3.from_pretrained(checkpoint_dir, dtype=torch.float32)


def hf_model(checkpoint_dir):
    return transformers.Qwen3ForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32).eval()


def input_ids(batch=2, length=7):
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    return model.lm_head(model(ids))  # (B, T, V)


def randomise_adapter(model, seed=0):
    """Give every B random values so the adapter changes the output (a fresh one does not)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(0.05 * torch.randn(layer.lora_B.shape, generator=generator))
    return model


class StepConfig:
    """The fields of train.TrainConfig that one GRPO step reads."""

    def __init__(self, **overrides):
        self.__dict__.update(dict(
            group_size=4, max_new_tokens=6, temperature=1.0, top_p=1.0, top_k=0, credit_eos=True,
            diagnose_all=False, arca_precision="bf16", compile=False, advantage="grpo",
            prompts_per_micro_batch=1, updates_per_batch=1, credit="arca", credit_eps=1e-8, power=2.0,
            clip_eps=0.2, beta=0.0, grad_clip=1.0, entropy_quantile=0.2, arca_recent_updates=5,
            loss_type="sequence", scale_rewards="group", mask_truncated=False,
        ), **overrides)


def lora_tiny_model(directory, rank=4, seed=0):
    model = Qwen3.from_pretrained(directory, dtype=torch.float32)
    torch.manual_seed(seed)
    return apply_lora(model, rank=rank, alpha=2 * rank)


def perturbed_lora_model(directory, seed=0):
    """A LoRA model whose adapter changes the output (B random), dropout 0, in train mode."""
    return randomise_adapter(lora_tiny_model(directory), seed).train()


def lora_gradient(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


class CharTokenizer:
    """The model.Tokenizer surface over single characters, for GRPO steps on the tiny checkpoint."""

    eos_token_id, pad_token_id, vocab_size = 1, 1, 40

    def decode(self, ids):
        return "".join("\\boxed{}0123456789"[i % 18] for i in ids)


def one_grpo_step(model, optimizer, scheduler, prompts, golds, score_fn, config, generator, tokenizer=None):
    """grpo.grpo_step with a StepLog, as train.run takes a step: (metrics, rollout, rewards)."""
    tokenizer = tokenizer or CharTokenizer()
    log = step_log.StepLog(model, tokenizer, config, scheduler.get_last_lr()[0])
    rollout, rewards = grpo.grpo_step(model, optimizer, scheduler, prompts, golds, tokenizer, score_fn,
                                      config, generator, log)
    return log.metrics(), rollout, rewards


class RecordingLog(step_log.StepLog):
    """A StepLog that also keeps what each micro-batch handed it: (rows, trained mask, credit inputs,
    weights), in order."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def micro_batch(self, rows, mask, inputs, weights, loss, kl):
        self.seen.append((rows, mask, inputs, weights))
        super().micro_batch(rows, mask, inputs, weights, loss, kl)


def reward_first_token_even(texts, golds):
    return [float(len(t) > 0 and t[0] in "\\o{0") for t in texts], 0


CHARS = "0123456789+-=\\boxed{} "


@pytest.fixture(scope="module")
def char_run_setup(tmp_path_factory):
    """A tiny checkpoint with a character tokenizer, and addition problems as JSON lines."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    root = tmp_path_factory.mktemp("char")
    directory, _ = save_tiny_checkpoint(root / "model", vocab_size=48, eos_token_id=0, bos_token_id=0,
                                        pad_token_id=0)
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(dict.fromkeys(CHARS))}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.save(str(directory / "tokenizer.json"))
    rng = random.Random(0)
    for split, count in (("train", 64), ("test", 8)):
        with open(root / f"{split}.jsonl", "w") as handle:
            for _ in range(count):
                a, b = rng.randint(0, 9), rng.randint(0, 9)
                handle.write(json.dumps({"problem": f"{a}+{b}=", "answer": str(a + b)}) + "\n")
    return root


def run_args(root, out, *extra):
    return ["--preset", "demo", "--model", str(root / "model"), "--data", str(root / "train.jsonl"),
            "--eval-data", str(root / "test.jsonl"), "--out", str(out), "--group-size", "4",
            "--prompts-per-micro-batch", "1", "--micro-batches", "2", "--max-new-tokens", "6",
            "--eval-problems", "4", "--eval-batch-size", "16", "--pass-k", "2", "--rank", "4", "--lr", "5e-2",
            "--lora-dropout", "0.05", "--warmup-steps", "3", "--temperature", "1.0", *extra]


def parity_reward(texts, golds, config):
    """A reward a random model earns half the time (parity of the text's character codes), so updates are
    non-zero."""
    return [float(sum(map(ord, text)) % 2) for text in texts], 0


PARITY = lambda texts, golds, *rest: ([float(sum(map(ord, text)) % 2) for text in texts], 0)


def metrics_of(out):
    """A run's metrics.jsonl, one dict per step."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def find_checkpoint_step(out):
    return torch.load(runs.find_checkpoint(out) / "state.pt", weights_only=True)["step"]


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory):
    """Our Qwen3 with 8 query heads on 2 KV heads (4 folded per KV head), fp32."""
    directory, _ = save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), randomise_norms=False,
                                        num_attention_heads=8)
    return Qwen3.from_pretrained(directory, dtype=torch.float32)


def boxed(answer):
    return f"The answer is $\\boxed{{{answer}}}$."
