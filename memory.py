"""How much memory a GRPO step needs: the activations the training forward keeps, measured, and the
planned peak of a step. train.py resolves --gradient-checkpointing auto with it; bench.py's memory
kind prints it.

The activations are measured, not modelled: a Qwen3 of the run's geometry with 1 and then 2 layers
(zero weights, the run's LoRA: rank, dropout, compute dtype) runs the training forward over prompt +
completion (grpo.completion_forward, so the attention kernel is the device's own: CUDA's and the
CPU's fused kernels keep no T x T matrix) under saved_tensors_hooks, which add up the bytes of every
tensor kept for backward except the parameters, at two token counts. That fits bytes = constant +
per token x tokens for each depth; the difference of the depths is one layer, the rest (embedding
output, final norm, the log-prob chunks' inputs) what one layer leaves over. Scaled to the model:
rest + layers x one layer.

The planned peak is the largest of three phases of a step, each the sum of what is allocated then:
- rollout: weights, LoRA parameters, their last gradients (kept until the next update zeroes them)
  and AdamW's two moments, the KV cache of the rollout batch, one step's logits;
- evaluation: the same with an evaluation batch's KV cache;
- training: weights, LoRA parameters, gradients and moments, the activations of one micro-batch
  (with checkpointing: each layer's input, plus one layer recomputed in backward), one chunk of the
  log-prob computation (fp32 logits, their softmax and gradients), and the attention bias.
Eager generation frees its KV cache when it returns (the allocator reuses it for training); with
--compile the decode buffers and LoRA sampling copies stay allocated, so they count in every phase.
"""

import os

import torch

from compiled_decode import CACHE_BUCKET, batch_bucket

LOGPROB_CHUNK = 64  # grpo.completion_logprobs' chunk of positions
BYTES_PER_LOGIT = 16  # a chunk's bf16 logits (2), their fp32 copy (4) and softmax (4), fp32 and bf16 gradients (4 + 2)


def saved_activation_bytes(model_config, config, device, layers, checkpointing, rows, prompt, completion):
    """Bytes the training forward keeps for backward, parameters excluded, on a Qwen3 of model_config's
    geometry with `layers` layers and the run's LoRA, for `rows` sequences of prompt + completion tokens.
    The attention bias, one (B, 1, G x T, S) tensor shared by the layers, grows as T x S, not with the
    token count: it is left out here and planned on its own."""
    from dataclasses import replace

    import grpo
    from lora import apply_lora
    from model import Qwen3

    dtype = getattr(torch, config.dtype)
    with torch.device("meta"):  # a small vocabulary: the logits are recomputed in backward, never kept, so it changes nothing here
        model = Qwen3(replace(model_config, num_hidden_layers=layers, vocab_size=1024))
    model.to_empty(device=device).to(dtype)
    for parameter in model.parameters():
        parameter.detach().zero_()
    apply_lora(model, config.rank, config.lora_alpha, config.lora_dropout, compute_dtype=getattr(torch, config.lora_dtype))
    model.train()
    model.gradient_checkpointing = checkpointing
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}  # storage address -> bytes: a tensor saved by several ops counts once
    keys = prompt + completion - 1  # the attention's key axis S: the last token predicts nothing

    def keep(tensor):
        storage = tensor.untyped_storage()
        attention_bias = tensor.dim() == 4 and tensor.shape[1] == 1 and tensor.shape[-1] == keys  # (B, 1, G*T, S): planned apart
        if storage.data_ptr() not in parameters and not attention_bias:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens = torch.zeros(rows, completion, dtype=torch.long, device=device)  # (B, T)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        grpo.completion_forward(model, [[0] * prompt] * rows, tokens, torch.ones_like(tokens, dtype=torch.bool))
    return sum(kept.values())


def activation_profile(model_config, config, device, checkpointing):
    """What the training forward keeps, at the model's depth: {"per_token", "constant"} bytes, and one
    layer's share of each ("layer_per_token", "layer_constant"; the constant is mostly the LoRA
    weights' casts). Fitted from 1 and 2 layers at two lengths."""
    fit = {}
    for layers in (1, 2):  # 2 rows of P = T = 32, then 128: the forward sees 2 x (P + T - 1) tokens (the last predicts nothing)
        small, large = (saved_activation_bytes(model_config, config, device, layers, checkpointing, 2, n, n) for n in (32, 128))
        per_token = (large - small) / (2 * 255 - 2 * 63)
        fit[layers] = per_token, small - per_token * 2 * 63
    layer_per_token, layer_constant = fit[2][0] - fit[1][0], fit[2][1] - fit[1][1]
    depth = model_config.num_hidden_layers
    return {"per_token": fit[1][0] + (depth - 1) * layer_per_token, "constant": fit[1][1] + (depth - 1) * layer_constant,
            "layer_per_token": layer_per_token, "layer_constant": layer_constant}


def kv_cache_bytes(model_config, rows, length, dtype_bytes):
    """Keys and values of every layer for `rows` sequences of `length` slots."""
    return 2 * model_config.num_hidden_layers * rows * model_config.num_key_value_heads * length * model_config.head_dim * dtype_bytes


def lora_parameter_count(model_config, rank):
    """r x (in + out) over the seven projections of every layer (PEFT's count)."""
    c = model_config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = [(c.hidden_size, q), (c.hidden_size, kv), (c.hidden_size, kv), (q, c.hidden_size),
              (c.hidden_size, c.intermediate_size), (c.hidden_size, c.intermediate_size), (c.intermediate_size, c.hidden_size)]
    return c.num_hidden_layers * rank * sum(n_in + n_out for n_in, n_out in shapes)


def weight_count(model_config):
    """Parameters of the base model (a tied head counted once)."""
    c = model_config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    layer = c.hidden_size * (q + 2 * kv) + q * c.hidden_size + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size + 2 * c.head_dim
    head = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
    return c.vocab_size * c.hidden_size + c.num_hidden_layers * layer + c.hidden_size + head


def planned_peak(model_config, config, device, checkpointing, profiles=None):
    """{component: GB} of the largest phase of a step, and "peak" and the phase's name (see the module docstring).
    profiles: {checkpointing: activation_profile(...)} for False (and True), measured here when not given."""
    profiles = profiles or {}
    for setting in {False, checkpointing}:
        if setting not in profiles:
            profiles[setting] = activation_profile(model_config, config, device, setting)
    saved, full = profiles[checkpointing], profiles[False]
    e = torch.finfo(getattr(torch, config.dtype)).bits // 8
    lora = lora_parameter_count(model_config, config.rank)
    sequence = config.max_prompt_tokens + config.max_new_tokens  # the longest prompt + completion
    micro_batch = config.prompts_per_micro_batch * config.group_size
    rollout_rows = config.prompts_per_micro_batch * config.micro_batches * config.group_size
    kept = 0  # --compile: the decode buffers (the largest bucket: an evaluation batch) and the LoRA sampling copies
    if config.compile:
        kept = kv_cache_bytes(model_config, batch_bucket(config.eval_batch_size), -(-sequence // CACHE_BUCKET) * CACHE_BUCKET, e) + lora * e
    common = {"weights": weight_count(model_config) * e, "kept decode buffers (--compile)": kept}
    phases = {
        "rollout": {**common, "LoRA, gradients and AdamW moments": 16 * lora, "KV cache": kv_cache_bytes(model_config, rollout_rows, sequence, e),
                    "logits": 3 * 4 * rollout_rows * model_config.vocab_size},
        "evaluation": {**common, "LoRA, gradients and AdamW moments": 16 * lora,
                       "KV cache": kv_cache_bytes(model_config, config.eval_batch_size, sequence, e),
                       "logits": 3 * 4 * config.eval_batch_size * model_config.vocab_size},
        "training": {**common, "LoRA, gradients and AdamW moments": 16 * lora,
                     "activations": saved["per_token"] * micro_batch * sequence + saved["constant"],
                     "one layer recomputed in backward": (full["layer_per_token"] * micro_batch * sequence + full["layer_constant"])
                     if checkpointing else 0,
                     "log-prob chunk": BYTES_PER_LOGIT * micro_batch * LOGPROB_CHUNK * model_config.vocab_size,
                     "attention bias": micro_batch * (model_config.num_attention_heads // model_config.num_key_value_heads) * sequence**2 * e},
    }
    phase = max(phases, key=lambda name: sum(phases[name].values()))
    plan = {name: value / 2**30 for name, value in phases[phase].items()}
    return {**plan, "peak": sum(plan.values()), "phase": phase}


def device_memory_bytes(device):
    """The device's memory: a GPU's total, or the host's physical memory for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resolve_gradient_checkpointing(model_config, config, device):
    """--gradient-checkpointing auto -> "on" when the planned peak without it passes 90% of the device's
    memory, else "off" (recomputing costs about a third more time); "on" and "off" as given."""
    if config.gradient_checkpointing != "auto":
        return config.gradient_checkpointing
    without = planned_peak(model_config, config, device, checkpointing=False)
    available = device_memory_bytes(device) / 2**30
    choice = "on" if without["peak"] > 0.9 * available else "off"
    print(f"--gradient-checkpointing auto: {choice} (planned peak without it {without['peak']:.1f} GB in {without['phase']}, "
          f"device {available:.1f} GB)")
    return choice
