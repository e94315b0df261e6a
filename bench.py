"""Speed of arca against transformers (+ PEFT) on the same random weights, in one process.

    python bench.py                     # GPU: Qwen3-1.7B geometry, bf16; CPU: the tiny shape, fp32
    python bench.py --quick             # CPU, tiny shape, one thread, about 80 s on 2 cores (a test runs it)
    python bench.py --shape 1.7b --only rollout,train
    python bench.py --threads 1 --compile --only rollout,kernels     # the README's CPU rows
    python bench.py --gpu-check --plan          # its rows, their settings and planned seconds (any machine)
    python bench.py --gpu-check --out runs/gpu-check --inductor-cache runs/inductor   # the GPU's first run

A Qwen3 of the named shape gets random weights, is saved as safetensors under Hugging Face names,
and is loaded by `Qwen3.from_pretrained` and by transformers' `Qwen3ForCausalLM` from the same
files. The shapes live here so this runs without any download: `1.7b` is Qwen3-1.7B-Base's geometry
(its config.json's fields), `0.6b` Qwen3-0.6B-Base's, `tiny` a small
model for the CPU. Random weights: every matrix N(0, 1 / its input width), norms 1 but the final
norm 4, so that logits have a standard deviation near 4 and next-token distributions are a few
nats wide, like a trained model's (HF's N(0, 0.02) gives nearly uniform ones, and a tied
embedding large enough to widen them makes the model repeat its input token).

Measurements (each: warm-up, then the median of repeats, ours and the reference interleaved,
device synchronised around every timer):
1. rollout: new tokens/s of batched sampling at a fixed length, EOS ignored (ours:
   `eos_token_id=[]`; transformers: `min_new_tokens = max_new_tokens`), temperature 1.0, top-p 0.95,
   prefill included, against `generate`; with --compile also `generate(compile=True)`, the
   number of compilations of its decode step and the seconds each takes, its greedy tokens against eager's,
   and its seeded
   sampling's repeatability and log-probs against a training forward's. On a GPU also the
   fraction of the bandwidth bound: bytes read per decode step (all weights once, plus the KV
   cache at its mean length) over the device-to-device copy bandwidth measured here. Also the prefill of K = 4
   completions per
   prompt, shared (each prompt once, K/V copied) against the prompt repeated K times, and rollouts
   with LoRA r 64 unmerged (GRPO's: `lora.sampling_copies`) against transformers + PEFT.
   kernels: kernels per decode step (torch's profiler; on the CPU, the operators that would be
   kernels) at the 1.7B geometry with 1 and 2 layers, extrapolated to 28: ours eager and compiled,
   base and LoRA, against transformers' generate and transformers + PEFT's.
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
5. precision: how much of a bf16 ARCA score is the adapter (see bench_precision).
6. memory (only when named: `--only memory`, and in --gpu-check): the training forward's saved
   activations per sequence token at the 1.7B geometry with and without gradient checkpointing, and
   the paper step's planned peak (memory.py), in the paper's configuration (bf16) on any device.

--gpu-check measures the paper run as the paper preset configures it (train.py's LoRA, its
arithmetic's dtype, top-k, top-p, temperature and sizes, at the 1.7B geometry), in rows run in
this order, each only if its planned seconds fit in what is left of --time-limit (480): memory
(the activation profiles and the planned peak), the paper step eager (the preset's default; its
seconds and its own peak memory, nothing else resident), the paper step compiled, rollouts at
the evaluation batch (64: eager, compiled, transformers, the bandwidth bound), LoRA rollouts at
batch 64; with --gpu-check-all also rollouts at batch 1 and 16, the training step against
transformers + PEFT, and the repeatability of two steps under --deterministic. Each finished row
is one line of <--out>/gpu-check.jsonl at once; the goals table (rollout >= 5x transformers and
>= 50% of the bound at batch 64, the eager paper step <= 3 s and <= 24 GB with checkpointing,
<= 0.5 MB of activations per token with checkpointing, a planned peak <= 20 GB) is read from it.
`--gpu-check --plan` prints the rows and their estimates (GPU_CHECK_SECONDS's constants) as JSON.

Output: one JSON line per measurement {what, shape, batch, device, ours, reference, ratio, unit,
note} (ratio = ours / reference), then a Markdown table of the same.
Left out: multi-GPU, vLLM (a different engine, not a library this project replaces).
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save_file

from credit import arca_scores
from model import Qwen3, Qwen3Config
from runs import append_line
from sampling import generate, token_logprobs

SHAPES = {  # Hugging Face config.json fields
    "tiny": dict(vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
                 bos_token_id=4095, eos_token_id=4095),
    "0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768),
    "1.7b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768),
}
COMMON = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], rope_theta=1000000, rms_norm_eps=1e-6,
              tie_word_embeddings=True, attention_bias=False, hidden_act="silu", use_sliding_window=False,
              rope_scaling=None, bos_token_id=151643, eos_token_id=151643, torch_dtype="bfloat16")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KINDS = ("rollout", "kernels", "train", "grpo", "agreement", "precision")  # run by default
EXTRA_KINDS = ("memory",)  # run when named in --only (and by --gpu-check)


# ----------------------------------------------------------------------------------------------
# Sizes: what each measurement runs, on a GPU, on the CPU, and with --quick (either device)


def sizes(device, quick):
    if device.type == "cuda" and not quick:
        return dict(prompt=256, new=512, batches=(1, 16, 64), train_batch=8, train_len=1024, repeats=3,
                    grpo=dict(prompts=8, group=4, per_micro=2, new=512, prompt=256, repeats=2),
                    agreement=dict(batch=16, prompt=64, new=256),
                    precision=dict(batch=8, prompt=256, new=512,
                                   scales=(0, 1e-7, 1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)))
    if quick:
        return dict(prompt=16, new=16, batches=(1, 16, 64), train_batch=2, train_len=64, repeats=3,
                    grpo=dict(prompts=2, group=2, per_micro=1, new=8, prompt=16, repeats=1),
                    agreement=dict(batch=8, prompt=16, new=16),
                    precision=dict(batch=1, prompt=8, new=8, scales=(1e-4, 1e-2)))
    return dict(prompt=32, new=32, batches=(1, 16, 64), train_batch=4, train_len=256, repeats=5,
                grpo=dict(prompts=4, group=4, per_micro=2, new=32, prompt=32, repeats=3),
                agreement=dict(batch=16, prompt=32, new=64),
                precision=dict(batch=4, prompt=32, new=64,
                               scales=(0, 1e-7, 1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)))


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


def median_seconds(fns, device, repeats, warmups=None):
    """{name: median seconds} over `repeats` rounds; each round calls every fn once, in turn, so a
    machine that slows down for a while slows every contestant alike. Each fn is first called once
    untimed, or warmups[name] instead (e.g. a shorter generation) where given."""
    for name, fn in fns.items():
        (warmups or {}).get(name, fn)()
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
    # bytes since the start
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
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


def write_checkpoint(shape, directory, device=torch.device("cpu"), seed=0, layers=None):
    """config.json and model.safetensors for a random Qwen3 of `shape` (with `layers` decoder
    layers instead of the shape's, if given), Hugging Face names, bf16. The numbers are drawn on
    `device` (1.7B of them take a while on a CPU)."""
    fields = dict(COMMON, **SHAPES[shape]) | ({"num_hidden_layers": layers} if layers else {})
    config = Qwen3Config(**{k: v for k, v in fields.items() if k in Qwen3Config.__dataclass_fields__})
    with torch.device("meta"):
        # tied lm_head appears once
        names = {name: tuple(p.shape) for name, p in Qwen3(config).named_parameters()}
    generator = torch.Generator(device).manual_seed(seed)
    tensors = {}
    for name, size in names.items():
        if name.endswith("norm.weight"):  # the final norm scales the logits to a std of 4
            tensors[name] = torch.full(size, 4.0 if name == "model.norm.weight" else 1.0,
                                       dtype=torch.bfloat16)
        # (out, in): 1 / sqrt(in), so each layer adds O(1) to the residual stream and the embedding is small
        else:
            tensors[name] = (torch.randn(size, generator=generator,
                                         device=device) * size[1] ** -0.5).to(torch.bfloat16).cpu()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(fields, indent=1))
    return directory


def load_reference(directory, device, dtype):
    import transformers

    return transformers.Qwen3ForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval()


def paper_config():
    """The paper preset's config as train.py resolves it (LoRA alpha = 2 x rank, ...)."""
    import train

    return train.parse_args(["--preset", "paper"])[0]


def apply_paper_lora(model, dtype):
    """LoRA as the paper preset applies it (its rank, alpha and dropout on the seven projections), its
    arithmetic in the preset's --lora-dtype on a model of the preset's dtype; on an fp32 model (the
    CPU rows) in fp32, the model's own."""
    from lora import apply_lora

    paper = paper_config()
    compute = getattr(torch, paper.lora_dtype) if dtype == getattr(torch, paper.dtype) else dtype
    return apply_lora(model, paper.rank, paper.lora_alpha, dropout=paper.lora_dropout, compute_dtype=compute)


def paper_peft_model(reference):
    """transformers + PEFT with the same LoRA (PEFT's own arithmetic: fp32 adapter weights)."""
    import peft

    paper = paper_config()
    lora = peft.LoraConfig(r=paper.rank, lora_alpha=paper.lora_alpha, lora_dropout=paper.lora_dropout,
                           target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    return peft.get_peft_model(reference, lora)


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


# the CPU rows' sampling (--gpu-check samples as the paper preset does: gpu_check_rows); rollouts run to
# their length, EOS ignored
SAMPLING = dict(temperature=1.0, top_p=0.95, top_k=0)


def our_generate(model, prompts, n, generator, lean=False, compile=False, sampling=SAMPLING):
    """Our rollout of n new tokens for prompts (token-id lists); lean: inside lora.sampling_copies
    (GRPO's rollout path for a LoRA model)."""
    from lora import sampling_copies

    with sampling_copies(model) if lean else contextlib.nullcontext():
        return generate(model, prompts, n, generator=generator, compile=compile, eos_token_id=[], **sampling)


def their_generate(reference, prompts, n, eos_token_id, sampling=SAMPLING):
    """transformers' generate of exactly n new tokens at the same settings, prompts (B, P) on the device."""
    return reference.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                              max_new_tokens=n, min_new_tokens=n, eos_token_id=eos_token_id,
                              pad_token_id=eos_token_id, **sampling)


def bench_rollout(model, reference, config, device, dtype, size, records, shape, compile=False,
                  sampling=SAMPLING):
    """New tokens/s of ours (eager, and compiled with --compile) against transformers' generate, at
    each batch of size["batches"], both sampling with `sampling`; on a GPU also as a fraction of the
    bandwidth bound."""
    vocab, new = config.vocab_size, size["new"]
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
    for batch in size["batches"]:
        prompts = random_prompts(batch, size["prompt"], vocab, seed=batch)
        prompt_list, prompts_device = prompts.tolist(), prompts.to(device)
        generator = torch.Generator(device).manual_seed(0)

        def ours(n=new, compile=False):
            our_generate(model, prompt_list, n, generator, compile=compile, sampling=sampling)

        def theirs(n=new):
            their_generate(reference, prompts_device, n, config.eos_token_id, sampling)

        contestants = {"ours": ours, "theirs": theirs}
        warmups = {"ours": lambda: ours(16), "theirs": lambda: theirs(16)}
        if compile:  # warmed up at full length: the compilation is for the cache bucket of this length
            contestants["compiled"] = warmups["compiled"] = lambda: ours(compile=True)
        seconds = median_seconds(contestants, device, size["repeats"], warmups)
        rate = {name: batch * new / s for name, s in seconds.items()}
        settings = (f"prompt {size['prompt']}, {new} new, T {sampling['temperature']:g}, top-p "
                    f"{sampling['top_p']:g}, top-k {sampling['top_k']}")
        records.append(record("rollout", shape, batch, device, rate["ours"], rate["theirs"], "new tokens/s",
                              f"{settings}, vs transformers generate"))
        if compile:
            records.append(record("rollout_compiled", shape, batch, device, rate["compiled"], rate["theirs"],
                                  "new tokens/s",
                                  f"generate(compile=True), vs transformers generate; eager: "
                                  f"{rate['ours']:.0f}; {settings}"))
        if bandwidth:
            bound = batch * bandwidth / decode_bytes(config, batch, size["prompt"], new, dtype)  # tokens/s
            best = max(rate["ours"], rate.get("compiled", 0))
            note = (f"ours {'compiled' if compile else 'eager'}; bound {bound:.0f} tokens/s at "
                    f"{bandwidth / 1e9:.0f} GB/s copy bandwidth")
            records.append(record("rollout_bandwidth_fraction", shape, batch, device, best / bound,
                                  rate["theirs"] / bound, "fraction of bound", note))


def bench_compiled(model, config, device, size, records, shape):
    """The compiled decode step against the eager one, 8 prompts x 64 new tokens: compilations over
    the generation and in a second call of the same shape (dynamo's counters); the fraction of greedy
    tokens equal to eager's; whether a seeded sampled call repeats; its log-probs against a training
    forward's (grpo.completion_forward)."""
    from torch._dynamo.utils import counters

    from grpo import completion_forward

    prompts = random_prompts(8, size["prompt"], config.vocab_size, seed=9).tolist()
    greedy = dict(temperature=0.0, top_p=1.0, eos_token_id=[])
    before = counters["stats"]["unique_graphs"]
    compiled_tokens = None

    def compiled_call():
        nonlocal compiled_tokens
        compiled_tokens, _ = generate(model, prompts, 64, compile=True, **greedy)

    with_compile = timed(compiled_call, device)
    first = counters["stats"]["unique_graphs"] - before
    replay = timed(compiled_call, device)
    again = counters["stats"]["unique_graphs"] - before - first
    records.append(record("decode_step_compilations", shape, 8, device, first, None, "compilations",
                          "over a 64-token generation (dynamo's unique_graphs); a second call of the same "
                          f"shape added {again}"))
    records.append(record("decode_step_compile_seconds", shape, 8, device,
                          (with_compile - replay) / max(first, 1), None, "s per graph",
                          f"the first call ({with_compile:.1f} s) less a second one ({replay:.2f} s), per "
                          "graph compiled"))
    eager_tokens, _ = generate(model, prompts, 64, **greedy)
    records.append(record("compiled_greedy_tokens_equal_eager", shape, 8, device,
                          (compiled_tokens == eager_tokens).float().mean().item(),
                          None, "fraction of tokens", "64 new tokens each, greedy"))
    sampled = [generate(model, prompts, 64, temperature=1.0, top_p=0.95, eos_token_id=[], compile=True,
                        return_logprobs=True,
                        generator=torch.Generator(device).manual_seed(0)) for _ in range(2)]
    repeats = all(torch.equal(a, b) for a, b in zip(*sampled))
    tokens, mask, logprobs = sampled[0]
    with torch.no_grad():
        trained, _, _ = completion_forward(model, prompts, tokens, mask)
    gap = ((logprobs - trained).abs() * mask).sum() / mask.sum()
    records.append(record("compiled_sampler_trainer_gap", shape, 8, device, gap.item(), None,
                          "nats per token",
                          "compiled sampler's log-probs vs grpo.completion_forward; a second call with the "
                          "same seed "
                          f"{'repeated every token' if repeats else 'DIFFERED'}"))


def bench_prefill(model, config, device, size, records, shape):
    """GRPO's K = 4 completions of a prompt: its prefill once and the K/V copied, against the prompt repeated
    K times."""
    distinct = random_prompts(max(size["batches"]) // 4, size["prompt"], config.vocab_size, seed=7).tolist()
    seconds = median_seconds({
        "shared": lambda: generate(model, distinct, 1, samples_per_prompt=4, eos_token_id=[], **SAMPLING),
        "repeated": lambda: generate(model, [p for p in distinct for _ in range(4)], 1, eos_token_id=[],
                                     **SAMPLING),
    }, device, size["repeats"])
    records.append(record("prefill_k4_shared_over_repeated", shape, 4 * len(distinct), device,
                          seconds["shared"], seconds["repeated"],
                          "s per prefill", f"{len(distinct)} prompts of {size['prompt']} tokens x K 4, one "
                                           "new token"))


def bench_rollout_lora(directory, device, dtype, size, records, shape, compile=False, sampling=SAMPLING):
    """Rollouts as GRPO samples them: the paper's LoRA (apply_paper_lora) on the seven projections,
    unmerged, against transformers + PEFT's generate (unmerged too); ours with lora.sampling_copies
    (the rollout path) and without it (the training path's LoRA arithmetic)."""
    from lora import lora_layers

    model = apply_paper_lora(Qwen3.from_pretrained(directory, device=device, dtype=dtype), dtype).eval()
    with torch.no_grad():
        # a trained adapter's B is not 0; the speed does not depend on it
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(std=1e-3)
    reference = paper_peft_model(load_reference(directory, device, dtype)).eval()
    vocab, new = model.config.vocab_size, size["new"]
    for batch in size["batches"]:
        prompts = random_prompts(batch, size["prompt"], vocab, seed=batch)
        prompt_list, prompts_device = prompts.tolist(), prompts.to(device)
        generator = torch.Generator(device).manual_seed(0)

        def ours(n=new, lean=True, compile=False):
            our_generate(model, prompt_list, n, generator, lean, compile, sampling)

        def theirs(n=new):
            their_generate(reference, prompts_device, n, model.config.eos_token_id, sampling)

        contestants = {"lean": ours, "plain": lambda: ours(lean=False), "theirs": theirs}
        warmups = {"lean": lambda: ours(16), "plain": lambda: ours(16, lean=False),
                   "theirs": lambda: theirs(16)}
        if compile:
            contestants["compiled"] = lambda: ours(compile=True)
        rate = {name: batch * new / s for name, s in median_seconds(contestants, device, size["repeats"],
                                                                    warmups).items()}
        lora = lora_layers(model)
        layer = next(iter(lora.values()))
        arithmetic = str(layer.compute_dtype).removeprefix("torch.")
        settings = f"LoRA r {layer.rank} unmerged, its arithmetic in {arithmetic}, top-k {sampling['top_k']}"
        records.append(record("rollout_lora", shape, batch, device, rate["lean"], rate["theirs"],
                              "new tokens/s",
                              f"{settings}, lora.sampling_copies, vs transformers + PEFT generate; without "
                              f"sampling_copies {rate['plain']:.0f}"))
        if compile:
            records.append(record("rollout_lora_compiled", shape, batch, device, rate["compiled"],
                                  rate["theirs"], "new tokens/s",
                                  "generate(compile=True) in lora.sampling_copies, vs transformers + PEFT "
                                  "generate"))


# ----------------------------------------------------------------------------------------------
# 1b. Kernels per decode step


# aten operators that make a view, allocate, return their input or pick a dtype on the host: no kernel
NOT_A_KERNEL = {
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided",
    "aten::as_strided_", "aten::t", "aten::transpose", "aten::permute", "aten::expand", "aten::expand_as",
    "aten::unsqueeze", "aten::squeeze", "aten::slice", "aten::select", "aten::narrow", "aten::split",
    "aten::split_with_sizes", "aten::chunk", "aten::unbind", "aten::alias", "aten::detach", "aten::detach_",
    "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg", "aten::to", "aten::contiguous",
    "aten::flatten", "aten::view_as", "aten::numpy_T", "aten::result_type", "aten::promote_types",
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::resize_", "aten::is_nonzero",
    "aten::item", "aten::_local_scalar_dense", "aten::type_as", "aten::linear", "aten::matmul",
    "aten::dropout", "aten::scalar_tensor"}
HOST_LAUNCH_CALLS = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                     "cudaGraphLaunch",
                     "cudaMemcpyAsync", "cudaMemsetAsync"}


def kernels_launched(fn, device):
    """(kernels, host launch calls) of one call of fn, from torch's profiler.

    GPU: the CUDA kernels and copies the device ran (those a CUDA graph replays included), and the
    host's launch calls (a CUDA graph is one). CPU, where nothing is launched: the operators that
    would be kernels, i.e. aten operators that compute and call no other that does (views,
    allocations and no-op casts excluded), and inductor's fused kernels (recorded with
    torch._inductor.config.cpp.enable_kernel_profile); host launches = kernels.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        fn()
        synchronize(device)
    events = profiler.events()
    if device.type == "cuda":
        return (sum(e.device_type == DeviceType.CUDA for e in events),
                sum(e.name in HOST_LAUNCH_CALLS for e in events))

    def computes(event):
        aten = event.name.startswith("aten::") and event.name not in NOT_A_KERNEL
        return aten or "cpp_fused" in event.name

    def calls_a_kernel(event):
        return any(computes(child) or calls_a_kernel(child) for child in event.cpu_children)

    kernels = sum(computes(e) and not calls_a_kernel(e) for e in events)
    return kernels, kernels


def per_decode_step(generate_tokens, device, short=8, long=24):
    """(kernels, launches) per decode step: a generation of `long` new tokens minus one of `short`,
    over the difference (prefill and setup cancel); one warm-up call first (the same cache bucket,
    so a compiled step is compiled by it)."""
    generate_tokens(short)
    k_short, l_short = kernels_launched(lambda: generate_tokens(short), device)
    k_long, l_long = kernels_launched(lambda: generate_tokens(long), device)
    return (k_long - k_short) / (long - short), (l_long - l_short) / (long - short)


def kernel_counts(model, reference, prompt_list, prompts_device, device, n_layers, compile):
    """{(variant, n_layers): (kernels, launches) per decode step} of ours eager and compiled, base
    and with the paper's LoRA, and of transformers' generate and transformers + PEFT's."""
    dtype, counts = model.lm_head.weight.dtype, {}

    def ours(n, compile=False, lean=False):
        our_generate(model, prompt_list, n, torch.Generator(device).manual_seed(0), lean, compile)

    def theirs(n):
        their_generate(reference, prompts_device, n, model.config.eos_token_id)

    counts["eager", n_layers] = per_decode_step(ours, device)
    counts["transformers", n_layers] = per_decode_step(theirs, device)
    if compile:
        counts["compiled", n_layers] = per_decode_step(lambda n: ours(n, compile=True), device)
    apply_paper_lora(model, dtype).eval()
    reference = paper_peft_model(reference).eval()
    counts["eager LoRA", n_layers] = per_decode_step(ours, device)
    counts["eager LoRA sampling_copies", n_layers] = per_decode_step(lambda n: ours(n, lean=True), device)
    counts["transformers + PEFT", n_layers] = per_decode_step(theirs, device)
    if compile:
        compiled_lora = per_decode_step(lambda n: ours(n, compile=True, lean=True), device)
        counts["compiled LoRA sampling_copies", n_layers] = compiled_lora
    return counts


def bench_kernels(device, dtype, size, records, shape, tmp, compile=False):
    """Kernels per decode step at `shape`'s geometry with 1 and 2 decoder layers, extrapolated to
    the shape's layer count (rest + layers x per layer): ours eager and compiled, base and with
    the paper's LoRA (the training path's arithmetic and lora.sampling_copies), against transformers'
    generate and transformers + PEFT's, all on the same weights."""
    import torch._dynamo
    import torch._inductor.config

    batch, prompt_length, layers = 4, 16, SHAPES[shape]["num_hidden_layers"]
    kernel_profile = torch._inductor.config.cpp.enable_kernel_profile
    torch._inductor.config.cpp.enable_kernel_profile = True  # inductor's CPU kernels show in the profiler
    torch._dynamo.reset()  # compile anew, with the kernels recorded
    counts = {}  # (variant, layers) -> (kernels, launches) per step
    for n_layers in (1, 2):
        directory = write_checkpoint(shape, Path(tmp) / f"kernels-{n_layers}", device, seed=8,
                                     layers=n_layers)
        model = Qwen3.from_pretrained(directory, device=device, dtype=dtype)
        reference = load_reference(directory, device, dtype)
        prompts = random_prompts(batch, prompt_length, model.config.vocab_size, seed=10)
        counts.update(kernel_counts(model, reference, prompts.tolist(), prompts.to(device), device, n_layers,
                                    compile))
        del model, reference
    torch._inductor.config.cpp.enable_kernel_profile = kernel_profile
    torch._dynamo.reset()

    def extrapolated(variant, column):
        one, two = counts[variant, 1][column], counts[variant, 2][column]
        per_layer = two - one
        return one - per_layer + layers * per_layer, per_layer

    against = {"eager": "transformers", "compiled": "transformers", "eager LoRA": "transformers + PEFT",
               "eager LoRA sampling_copies": "transformers + PEFT",
               "compiled LoRA sampling_copies": "transformers + PEFT"}
    for variant, reference_variant in against.items():
        if (variant, 1) not in counts:
            continue
        ours_total, ours_layer = extrapolated(variant, 0)
        their_total, their_layer = extrapolated(reference_variant, 0)
        note = (f"ours {variant}: {ours_layer:.1f} per layer, vs {reference_variant} generate: "
                f"{their_layer:.1f} per layer; "
                f"{layers} layers extrapolated from 1 and 2; batch {batch}, T 1.0, top-p 0.95")
        if device.type == "cuda":
            launches = extrapolated(variant, 1)[0], extrapolated(reference_variant, 1)[0]
            note += f"; host launch calls {launches[0]:.0f} vs {launches[1]:.0f}"
        records.append(record(f"kernels_per_decode_step ({variant})", shape, batch, device, ours_total,
                              their_total, "kernels", note))


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


TRAIN_CALLS = 8  # forward + backward calls bench_train makes: per side a warm-up, the repeats, a peak


def bench_train(directory, device, dtype, size, records, shape):
    """Tokens/s and peak memory of one forward + backward with the paper's LoRA, ours against
    transformers + PEFT's; on a GPU our MFU."""
    from grpo import completion_logprobs

    B, T = size["train_batch"], size["train_len"]
    ours_model = apply_paper_lora(Qwen3.from_pretrained(directory, device=device, dtype=dtype), dtype)
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

    reference = paper_peft_model(load_reference(directory, device, dtype))
    reference.train()

    def theirs():
        # (B, T, V)
        logits = reference(input_ids=ids[:, :-1], attention_mask=mask[:, :-1],
                           position_ids=positions[:, :-1]).logits.float()
        logprobs = logits.log_softmax(dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T)
        (-(logprobs * targets).sum() / targets.sum()).backward()
        for p in reference.parameters():
            p.grad = None

    seconds = median_seconds({"ours": ours, "theirs": theirs}, device, size["repeats"])
    rate = {name: B * T / s for name, s in seconds.items()}
    note = f"{B} x {T} tokens (left-padded up to 1/4), LoRA r 64 on 7 projections, loss = mean token log-prob"
    records.append(record("train_step", shape, B, device, rate["ours"], rate["theirs"], "tokens/s", note))
    ours_peak, ours_total = peak_memory(ours, device)
    their_peak, their_total = peak_memory(theirs, device)
    if device.type == "cuda":
        note = f"allocator peak; in all {ours_total:.2f} vs {their_total:.2f} GiB"
    else:
        note = "CPU allocator peak, from torch's profiler"
    records.append(record("train_peak_memory", shape, B, device, ours_peak, their_peak, "GiB over weights",
                          note))
    if device.type == "cuda":
        lora_params = sum(p.numel() for p in ours_model.parameters() if p.requires_grad)
        peak = matmul_rate(device)
        flops = train_flops(config, B * T, T, lora_params)
        records.append(record("train_mfu", shape, B, device, flops / seconds["ours"] / peak,
                              flops / seconds["theirs"] / peak,
                              "fraction of matmul rate", f"bf16 8192^3 matmul measured at {peak / 1e12:.0f} "
                                                         "TFLOP/s"))


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


def grpo_runner(directory, device, dtype, g, compile=False, seed=0):
    """(model, base config, step) for timing GRPO steps of size g on random prompts with fixed rewards:
    the paper preset's settings (its LoRA, top-k, top-p, temperature, AdamW) with g's sizes,
    --diagnose-all off; step(config) -> (seconds, update seconds, metrics) of one step, the update
    being the step minus rollout and reward. `seed` draws LoRA's A and the sampler's numbers."""
    import dataclasses

    import grpo
    from step_log import StepLog
    paper = paper_config()
    torch.manual_seed(seed)
    model = apply_paper_lora(Qwen3.from_pretrained(directory, device=device, dtype=dtype), dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=paper.lr, weight_decay=paper.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    prompts = random_prompts(g["prompts"], g["prompt"], model.config.vocab_size, seed=2).tolist()
    golds = [""] * len(prompts)
    base = dataclasses.replace(paper, group_size=g["group"], prompts_per_micro_batch=g["per_micro"],
                               micro_batches=g["prompts"] // g["per_micro"], max_new_tokens=g["new"],
                               diagnose_all=False, compile=compile)
    generator = torch.Generator(device).manual_seed(seed)

    def step(config):
        result = {}

        def run():
            tokenizer = BenchTokenizer()
            log = StepLog(model, tokenizer, config, scheduler.get_last_lr()[0])
            grpo.grpo_step(model, optimizer, scheduler, prompts, golds, tokenizer, fixed_rewards, config,
                           generator, log)
            result["metrics"] = log.metrics()

        full = timed(run, device)
        metrics = result["metrics"]
        return full, full - metrics["rollout_s"] - metrics["reward_s"], metrics

    return model, base, step


def bench_grpo(directory, device, dtype, size, records, shape):
    import dataclasses

    g = size["grpo"]
    model, base, step = grpo_runner(directory, device, dtype, g)
    variants = {(credit, beta): dataclasses.replace(base, credit=credit, beta=beta)
                for beta in (0.0, 0.04) for credit in ("uniform", "arca")}
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
    setting = (f"{g['prompts']} prompts x K {g['group']}, {g['per_micro']} prompts per micro-batch, prompt "
               f"{g['prompt']}, {g['new']} new")
    for beta in (0.0, 0.04):
        arca, uniform = statistics.median(full["arca", beta]), statistics.median(full["uniform", beta])
        records.append(record(f"grpo_step_arca_over_uniform_beta{beta:g}", shape, N, device, arca, uniform,
                              "s per step", setting))
        arca, uniform = statistics.median(update["arca", beta]), statistics.median(update["uniform", beta])
        records.append(record(f"grpo_update_arca_over_uniform_beta{beta:g}", shape, N, device, arca, uniform,
                              "s per update", setting + "; step minus rollout and reward"))
    diagnosed = statistics.median(update["uniform", "diagnose_all"])
    plain = statistics.median(update["uniform", 0.0])
    records.append(record("grpo_update_diagnose_all_over_off", shape, N, device, diagnosed, plain,
                          "s per update",
                          setting + "; credit uniform, --diagnose-all (every signal, one adapter-off "
                                    "pass on one micro-batch) over off"))
    exact, bf16 = statistics.median(update["arca", "exact"]), statistics.median(update["arca", 0.0])
    records.append(record("grpo_update_arca_exact_over_bf16", shape, N, device, exact, bf16, "s per update",
                          setting + "; credit arca, --arca-precision exact over bf16 (model dtype "
                                    f"{str(dtype).removeprefix('torch.')})"))
    exact_memory, _ = peak_memory(lambda: step(variants["arca", "exact"]), device)
    bf16_memory, _ = peak_memory(lambda: step(variants["arca", 0.0]), device)
    records.append(record("grpo_step_arca_exact_over_bf16_peak_memory", shape, N, device, exact_memory,
                          bf16_memory, "GiB over weights", setting))

    model.gradient_checkpointing = True
    memory, total = peak_memory(lambda: step(variants["arca", 0.0]), device)
    seconds, _, metrics = step(variants["arca", 0.0])
    model.gradient_checkpointing = False
    records.append(record("grpo_step_checkpointed", shape, N, device, seconds, None, "s per step",
                          f"{setting}; credit arca, beta 0, gradient checkpointing; rollout "
                          f"{metrics['rollout_s']:.2f} s"))
    records.append(record("grpo_step_checkpointed_peak_memory", shape, N, device, memory, None,
                          "GiB over weights",
                          setting + (f"; {total:.2f} GiB allocated in all (weights, adapter, optimiser state "
                                     "included)" if total else "")))


PAPER_STEP_CALLS = 6  # GRPO steps bench_paper_step takes eager (with --compile: 3)


def bench_paper_step(directory, device, dtype, g, records, shape, compile=False):
    """One GRPO step as the paper preset runs it (--diagnose-all on; its sizes g: on a GPU 8 prompts
    x K 4 = 32 completions of up to 512 tokens in 4 micro-batches), ARCA and uniform credit, after a
    warm-up step. Eager (the preset's default), then with gradient checkpointing: its seconds and the
    step's peak memory in all (weights, adapter and optimiser state included, nothing else resident:
    comparable with memory.planned_peak). With compile, the rollouts compiled: seconds only."""
    import dataclasses

    model, base, step = grpo_runner(directory, device, dtype, g, compile)
    arca, uniform = (dataclasses.replace(base, credit=credit, diagnose_all=True)
                     for credit in ("arca", "uniform"))
    step(arca)  # warm-up (and the compilation, with --compile)
    setting = (f"{g['prompts']} prompts x K {g['group']} = {g['prompts'] * g['group']} completions of "
               f"{g['new']} tokens, prompt {g['prompt']}, {g['prompts'] // g['per_micro']} micro-batches, "
               f"top-k {base.top_k}, LoRA arithmetic {base.lora_dtype}")
    N, what = g["prompts"] * g["group"], "paper_step" + ("_compiled" if compile else "")
    (arca_seconds, _, metrics), (uniform_seconds, _, _) = step(arca), step(uniform)
    records.append(record(what, shape, N, device, arca_seconds, uniform_seconds,
                          "s per step (ARCA / uniform)",
                          f"{setting}; rollouts {'compiled' if compile else 'eager'} "
                          f"{metrics['rollout_s']:.2f} s"))
    if compile:
        return
    memory = {}
    for checkpointed in (False, True):
        model.gradient_checkpointing = checkpointed
        _, memory[checkpointed] = peak_memory(lambda: step(arca), device)
    seconds, _, metrics = step(arca)
    model.gradient_checkpointing = False
    records.append(record("paper_step_checkpointed", shape, N, device, seconds, arca_seconds,
                          "s per step (with / without)",
                          f"{setting}; gradient checkpointing; rollout {metrics['rollout_s']:.2f} s"))
    if memory[True] is not None:  # the GPU allocator's peak in all; the CPU has no such total
        records.append(record("paper_step_checkpointed_peak_memory", shape, N, device,
                              memory[True] * 2**30 / 1e9,
                              memory[False] * 2**30 / 1e9, "GB in all (with / without)", setting))


# ----------------------------------------------------------------------------------------------
# 5. ARCA's precision: how much of a bf16 ARCA score is the adapter


# width 1024
PRECISION_SHAPE = dict(SHAPES["0.6b"], num_hidden_layers=4, vocab_size=4096, bos_token_id=4095,
                       eos_token_id=4095)


def bench_precision(device, size, records, shape, tmp):
    """Pearson per token of bf16 ARCA (bf16 activations, adapter on vs off) with the exact score
    (fp32 activations, grpo.exact_adapted_hidden's computation), and the mean bf16 score over the
    exact one, for a LoRA r16 whose B = s * N(0, 1), at a realistic width: Qwen3-0.6B's layers (4 of
    them) on the CPU, the run's shape on a GPU. bf16 weights in both."""
    import grpo
    from lora import apply_lora, disable_adapter, lora_layers
    from step_log import pearson

    p = size["precision"]
    name = shape if device.type == "cuda" else "precision"
    if device.type != "cuda":
        SHAPES["precision"] = PRECISION_SHAPE
    directory = write_checkpoint(name, Path(tmp) / "precision", device, seed=4)
    torch.manual_seed(4)  # A's initialisation: the same whichever measurements ran before
    model = apply_lora(Qwen3.from_pretrained(directory, device=device, dtype=torch.bfloat16), 16, 32.0).eval()
    prompts = random_prompts(p["batch"], p["prompt"], model.config.vocab_size, seed=5).tolist()
    # (B, T) as completions
    tokens = random_prompts(p["batch"], p["new"], model.config.vocab_size, seed=6).to(device)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    generator = torch.Generator(device).manual_seed(0)
    noise = {n: torch.randn(layer.lora_B.shape, generator=generator,
                            device=device) for n, layer in lora_layers(model).items()}
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
        correlation = pearson(bf16_scores, exact_scores)
        ratio = "-"
        if exact_scores.sum() > 0:
            ratio = f"{bf16_scores.mean().item() / exact_scores.mean().item():.3g}"
        records.append(record(f"arca_bf16_vs_exact_s{scale:g}", name, p["batch"], device, correlation, None,
                              "Pearson per token",
                              f"rms(B) = {scale:g}; mean bf16 score / exact {ratio}; exact mean "
                              f"{exact_scores.mean().item():.3g}, "
                              f"bf16 mean {bf16_scores.mean().item():.3g}; {p['batch']} x {p['new']} tokens, "
                              "LoRA r16 on 7 projections"))


# ----------------------------------------------------------------------------------------------
# 4. Sampler / trainer agreement


def bench_agreement(model, reference, config, device, size, records, shape):
    from grpo import completion_forward

    a = size["agreement"]
    prompts = random_prompts(a["batch"], a["prompt"], config.vocab_size, seed=3)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        tokens, mask, sampled = generate(model, prompts.tolist(), a["new"], temperature=1.0, top_p=0.95,
                                         eos_token_id=[],
                                         generator=generator, return_logprobs=True)  # (B, N) each
        trained, _, _ = completion_forward(model, prompts.tolist(), tokens, mask)  # (B, N)
        ours = ((sampled - trained).abs() * mask).sum() / mask.sum()

        prompts_device = prompts.to(device)
        out = reference.generate(input_ids=prompts_device, attention_mask=torch.ones_like(prompts_device),
                                 do_sample=True,
                                 temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=a["new"],
                                 min_new_tokens=a["new"],
                                 eos_token_id=config.eos_token_id, pad_token_id=config.eos_token_id,
                                 output_logits=True, return_dict_in_generate=True)
        completion = out.sequences[:, prompts.shape[1] :]  # (B, N)
        step_logits = torch.stack(out.logits, dim=1)  # (B, N, V) raw, before temperature and top-p
        their_sampled, _ = token_logprobs(step_logits, completion)  # (B, N)
        full = reference(input_ids=out.sequences[:, :-1]).logits[:, prompts.shape[1] - 1 :]  # (B, N, V)
        their_trained, _ = token_logprobs(full, completion)  # (B, N)
        theirs = (their_sampled - their_trained).abs().mean()
    records.append(record("sampler_trainer_gap", shape, a["batch"], device, ours.item(), theirs.item(),
                          "nats per token",
                          f"prompt {a['prompt']}, {a['new']} new; ours vs grpo.completion_forward, theirs vs "
                          "a full forward"))


# ----------------------------------------------------------------------------------------------
# 6. Memory: what the paper step keeps, measured at the 1.7B geometry, and its planned peak


def bench_memory(device, records, shape):
    """Saved-activation bytes per sequence token of the training forward (memory.activation_profile: 1 and
    2 real layers at 64 and 256 tokens, scaled to 28; parameters excluded; the device's attention kernel)
    with and without gradient checkpointing, in the paper preset's configuration (bf16 weights, bf16
    LoRA r 64, dropout 0.05) whatever the device, and without checkpointing with the LoRA update in
    fp32; then the paper step's planned peak (memory.planned_peak)."""
    import dataclasses

    import memory
    import train

    fields = dict(COMMON, **SHAPES[shape])
    model_config = Qwen3Config(**{k: v for k, v in fields.items() if k in Qwen3Config.__dataclass_fields__})
    config, _, _ = train.parse_args(["--preset", "paper"])
    profiles = {setting: memory.activation_profile(model_config, config, device,
                                                   setting) for setting in (False, True)}
    for setting, profile in profiles.items():
        records.append(record("activations_per_token" + ("_checkpointed" if setting else ""), shape, 1,
                              device, profile["per_token"] / 2**20, None, "MB per token",
                              f"{model_config.num_hidden_layers} layers, of which one layer "
                              f"{profile['layer_per_token'] / 2**10:.1f} KB; "
                              f"plus {profile['constant'] / 2**20:.0f} MB whatever the length (LoRA weight "
                              "casts)"))
    fp32_lora = memory.activation_profile(model_config, dataclasses.replace(config, lora_dtype="float32"),
                                          device, False)
    records.append(record("activations_per_token_fp32_lora", shape, 1, device, fp32_lora["per_token"] / 2**20,
                          None, "MB per token",
                          "--lora-dtype float32 (PEFT's fp32 LoRA arithmetic: an fp32 copy of each LoRA "
                          "input kept), no checkpointing"))
    for setting in (False, True):
        plan = memory.planned_peak(model_config, config, device, setting, dict(profiles))
        parts = ", ".join(f"{name} {value:.2f}" for name, value in plan.items()
                          if name not in ("peak", "phase") and value)
        records.append(record("paper_step_planned_peak" + ("_checkpointed" if setting else ""), shape, None,
                              device, plan["peak"], None, "GB", f"{plan['phase']} phase: {parts}"))


# ----------------------------------------------------------------------------------------------
# 7. Repeatability: two GRPO steps, twice, with --deterministic's settings and without


def bench_repeat(directory, device, dtype, g, records, shape):
    """Two GRPO steps of the paper preset from the same seeds, twice, under torch's deterministic
    algorithms (train.py's --deterministic) and without: the largest difference between the two
    adapters (0: the run repeats itself, as a bit-identical resume needs). The cuBLAS workspace
    setting must precede the process's first matmul: main sets it for --gpu-check-all."""
    import dataclasses

    differences = {}
    for deterministic in (True, False):
        adapters = []
        for _ in range(2):
            torch.use_deterministic_algorithms(deterministic)
            try:
                model, base, step = grpo_runner(directory, device, dtype, g, seed=0)
                config = dataclasses.replace(base, credit="arca", deterministic=deterministic)
                step(config)
                step(config)
            finally:
                torch.use_deterministic_algorithms(False)
            adapters.append([p.detach().clone() for p in model.parameters() if p.requires_grad])
            del model, step
        differences[deterministic] = max((a - b).abs().max().item() for a, b in zip(*adapters))
    records.append(record("repeat_adapter_difference", shape, g["prompts"] * g["group"], device,
                          differences[True], differences[False], "max |difference| (with / without)",
                          "two paper steps twice from the same seeds: --deterministic against without"))


# ----------------------------------------------------------------------------------------------
# --gpu-check: the paper run's goals in the first minutes of a GPU


GPU_CHECK_SECONDS = 480  # a row starts only if its estimate fits in what is left (a lent GPU: 10 min a call)
# The plan's estimates: no GPU has run this code yet, so these are upper guesses for an H100 at the
# 1.7B geometry in bf16, each stated once
SETUP_S = 30  # the random 1.7B checkpoint drawn, written and read back
LOAD_S = 10  # one 1.7B model loaded (ours or transformers')
COLD_COMPILE_S = 60  # one 28-layer decode graph compiled, the inductor cache cold
EAGER_DECODE_STEP_S = 0.009  # one eager decode step at 32 to 64 rows (twice that with LoRA unmerged)
TRANSFORMERS_DECODE_STEP_S = 0.010  # one step of transformers' generate (twice that through PEFT)
EAGER_PAPER_STEP_S = 6.0  # one eager GRPO step of the paper preset
MEMORY_ROW_S = 20  # bench_memory: activation profiles of 1 and 2 real layers, and the plan
TRAIN_CALL_S = 2.0  # one forward + backward of a micro-batch of 1,024-token sequences, ours or PEFT's
WARMUP_TOKENS = 16  # bench_rollout's eager warm-up generation


@dataclass
class Row:
    """One --gpu-check measurement: what it runs, at which settings, and its planned seconds."""

    name: str
    measure: object  # measure(records): appends the row's records
    estimate_s: float
    compile: bool = False
    graphs: int = 0  # decode graphs it compiles
    lora_dtype: str | None = None  # the LoRA arithmetic's dtype (None: no LoRA)
    top_k: int | None = None  # sampling's top-k (None: no sampling)
    extra: bool = False  # only with --gpu-check-all


def rollout_estimate(new, eager_step, their_step, compile):
    """bench_rollout's seconds for one batch: each contestant's warm-up and one timed call."""
    seconds = (WARMUP_TOKENS + new) * (eager_step + their_step)
    return seconds + (COLD_COMPILE_S + 2 * new * EAGER_DECODE_STEP_S if compile else 0)


def gpu_check_rows(directory, device, dtype, shape, preset=None):
    """--gpu-check's rows in run order: first the goal rows that take seconds (the memory plan and the
    eager paper step: nothing else is resident when they measure), then the paper step compiled, then
    the rollouts at the evaluation batch; the extra rows (batch 1 and 16 rollouts, the training step
    against transformers + PEFT, repeatability) only with --gpu-check-all. Sizes and sampling are
    the preset's (default the paper preset; LoRA always the paper's: apply_paper_lora), a generation's
    prompts half of its --max-prompt-tokens."""
    preset = preset or paper_config()
    sampling = dict(temperature=preset.temperature, top_p=preset.top_p, top_k=preset.top_k)
    lora = preset.lora_dtype
    prompt, new, batch = preset.max_prompt_tokens // 2, preset.max_new_tokens, preset.eval_batch_size
    g = dict(prompts=preset.prompts_per_micro_batch * preset.micro_batches, group=preset.group_size,
             per_micro=preset.prompts_per_micro_batch, new=new, prompt=prompt)
    rollout = dict(prompt=prompt, new=new, repeats=1)
    # one micro-batch of the longest sequences
    train_size = dict(train_batch=preset.prompts_per_micro_batch * preset.group_size,
                      train_len=preset.max_prompt_tokens + preset.max_new_tokens, repeats=1)

    def rollouts(batches, compile):
        def measure(records):
            model = Qwen3.from_pretrained(directory, device=device, dtype=dtype)
            reference = load_reference(directory, device, dtype)
            bench_rollout(model, reference, model.config, device, dtype, dict(rollout, batches=batches),
                          records, shape, compile, sampling)
        return measure

    def lora_rollout(records):
        bench_rollout_lora(directory, device, dtype, dict(rollout, batches=(batch,)), records, shape, True,
                           sampling)

    eager_rollout = rollout_estimate(new, EAGER_DECODE_STEP_S, TRANSFORMERS_DECODE_STEP_S, True)
    # two eager LoRA contestants (with and without sampling copies), each twice an eager step; PEFT's twice
    lora_estimate = rollout_estimate(new, 2 * 2 * EAGER_DECODE_STEP_S, 2 * TRANSFORMERS_DECODE_STEP_S, True)
    return [
        Row("memory", lambda records: bench_memory(device, records, "1.7b"), MEMORY_ROW_S, lora_dtype=lora),
        Row("paper step eager", lambda records: bench_paper_step(directory, device, dtype, g, records, shape),
            LOAD_S + PAPER_STEP_CALLS * EAGER_PAPER_STEP_S, lora_dtype=lora, top_k=sampling["top_k"]),
        Row("paper step compiled",
            lambda records: bench_paper_step(directory, device, dtype, g, records, shape, compile=True),
            LOAD_S + COLD_COMPILE_S + PAPER_STEP_CALLS // 2 * EAGER_PAPER_STEP_S, True, 1, lora,
            sampling["top_k"]),
        Row(f"rollout at batch {batch}", rollouts((batch,), True), 2 * LOAD_S + eager_rollout, True, 1,
            top_k=sampling["top_k"]),
        Row(f"LoRA rollout at batch {batch}", lora_rollout, 2 * LOAD_S + lora_estimate, True, 1, lora,
            sampling["top_k"]),
        Row("rollout at batch 1, 16", rollouts((1, 16), True), 2 * LOAD_S + 2 * eager_rollout, True, 2,
            top_k=sampling["top_k"], extra=True),
        Row("train step", lambda records: bench_train(directory, device, dtype, train_size, records, shape),
            2 * LOAD_S + TRAIN_CALLS * TRAIN_CALL_S, lora_dtype=lora, extra=True),
        Row("repeatability", lambda records: bench_repeat(directory, device, dtype, g, records, shape),
            4 * (LOAD_S + 2 * EAGER_PAPER_STEP_S), lora_dtype=lora, top_k=sampling["top_k"], extra=True),
    ]


def gpu_check_plan(rows):
    """The JSON object --gpu-check --plan prints: the rows in run order and the planned seconds."""
    listed = [{"name": row.name, "lora_dtype": row.lora_dtype, "top_k": row.top_k, "compile": row.compile,
               "graphs": row.graphs, "estimate_s": round(row.estimate_s, 1)} for row in rows]
    return {"rows": listed, "total_s": round(SETUP_S + sum(row.estimate_s for row in rows), 1)}


def free_device(device):
    """Between rows: compiled graphs (and their CUDA graph pools) dropped, the cache emptied, so a row
    measures its own memory with nothing of another's resident."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_rows(rows, out_file, limit_s=GPU_CHECK_SECONDS, clock=time.monotonic, between=lambda: None):
    """Each row in order if its estimate fits in what is left of limit_s, else it is skipped (out of
    time) and the next one is tried: a row that starts runs to its end, however long. After each row
    one JSON line is appended to out_file ({"check", "row", "records", "seconds"}, with "error" if it
    failed or "skipped"; "check" the check's start time, so earlier checks' lines stay and are told
    apart), so a check stopped at any point keeps every finished row. One failing row (a missing
    feature, out of memory) is its own line and message; the next row runs."""
    started, check = clock(), datetime.now(timezone.utc).isoformat(timespec="seconds")
    for row in rows:
        entry, elapsed = {"check": check, "row": row.name, "records": [], "seconds": 0.0}, clock() - started
        if elapsed + row.estimate_s > limit_s:
            entry["skipped"] = f"out of time: {elapsed:.0f} s gone, {row.estimate_s:.0f} s planned"
        else:
            begun = clock()
            try:
                row.measure(entry["records"])
            except Exception as error:  # one row's failure must not cost the rest of a short GPU session
                entry["error"] = f"{type(error).__name__}: {str(error)[:300]}"
                print(f"bench.py --gpu-check: {row.name} failed: {entry['error']}", file=sys.stderr,
                      flush=True)
            entry["seconds"] = clock() - begun
            between()
        append_line(out_file, entry)


GOALS = (  # (goal, record, batch or None, field, target, direction)
    ("rollout at batch 64: compiled / transformers generate", "rollout_compiled", 64, "ratio", 5.0, ">="),
    ("rollout at batch 64: fraction of the bandwidth bound", "rollout_bandwidth_fraction", 64, "ours", 0.5,
     ">="),
    ("paper GRPO step, eager (32 completions of up to 512 tokens), s", "paper_step", None, "ours", 3.0, "<="),
    ("paper GRPO step with gradient checkpointing, peak GB", "paper_step_checkpointed_peak_memory", None,
     "ours", 24.0, "<="),
    ("activations with gradient checkpointing, MB per token", "activations_per_token_checkpointed", 1, "ours",
     0.5, "<="),
    ("planned paper peak with gradient checkpointing, GB", "paper_step_planned_peak_checkpointed", None,
     "ours", 20.0, "<="),
)


def goals_table(out_file, device):
    """The goals against the last check's rows in out_file (gpu-check.jsonl), and what was not measured
    and why."""
    entries = [json.loads(line) for line in Path(out_file).read_text().splitlines()]
    entries = [entry for entry in entries if entry["check"] == entries[-1]["check"]]
    records = [r for entry in entries for r in entry["records"]]
    missing = [f"{e['row']} ({e.get('error') or e['skipped']})" for e in entries
               if "error" in e or "skipped" in e]
    seconds = sum(entry["seconds"] for entry in entries)
    rows = [f"Goals ({device_name(device)}, {seconds:.0f} s of rows"
            f"{'; not measured: ' + '; '.join(missing) if missing else ''}):", "",
            "| goal | target | measured | met |", "|---|---|---|---|"]
    for goal, what, batch, field, target, direction in GOALS:
        found = [r for r in records if r["what"] == what and (batch is None or r["batch"] == batch)]
        if not found or found[0][field] is None:
            rows.append(f"| {goal} | {direction} {target:g} | not measured | |")
            continue
        value = found[0][field]
        met = value >= target if direction == ">=" else value <= target
        rows.append(f"| {goal} | {direction} {target:g} | {value:.3g} | {'yes' if met else 'no'} |")
    return "\n".join(rows)


def gpu_check(args, device, dtype):
    """--gpu-check: the rows (the paper preset's settings at the 1.7B geometry), each appended to
    <out>/gpu-check.jsonl as it ends, then the goals table read from that file. Returns the records."""
    if args.inductor_cache:  # compiled code kept for a rerun: a warm cache skips most of each compile
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(args.inductor_cache).resolve())
    out_file = Path(args.out) / "gpu-check.jsonl"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        directory = write_checkpoint(args.shape, args.checkpoint_dir or tmp, device)
        rows = [row for row in gpu_check_rows(directory, device, dtype, args.shape)
                if args.gpu_check_all or not row.extra]
        run_rows(rows, out_file, args.time_limit, between=lambda: free_device(device))
    print()
    print(goals_table(out_file, device))
    return [r for line in out_file.read_text().splitlines() for r in json.loads(line)["records"]]


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

    rows = ["| what | shape | batch | device | ours | reference | ours / reference | unit |",
            "|---|---|---|---|---|---|---|---|"]
    for r in records:
        rows.append(f"| {r['what']} | {r['shape']} | {r['batch']} | {r['device']} | {number(r['ours'])} | "
                    f"{number(r['reference'])} | {number(r['ratio'])} | {r['unit']} |")
    return "\n".join(rows)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="model geometry; default 1.7b on a GPU and for --gpu-check, tiny on the CPU "
                             "(the memory kind: 1.7b on both)")
    parser.add_argument("--device", default=None, help="cuda or cpu; default cuda when available")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="default bfloat16 on a GPU and for --gpu-check (the paper preset's), float32 on "
                             "the CPU")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and few repeats: about 80 s on a 2-core CPU")
    parser.add_argument("--only", default=",".join(KINDS),
                        help=f"comma-separated subset of {','.join(KINDS + EXTRA_KINDS)} "
                             f"(default: all but {','.join(EXTRA_KINDS)})")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch; default torch's choice, 1 with --quick (on a busy "
                             "machine, OpenMP threads wait for each other and every small op slows down many "
                             "times)")
    parser.add_argument("--compile", action="store_true", help="also measure generate(compile=True): the "
                                                               "static decode step under torch.compile")
    parser.add_argument("--gpu-check", action="store_true",
                        help="the paper run's goals in one command, as the paper preset runs (the memory "
                             "plan, the paper step eager and compiled, rollouts at the evaluation batch), "
                             "then the goals table; replaces --only")
    parser.add_argument("--gpu-check-all", action="store_true",
                        help="with --gpu-check: also rollouts at batch 1 and 16, the training step against "
                             "transformers + PEFT, and the repeatability of two steps under --deterministic")
    parser.add_argument("--plan", action="store_true",
                        help="with --gpu-check: print its rows, their settings and planned seconds as JSON "
                             "and exit (no GPU needed, nothing written)")
    parser.add_argument("--out", default="runs/gpu-check",
                        help="with --gpu-check: the folder of gpu-check.jsonl, one line per finished row "
                             "(default runs/gpu-check)")
    parser.add_argument("--inductor-cache", default=None, metavar="DIR",
                        help="with --gpu-check: keep torch.compile's generated code in DIR, so a rerun "
                             "compiles from a warm cache")
    parser.add_argument("--time-limit", type=float, default=GPU_CHECK_SECONDS,
                        help="with --gpu-check: a row starts only if its planned seconds fit in what is left "
                             f"(default {GPU_CHECK_SECONDS})")
    parser.add_argument("--kernel-shape", choices=sorted(SHAPES), default=None,
                        help="geometry of the kernel counts (1 and 2 of its layers, extrapolated to all); "
                             "default 1.7b, tiny with --quick")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="where to write the random checkpoint (default: a temporary directory)")
    args = parser.parse_args(argv)
    if (args.plan or args.gpu_check_all) and not args.gpu_check:
        parser.error("--plan and --gpu-check-all go with --gpu-check")
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.memory_shape = args.shape or "1.7b"  # the memory kind is about the paper's geometry on any device
    gpu = args.device.type == "cuda" or args.gpu_check
    args.shape = args.shape or ("1.7b" if gpu else "tiny")
    args.kernel_shape = args.kernel_shape or ("tiny" if args.quick else "1.7b")
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    args.only = [] if args.gpu_check else [kind.strip() for kind in args.only.split(",") if kind.strip()]
    unknown = sorted(set(args.only) - set(KINDS + EXTRA_KINDS))
    if unknown:
        parser.error(f"--only {','.join(unknown)}: expected a subset of {','.join(KINDS + EXTRA_KINDS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    device, dtype, shape = args.device, args.dtype, args.shape
    if args.gpu_check and args.plan:  # the 1.7B geometry and the preset's sizes, whatever the machine
        rows = [row for row in gpu_check_rows(None, device, dtype, "1.7b")
                if args.gpu_check_all or not row.extra]
        plan = gpu_check_plan(rows)
        print(json.dumps(plan, indent=1))
        return plan
    if args.gpu_check_all:  # bench_repeat's deterministic matmuls: set before the process's first one
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if args.threads or (args.quick and device.type == "cpu"):
        torch.set_num_threads(args.threads or 1)
    size = sizes(device, args.quick)
    torch.manual_seed(0)
    records = []
    if args.gpu_check:
        records = gpu_check(args, device, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        directory = write_checkpoint(shape, args.checkpoint_dir or tmp, device) if args.only else None
        if "rollout" in args.only or "agreement" in args.only:
            model = Qwen3.from_pretrained(directory, device=device, dtype=dtype)
            reference = load_reference(directory, device, dtype)
            if "rollout" in args.only:
                bench_rollout(model, reference, model.config, device, dtype, size, records, shape,
                              args.compile)
                if args.compile:
                    bench_compiled(model, model.config, device, size, records, shape)
                bench_prefill(model, model.config, device, size, records, shape)
            if "agreement" in args.only:
                bench_agreement(model, reference, model.config, device, size, records, shape)
            del model, reference
        if "rollout" in args.only:
            bench_rollout_lora(directory, device, dtype, size, records, shape, args.compile)
        if "kernels" in args.only:
            bench_kernels(device, dtype, size, records, args.kernel_shape, tmp, args.compile)
        if "train" in args.only:
            bench_train(directory, device, dtype, size, records, shape)
        if "grpo" in args.only:
            bench_grpo(directory, device, dtype, size, records, shape)
        if "precision" in args.only:
            bench_precision(device, size, records, shape, tmp)
        if "memory" in args.only:
            bench_memory(device, records, args.memory_shape)
    print()
    print(f"python {' '.join(sys.argv)}  # torch {torch.__version__}, dtype "
          f"{str(dtype).removeprefix('torch.')}")
    print()
    print(markdown_table(records))
    return records


if __name__ == "__main__":
    main()
