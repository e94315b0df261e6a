"""Speed of arca against transformers (+ PEFT) on the same random weights, in one process.

    python bench.py                     # GPU: Qwen3-1.7B geometry, bf16; CPU: the tiny shape, fp32
    python bench.py --quick             # CPU, tiny shape, one thread, well under a minute (a test runs it)
    python bench.py --shape 1.7b --only rollout,train

A Qwen3 of the named shape gets random weights, is saved as safetensors under Hugging Face names,
and is loaded by `Qwen3.from_pretrained` and by transformers' `Qwen3ForCausalLM` from the same
files. The shapes live here so this runs without ../shared: `1.7b` is Qwen3-1.7B-Base's geometry
(../shared/data/qwen3-configs/qwen3-1.7b-base.json), `0.6b` Qwen3-0.6B-Base's, `tiny` a small
model for the CPU. Random weights: every matrix N(0, 1 / its input width), norms 1 but the final
norm 4, so that logits have a standard deviation near 4 and next-token distributions are a few
nats wide, like a trained model's (HF's N(0, 0.02) gives nearly uniform ones, and a tied
embedding large enough to widen them makes the model repeat its input token).

Measurements (each: warm-up, then the median of repeats, ours and the reference interleaved,
device synchronised around every timer):
1. rollout: new tokens/s of batched sampling at a fixed length, EOS ignored (ours:
   `eos_token_id=[]`; transformers: `min_new_tokens = max_new_tokens`), temperature 1.0, top-p 0.95,
   prefill included, against `generate`. On a GPU also the fraction of the bandwidth bound:
   bytes read per decode step (all weights once, plus the KV cache at its mean length) over the
   device-to-device copy bandwidth measured here.
   Also the prefill of K = 4 completions per prompt, shared (each prompt once, K/V copied) against
   the prompt repeated K times.
2. train step: tokens/s of one forward + backward of the mean completion log-prob, LoRA r 64
   (alpha 128, dropout 0.05) on the seven projections, ours through grpo.py's chunked log-probs,
   transformers + PEFT through full logits and log_softmax; peak memory of each over the weights
   (the allocator's peak; on the CPU read from torch's profiler); on a GPU our MFU against the bf16
   matmul rate measured here (useful FLOPs: 4 per frozen weight and token, 6 per LoRA weight and
   token, plus causal attention).
3. ARCA overhead: one full `grpo.grpo_step` (rollout, reward, credit, loss, update) with
   `--credit arca` over the same step with `--credit uniform`, at beta 0 and beta 0.04, and the
   update alone (the step minus rollout and reward). Rewards are a fixed 0/1 pattern with spread
   in every group, completions run to the length limit; K = 4, 2 prompts per micro-batch, 4
   micro-batches (the paper's step) on a GPU, smaller on the CPU. Also one step with gradient
   checkpointing: seconds and peak memory.
4. sampler/trainer agreement: mean |log-prob from the sampler - log-prob from a training forward
   over prompt + completion| on the sampled tokens, ours (generate's return_logprobs against
   grpo.completion_forward) and transformers (generate's raw logits against a full forward).

Output: one JSON line per measurement {what, shape, batch, device, ours, reference, ratio, unit,
note} (ratio = ours / reference), then a Markdown table of the same.
Left out: multi-GPU, vLLM (a different engine, not a library this project replaces), CUDA graphs.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from credit import arca_scores
from model import Qwen3, Qwen3Config, generate, token_logprobs

SHAPES = {  # Hugging Face config.json fields
    "tiny": dict(vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, bos_token_id=4095, eos_token_id=4095),
    "0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, max_position_embeddings=32768),
    "1.7b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, max_position_embeddings=32768),
}
COMMON = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], rope_theta=1000000, rms_norm_eps=1e-6,
              tie_word_embeddings=True, attention_bias=False, hidden_act="silu", use_sliding_window=False,
              rope_scaling=None, bos_token_id=151643, eos_token_id=151643, torch_dtype="bfloat16")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KINDS = ("rollout", "train", "grpo", "agreement", "precision")


# ----------------------------------------------------------------------------------------------
# Sizes: what each measurement runs, on a GPU, on the CPU, and with --quick (either device)


def sizes(device, quick):
    if device.type == "cuda" and not quick:
        return dict(prompt=256, new=512, batches=(1, 16, 64), train_batch=8, train_len=1024, repeats=3,
                    grpo=dict(prompts=8, group=4, per_micro=2, new=512, prompt=256, repeats=2),
                    agreement=dict(batch=16, prompt=64, new=256),
                    precision=dict(batch=8, prompt=256, new=512, scales=(0, 1e-7, 1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)))
    if quick:
        return dict(prompt=16, new=16, batches=(1, 16, 64), train_batch=2, train_len=64, repeats=3,
                    grpo=dict(prompts=2, group=2, per_micro=1, new=8, prompt=16, repeats=1),
                    agreement=dict(batch=8, prompt=16, new=16),
                    precision=dict(batch=1, prompt=8, new=8, scales=(1e-4, 1e-2)))
    return dict(prompt=32, new=32, batches=(1, 16, 64), train_batch=4, train_len=256, repeats=5,
                grpo=dict(prompts=4, group=4, per_micro=2, new=32, prompt=32, repeats=3),
                agreement=dict(batch=16, prompt=32, new=64),
                precision=dict(batch=4, prompt=32, new=64, scales=(0, 1e-7, 1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)))


# ----------------------------------------------------------------------------------------------
# Timing and memory


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """Seconds one call of fn takes, with the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median_seconds(fns, device, repeats, warmup=1):
    """{name: median seconds} over `repeats` rounds; each round calls every fn once, in turn, so a
    machine that slows down for a while slows every contestant alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    seconds = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            seconds[name].append(timed(fn, device))
    return {name: statistics.median(values) for name, values in seconds.items()}


def peak_memory(fn, device):
    """(peak memory allocated while fn runs over what was allocated before it, the peak in all), GiB.

    GPU: torch's allocator peak. CPU: the allocator's running total as torch's profiler records
    it (its "[memory]" events), read from the exported trace; no total there (None).
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return (peak - before) / 2**30, peak / 2**30
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        profiler.export_chrome_trace(os.path.join(tmp, "trace.json"))
        events = json.loads(Path(tmp, "trace.json").read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]  # bytes since the start
    return max(totals + [0]) / 2**30, None


# ----------------------------------------------------------------------------------------------
# Device rates (GPU): the denominators of the bandwidth bound and of MFU


def copy_bandwidth(device, size_bytes=2**30, repeats=10):
    """Bytes/s of a device-to-device copy, counting the read and the write."""
    source = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    seconds = timed(lambda: [target.copy_(source) for _ in range(repeats)], device)
    return 2 * size_bytes * repeats / seconds


def matmul_rate(device, n=8192, repeats=10):
    """FLOP/s of a bf16 n x n matmul."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b
    seconds = timed(lambda: [a @ b for _ in range(repeats)], device)
    return 2 * n**3 * repeats / seconds


# ----------------------------------------------------------------------------------------------
# The checkpoint both implementations load


def write_checkpoint(shape, directory, device=torch.device("cpu"), seed=0):
    """config.json and model.safetensors for a random Qwen3 of `shape`, Hugging Face names, bf16.
    The numbers are drawn on `device` (1.7B of them take a while on a CPU)."""
    fields = dict(COMMON, **SHAPES[shape])
    config = Qwen3Config(**{k: v for k, v in fields.items() if k in Qwen3Config.__dataclass_fields__})
    with torch.device("meta"):
        names = {name: tuple(p.shape) for name, p in Qwen3(config).named_parameters()}  # tied lm_head appears once
    generator = torch.Generator(device).manual_seed(seed)
    tensors = {}
    for name, size in names.items():
        if name.endswith("norm.weight"):  # the final norm scales the logits to a std of 4
            tensors[name] = torch.full(size, 4.0 if name == "model.norm.weight" else 1.0, dtype=torch.bfloat16)
        else:  # (out, in): 1 / sqrt(in), so each layer adds O(1) to the residual stream and the embedding is small
            tensors[name] = (torch.randn(size, generator=generator, device=device) * size[1] ** -0.5).to(torch.bfloat16).cpu()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(fields, indent=1))
    return directory


def load_reference(directory, device, dtype):
    import transformers

    return transformers.Qwen3ForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval()


def random_prompts(batch, length, vocab_size, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=generator)  # (B, P)


# ----------------------------------------------------------------------------------------------
# 1. Rollout


def decode_bytes(config, batch, prompt, new, dtype):
    """Bytes one decode step reads, averaged over the completion: every weight once (the tied
    embedding once, as the lm_head) plus the K/V cache at its mean length."""
    h, kv, d, L = config.hidden_size, config.num_key_value_heads, config.head_dim, config.num_hidden_layers
    q = config.num_attention_heads * d
    per_layer = h * q + 2 * h * kv * d + q * h + 3 * h * config.intermediate_size
    weights = L * per_layer + config.vocab_size * h
    cache = 2 * L * batch * kv * d * (prompt + new / 2)
    return (weights + cache) * torch.finfo(dtype).bits // 8


def bench_rollout(model, reference, config, device, dtype, size, records, shape, compile=False):
    vocab = config.vocab_size
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
    for batch in size["batches"]:
        prompts = random_prompts(batch, size["prompt"], vocab, seed=batch)
        prompt_list = prompts.tolist()
        prompts_device = prompts.to(device)
        new = size["new"]
        generator = torch.Generator(device).manual_seed(0)

        def ours():
            generate(model, prompt_list, new, temperature=1.0, top_p=0.95, eos_token_id=[], generator=generator)

        def ours_compiled():
            generate(model, prompt_list, new, temperature=1.0, top_p=0.95, eos_token_id=[], generator=generator, compile=True)

        def theirs():
            reference.generate(input_ids=prompts_device, attention_mask=torch.ones_like(prompts_device), do_sample=True,
                               temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=new, min_new_tokens=new,
                               eos_token_id=config.eos_token_id, pad_token_id=config.eos_token_id)

        contestants = {"ours": ours, "theirs": theirs} | ({"compiled": ours_compiled} if compile else {})
        seconds = median_seconds(contestants, device, size["repeats"])
        rate = {name: batch * new / s for name, s in seconds.items()}
        records.append(record("rollout", shape, batch, device, rate["ours"], rate["theirs"], "new tokens/s",
                              f"prompt {size['prompt']}, {new} new, T 1.0, top-p 0.95, vs transformers generate"))
        if compile:
            records.append(record("rollout_compiled", shape, batch, device, rate["compiled"], rate["theirs"], "new tokens/s",
                                  f"generate(compile=True), vs transformers generate; eager: {rate['ours']:.0f}"))
        if bandwidth:
            bound = batch * bandwidth / decode_bytes(config, batch, size["prompt"], new, dtype)  # tokens/s
            records.append(record("rollout_bandwidth_fraction", shape, batch, device, rate["ours"] / bound, rate["theirs"] / bound,
                                  "fraction of bound", f"bound {bound:.0f} tokens/s at {bandwidth / 1e9:.0f} GB/s copy bandwidth"))

    if compile:  # compilations of the decode step over a 64-token generation, then a second call of the same shape
        from torch._dynamo.utils import counters

        prompts = random_prompts(8, size["prompt"], vocab, seed=9).tolist()
        before = counters["stats"]["unique_graphs"]
        generate(model, prompts, 64, temperature=0.7, top_p=0.9, eos_token_id=[], compile=True)
        first = counters["stats"]["unique_graphs"] - before
        generate(model, prompts, 64, temperature=0.7, top_p=0.9, eos_token_id=[], compile=True)
        again = counters["stats"]["unique_graphs"] - before - first
        records.append(record("decode_step_compilations", shape, 8, device, first, None, "compilations",
                              f"over a 64-token generation (dynamo's unique_graphs); a second call of the same shape added {again}"))

    # GRPO's K = 4 completions of a prompt: its prefill once and the K/V copied, against the prompt repeated K times
    distinct = random_prompts(max(size["batches"]) // 4, size["prompt"], vocab, seed=7).tolist()
    sampling = dict(temperature=1.0, top_p=0.95, eos_token_id=[])
    seconds = median_seconds({
        "shared": lambda: generate(model, distinct, 1, samples_per_prompt=4, **sampling),
        "repeated": lambda: generate(model, [p for p in distinct for _ in range(4)], 1, **sampling),
    }, device, size["repeats"])
    records.append(record("prefill_k4_shared_over_repeated", shape, 4 * len(distinct), device, seconds["shared"], seconds["repeated"],
                          "s per prefill", f"{len(distinct)} prompts of {size['prompt']} tokens x K 4, one new token"))


# ----------------------------------------------------------------------------------------------
# 2. Train step


def train_flops(config, tokens, seq_len, lora_params):
    """Useful FLOPs of one LoRA forward + backward: a frozen weight costs 2 (forward) + 2 (input
    gradient) per token, a LoRA weight 6, causal attention 3 x 2 x 2 x H x D x T / 2 per token."""
    h, d, L = config.hidden_size, config.head_dim, config.num_hidden_layers
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    frozen = L * (h * q + 2 * h * kv + q * h + 3 * h * config.intermediate_size) + config.vocab_size * h
    attention = L * 3 * 2 * 2 * config.num_attention_heads * d * seq_len / 2
    return tokens * (4 * frozen + 6 * lora_params + attention)


def bench_train(directory, device, dtype, size, records, shape):
    import peft

    from grpo import completion_logprobs
    from lora import apply_lora

    B, T = size["train_batch"], size["train_len"]
    ours_model = Qwen3.from_pretrained(directory, device=device, dtype=dtype)
    apply_lora(ours_model, 64, 128.0, dropout=0.05)
    ours_model.train()
    config = ours_model.config
    ids = random_prompts(B, T + 1, config.vocab_size, seed=1).to(device)  # (B, T + 1)
    mask = torch.ones_like(ids, dtype=torch.bool)  # (B, T + 1)
    for row in range(B):  # left padding, as in a GRPO batch: row i starts i / B / 4 of the way in
        mask[row, : row * T // (4 * B)] = False
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T + 1)
    targets = (mask[:, :-1] & mask[:, 1:]).float()  # (B, T): real tokens predicted from a real token

    def ours():
        hidden = ours_model(ids[:, :-1], mask[:, :-1])  # (B, T, hidden)
        logprobs, _ = completion_logprobs(ours_model, hidden, ids[:, 1:])  # (B, T)
        (-(logprobs * targets).sum() / targets.sum()).backward()
        for p in ours_model.parameters():
            p.grad = None

    reference = load_reference(directory, device, dtype)
    lora = peft.LoraConfig(r=64, lora_alpha=128, lora_dropout=0.05, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    reference = peft.get_peft_model(reference, lora)
    reference.train()

    def theirs():
        logits = reference(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1]).logits.float()  # (B, T, V)
        logprobs = logits.log_softmax(dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T)
        (-(logprobs * targets).sum() / targets.sum()).backward()
        for p in reference.parameters():
            p.grad = None

    seconds = median_seconds({"ours": ours, "theirs": theirs}, device, size["repeats"])
    rate = {name: B * T / s for name, s in seconds.items()}
    note = f"{B} x {T} tokens (left-padded up to 1/4), LoRA r 64 on 7 projections, loss = mean token log-prob"
    records.append(record("train_step", shape, B, device, rate["ours"], rate["theirs"], "tokens/s", note))
    (ours_peak, ours_total), (their_peak, their_total) = peak_memory(ours, device), peak_memory(theirs, device)
    note = f"allocator peak; in all {ours_total:.2f} vs {their_total:.2f} GiB" if device.type == "cuda" else "CPU allocator peak, from torch's profiler"
    records.append(record("train_peak_memory", shape, B, device, ours_peak, their_peak, "GiB over weights", note))
    if device.type == "cuda":
        lora_params = sum(p.numel() for p in ours_model.parameters() if p.requires_grad)
        peak = matmul_rate(device)
        flops = train_flops(config, B * T, T, lora_params)
        records.append(record("train_mfu", shape, B, device, flops / seconds["ours"] / peak, flops / seconds["theirs"] / peak,
                              "fraction of matmul rate", f"bf16 8192^3 matmul measured at {peak / 1e12:.0f} TFLOP/s"))


# ----------------------------------------------------------------------------------------------
# 3. ARCA overhead: full GRPO steps


class BenchTokenizer:
    """What grpo_step asks of a tokenizer: no EOS (fixed-length completions), text unused."""

    eos_token_id = []
    vocab_size = None

    @staticmethod
    def decode(ids):
        return ""


def fixed_rewards(texts, golds):
    """1, 0, 1, 0, ...: every group of an even size has spread, so every completion trains."""
    return [float(i % 2 == 0) for i in range(len(texts))], 0


def bench_grpo(directory, device, dtype, size, records, shape):
    import dataclasses

    import grpo
    from lora import apply_lora
    from train import TrainConfig

    g = size["grpo"]
    model = Qwen3.from_pretrained(directory, device=device, dtype=dtype)
    apply_lora(model, 64, 128.0, dropout=0.05)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=5e-6, weight_decay=0.0, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    prompts = random_prompts(g["prompts"], g["prompt"], model.config.vocab_size, seed=2).tolist()
    golds = [""] * len(prompts)
    base = TrainConfig(rank=64, lora_alpha=128.0, group_size=g["group"], prompts_per_micro_batch=g["per_micro"],
                       micro_batches=g["prompts"] // g["per_micro"], max_new_tokens=g["new"], temperature=1.0, top_p=0.95,
                       diagnose_all=False)
    generator = torch.Generator(device).manual_seed(0)

    def step(config):
        """(full seconds, update seconds, metrics) of one GRPO step."""
        result = {}

        def run():
            result["metrics"] = grpo.grpo_step(model, optimizer, scheduler, prompts, golds, BenchTokenizer(), fixed_rewards, config, generator)[0]

        full = timed(run, device)
        metrics = result["metrics"]
        return full, full - metrics["rollout_s"] - metrics["reward_s"], metrics

    variants = {(credit, beta): dataclasses.replace(base, credit=credit, beta=beta) for beta in (0.0, 0.04) for credit in ("uniform", "arca")}
    variants["uniform", "diagnose_all"] = dataclasses.replace(base, credit="uniform", diagnose_all=True)
    variants["arca", "exact"] = dataclasses.replace(base, credit="arca", arca_precision="exact")
    step(variants["arca", 0.04])  # warm-up
    full, update = {key: [] for key in variants}, {key: [] for key in variants}
    for _ in range(g["repeats"]):
        for key, config in variants.items():
            seconds, update_seconds, _ = step(config)
            full[key].append(seconds)
            update[key].append(update_seconds)
    N = g["prompts"] * g["group"]
    setting = f"{g['prompts']} prompts x K {g['group']}, {g['per_micro']} prompts per micro-batch, prompt {g['prompt']}, {g['new']} new"
    for beta in (0.0, 0.04):
        arca, uniform = statistics.median(full["arca", beta]), statistics.median(full["uniform", beta])
        records.append(record(f"grpo_step_arca_over_uniform_beta{beta:g}", shape, N, device, arca, uniform, "s per step", setting))
        arca, uniform = statistics.median(update["arca", beta]), statistics.median(update["uniform", beta])
        records.append(record(f"grpo_update_arca_over_uniform_beta{beta:g}", shape, N, device, arca, uniform, "s per update", setting + "; step minus rollout and reward"))
    diagnosed, plain = statistics.median(update["uniform", "diagnose_all"]), statistics.median(update["uniform", 0.0])
    records.append(record("grpo_update_diagnose_all_over_off", shape, N, device, diagnosed, plain, "s per update",
                          setting + "; credit uniform, --diagnose-all (all five signals, one adapter-off pass on one micro-batch) over off"))
    exact, bf16 = statistics.median(update["arca", "exact"]), statistics.median(update["arca", 0.0])
    records.append(record("grpo_update_arca_exact_over_bf16", shape, N, device, exact, bf16, "s per update",
                          setting + f"; credit arca, --arca-precision exact over bf16 (model dtype {str(dtype).removeprefix('torch.')})"))
    exact_memory, _ = peak_memory(lambda: step(variants["arca", "exact"]), device)
    bf16_memory, _ = peak_memory(lambda: step(variants["arca", 0.0]), device)
    records.append(record("grpo_step_arca_exact_over_bf16_peak_memory", shape, N, device, exact_memory, bf16_memory, "GiB over weights", setting))

    model.gradient_checkpointing = True
    memory, total = peak_memory(lambda: step(variants["arca", 0.0]), device)
    seconds, _, metrics = step(variants["arca", 0.0])
    model.gradient_checkpointing = False
    records.append(record("grpo_step_checkpointed", shape, N, device, seconds, None, "s per step",
                          f"{setting}; credit arca, beta 0, gradient checkpointing; rollout {metrics['rollout_s']:.2f} s"))
    records.append(record("grpo_step_checkpointed_peak_memory", shape, N, device, memory, None, "GiB over weights",
                          setting + (f"; {total:.2f} GiB allocated in all (weights, adapter, optimiser state included)" if total else "")))


# ----------------------------------------------------------------------------------------------
# 5. ARCA's precision: how much of a bf16 ARCA score is the adapter


PRECISION_SHAPE = dict(SHAPES["0.6b"], num_hidden_layers=4, vocab_size=4096, bos_token_id=4095, eos_token_id=4095)  # width 1024


def bench_precision(device, size, records, shape, tmp):
    """Pearson per token of bf16 ARCA (bf16 activations, adapter on vs off) with the exact score
    (fp32 activations, grpo.exact_adapted_hidden's computation), and the mean bf16 score over the
    exact one, for a LoRA r16 whose B = s * N(0, 1), at a realistic width: Qwen3-0.6B's layers (4 of
    them) on the CPU, the run's shape on a GPU. bf16 weights in both."""
    import grpo
    from lora import apply_lora, disable_adapter, lora_layers

    p = size["precision"]
    name = shape if device.type == "cuda" else "precision"
    if device.type != "cuda":
        SHAPES["precision"] = PRECISION_SHAPE
    directory = write_checkpoint(name, Path(tmp) / "precision", device, seed=4)
    model = apply_lora(Qwen3.from_pretrained(directory, device=device, dtype=torch.bfloat16), 16, 32.0).eval()
    prompts = random_prompts(p["batch"], p["prompt"], model.config.vocab_size, seed=5).tolist()
    tokens = random_prompts(p["batch"], p["new"], model.config.vocab_size, seed=6).to(device)  # (B, T) as completions
    mask = torch.ones_like(tokens, dtype=torch.bool)
    generator = torch.Generator(device).manual_seed(0)
    noise = {n: torch.randn(layer.lora_B.shape, generator=generator, device=device) for n, layer in lora_layers(model).items()}
    for scale in p["scales"]:
        with torch.no_grad():
            for n, layer in lora_layers(model).items():
                layer.lora_B.copy_(scale * noise[n])
            h_adapted = grpo.completion_hidden(model, prompts, tokens, mask)  # bf16
            exact_adapted = grpo.exact_adapted_hidden(model, prompts, tokens, mask)
            with disable_adapter(model):
                h_base = grpo.completion_hidden(model, prompts, tokens, mask)
                exact_base = grpo.completion_hidden(model, prompts, tokens, mask, torch.float32)
        bf16_scores = arca_scores(h_adapted, h_base)[mask]
        exact_scores = arca_scores(exact_adapted, exact_base)[mask]
        correlation = grpo.pearson(bf16_scores, exact_scores)
        ratio = f"{bf16_scores.mean().item() / exact_scores.mean().item():.3g}" if exact_scores.sum() > 0 else "-"
        records.append(record(f"arca_bf16_vs_exact_s{scale:g}", name, p["batch"], device, correlation, None, "Pearson per token",
                              f"rms(B) = {scale:g}; mean bf16 score / exact {ratio}; exact mean {exact_scores.mean().item():.3g}, "
                              f"bf16 mean {bf16_scores.mean().item():.3g}; {p['batch']} x {p['new']} tokens, LoRA r16 on 7 projections"))


# ----------------------------------------------------------------------------------------------
# 4. Sampler / trainer agreement


def bench_agreement(model, reference, config, device, size, records, shape):
    from grpo import completion_forward

    a = size["agreement"]
    prompts = random_prompts(a["batch"], a["prompt"], config.vocab_size, seed=3)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        tokens, mask, sampled = generate(model, prompts.tolist(), a["new"], temperature=1.0, top_p=0.95, eos_token_id=[],
                                         generator=generator, return_logprobs=True)  # (B, N) each
        trained, _, _ = completion_forward(model, prompts.tolist(), tokens, mask)  # (B, N)
        ours = ((sampled - trained).abs() * mask).sum() / mask.sum()

        prompts_device = prompts.to(device)
        out = reference.generate(input_ids=prompts_device, attention_mask=torch.ones_like(prompts_device), do_sample=True,
                                 temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=a["new"], min_new_tokens=a["new"],
                                 eos_token_id=config.eos_token_id, pad_token_id=config.eos_token_id,
                                 output_logits=True, return_dict_in_generate=True)
        completion = out.sequences[:, prompts.shape[1] :]  # (B, N)
        step_logits = torch.stack(out.logits, dim=1)  # (B, N, V) raw, before temperature and top-p
        their_sampled, _ = token_logprobs(step_logits, completion)  # (B, N)
        full = reference(input_ids=out.sequences[:, :-1]).logits[:, prompts.shape[1] - 1 :]  # (B, N, V)
        their_trained, _ = token_logprobs(full, completion)  # (B, N)
        theirs = (their_sampled - their_trained).abs().mean()
    records.append(record("sampler_trainer_gap", shape, a["batch"], device, ours.item(), theirs.item(), "nats per token",
                          f"prompt {a['prompt']}, {a['new']} new; ours vs grpo.completion_forward, theirs vs a full forward"))


# ----------------------------------------------------------------------------------------------
# Output


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def record(what, shape, batch, device, ours, reference, unit, note=""):
    ratio = ours / reference if ours is not None and reference not in (None, 0) else None
    line = {"what": what, "shape": shape, "batch": batch, "device": device_name(device), "ours": ours,
            "reference": reference, "ratio": ratio, "unit": unit, "note": note}
    print(json.dumps(line), flush=True)
    return line


def markdown_table(records):
    def number(x):
        return "" if x is None else f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"

    rows = ["| what | shape | batch | device | ours | reference | ours / reference | unit |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        rows.append(f"| {r['what']} | {r['shape']} | {r['batch']} | {r['device']} | {number(r['ours'])} | "
                    f"{number(r['reference'])} | {number(r['ratio'])} | {r['unit']} |")
    return "\n".join(rows)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="model geometry; default 1.7b on a GPU, tiny on the CPU")
    parser.add_argument("--device", default=None, help="cuda or cpu; default cuda when available")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None, help="default bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats: under a minute on a CPU")
    parser.add_argument("--only", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch; default torch's choice, 1 with --quick (on a busy machine, "
                             "OpenMP threads wait for each other and every small op slows down many times)")
    parser.add_argument("--compile", action="store_true", help="also measure generate(compile=True): the static decode step under torch.compile")
    parser.add_argument("--checkpoint-dir", default=None, help="where to write the random checkpoint (default: a temporary directory)")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.shape = args.shape or ("1.7b" if args.device.type == "cuda" else "tiny")
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32"))
    args.only = [kind.strip() for kind in args.only.split(",") if kind.strip()]
    unknown = sorted(set(args.only) - set(KINDS))
    if unknown:
        parser.error(f"--only {','.join(unknown)}: expected a subset of {','.join(KINDS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    device, dtype, shape = args.device, args.dtype, args.shape
    if args.threads or (args.quick and device.type == "cpu"):
        torch.set_num_threads(args.threads or 1)
    size = sizes(device, args.quick)
    torch.manual_seed(0)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = write_checkpoint(shape, args.checkpoint_dir or tmp, device)
        if "rollout" in args.only or "agreement" in args.only:
            model = Qwen3.from_pretrained(directory, device=device, dtype=dtype)
            reference = load_reference(directory, device, dtype)
            if "rollout" in args.only:
                bench_rollout(model, reference, model.config, device, dtype, size, records, shape, args.compile)
            if "agreement" in args.only:
                bench_agreement(model, reference, model.config, device, size, records, shape)
            del model, reference
        if "train" in args.only:
            bench_train(directory, device, dtype, size, records, shape)
        if "grpo" in args.only:
            bench_grpo(directory, device, dtype, size, records, shape)
        if "precision" in args.only:
            bench_precision(device, size, records, shape, tmp)
    print()
    print(f"python {' '.join(sys.argv)}  # torch {torch.__version__}, dtype {str(dtype).removeprefix('torch.')}")
    print()
    print(markdown_table(records))
    return records


if __name__ == "__main__":
    main()
