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
rest + layers x one layer. The measuring passes run inside torch.random.fork_rng: they draw LoRA's
initialisation and dropout masks, and a run must sample the same whether it measured or not.

The planned peak is the largest of three phases of a step, each the sum of what is allocated then:
- rollout: weights, LoRA parameters, their last gradients (kept until the next update zeroes them)
  and AdamW's two moments (and, for arca-recent, its k fp32 copies of the adapter), the KV cache of
  the rollout batch, one step's logits;
- evaluation: the same with an evaluation batch's KV cache;
- training: weights, LoRA parameters, gradients and moments, the activations of one micro-batch
  (with checkpointing: each layer's input, plus one layer recomputed in backward), one chunk of the
  log-prob computation (fp32 logits, their softmax and gradients), and the attention bias.
Eager generation frees its KV cache when it returns (the allocator reuses it for training); with
--compile the decode buffers (the largest bucket, reserved once) and LoRA sampling copies stay
allocated, so they count in every phase.

What the plan leaves out, --gradient-checkpointing auto keeps as a margin: the CUDA context (outside
torch's allocator), the blocks the caching allocator holds but has not handed out, and the
transients of the no-grad passes (the adapter-off pass: one layer's working set at a time).
"""

import os
from dataclasses import replace

import torch

from compiled_decode import SPARE_SLOTS, batch_bucket, cache_length

LOGPROB_CHUNK = 64  # grpo.completion_logprobs' chunk of positions
# a chunk's bf16 logits (2 bytes), their fp32 copy (4) and softmax (4), and fp32 and bf16 gradients (4 + 2)
BYTES_PER_LOGIT = 16
# --gradient-checkpointing auto's margin over the planned peak (module docstring)
CUDA_CONTEXT_GB = 0.75  # the context and its loaded kernels: 0.5-0.8 GB on recent GPUs and drivers
ALLOCATOR_SLACK = 0.10  # reserved but unallocated blocks, as a share of the planned peak
NO_GRAD_LAYER_SHARE = 2.0  # a no-grad layer's transients, in multiples of what a checkpointed layer keeps


def saved_activation_bytes(model_config, config, device, layers, checkpointing, rows, prompt, completion):
    """Bytes the training forward keeps for backward (forward_saved_bytes) on a Qwen3 of model_config's
    geometry with `layers` layers and the run's LoRA, for `rows` sequences of prompt + completion tokens."""
    from lora import apply_lora
    from model import Qwen3

    dtype = getattr(torch, config.dtype)
    # a small vocabulary: the logits are recomputed in backward, never kept, so it changes nothing here
    with torch.device("meta"):
        model = Qwen3(replace(model_config, num_hidden_layers=layers, vocab_size=1024))
    model.to_empty(device=device).to(dtype)
    for parameter in model.parameters():
        parameter.detach().zero_()
    lora_dtype = getattr(torch, config.lora_dtype)
    apply_lora(model, config.rank, config.lora_alpha, config.lora_dropout, compute_dtype=lora_dtype)
    model.train()
    model.gradient_checkpointing = checkpointing
    return forward_saved_bytes(model, rows, prompt, completion)


def forward_saved_bytes(model, rows, prompt, completion):
    """Bytes `model`'s training forward keeps for backward, parameters excluded, for `rows` sequences of
    prompt + completion tokens. The attention bias, one (B, 1, G x T, S) tensor shared by the layers,
    grows as T x S, not with the token count: it is left out here and planned on its own."""
    import grpo

    device = model.lm_head.weight.device
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}  # storage address -> bytes: a tensor saved by several ops counts once
    keys = prompt + completion - 1  # the attention's key axis S: the last token predicts nothing

    def keep(tensor):
        storage = tensor.untyped_storage()
        # the attention bias (B, 1, G*T, S) is planned apart
        attention_bias = tensor.dim() == 4 and tensor.shape[1] == 1 and tensor.shape[-1] == keys
        if storage.data_ptr() not in parameters and not attention_bias:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens = torch.zeros(rows, completion, dtype=torch.long, device=device)  # (B, T)
    mask = torch.ones_like(tokens, dtype=torch.bool)  # (B, T)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        grpo.completion_forward(model, [[0] * prompt] * rows, tokens, mask)
    return sum(kept.values())


def activation_profile(model_config, config, device, checkpointing):
    """What the training forward keeps, at the model's depth: {"per_token", "constant"} bytes, and one
    layer's share of each ("layer_per_token", "layer_constant"; the constant is mostly the LoRA
    weights' casts). Fitted from 1 and 2 layers at two lengths; the random number generators are
    left as they were (torch.random.fork_rng)."""
    fit = {}
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        # 2 rows of P = T = 32, then 128: the forward sees 2 x (P + T - 1) tokens (the last predicts nothing)
        for layers in (1, 2):
            small, large = (saved_activation_bytes(model_config, config, device, layers, checkpointing,
                                                   rows=2, prompt=n, completion=n) for n in (32, 128))
            per_token = (large - small) / (2 * 255 - 2 * 63)
            fit[layers] = per_token, small - per_token * 2 * 63
    layer_per_token, layer_constant = fit[2][0] - fit[1][0], fit[2][1] - fit[1][1]
    depth = model_config.num_hidden_layers
    return {"per_token": fit[1][0] + (depth - 1) * layer_per_token,
            "constant": fit[1][1] + (depth - 1) * layer_constant,
            "layer_per_token": layer_per_token, "layer_constant": layer_constant}


def kv_cache_bytes(model_config, rows, length, dtype_bytes):
    """Keys and values of every layer for `rows` sequences of `length` slots."""
    c = model_config
    return 2 * c.num_hidden_layers * rows * c.num_key_value_heads * length * c.head_dim * dtype_bytes


def lora_parameter_count(model_config, rank):
    """r x (in + out) over the seven projections of every layer (PEFT's count)."""
    c = model_config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = [(c.hidden_size, q), (c.hidden_size, kv), (c.hidden_size, kv), (q, c.hidden_size),
              (c.hidden_size, c.intermediate_size), (c.hidden_size, c.intermediate_size),
              (c.intermediate_size, c.hidden_size)]
    return c.num_hidden_layers * rank * sum(n_in + n_out for n_in, n_out in shapes)


def weight_count(model_config):
    """Parameters of the base model (a tied head counted once)."""
    c = model_config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    attention = c.hidden_size * (q + 2 * kv) + q * c.hidden_size
    mlp = 3 * c.hidden_size * c.intermediate_size
    norms = 2 * c.hidden_size + 2 * c.head_dim
    head = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
    embedding, final_norm = c.vocab_size * c.hidden_size, c.hidden_size
    return embedding + c.num_hidden_layers * (attention + mlp + norms) + final_norm + head


def largest_decode_call(config, ranks=1):
    """(rows, tokens) of a run's largest generate call on one process: an evaluation batch or a step's
    rollouts, each prompt at most max_prompt_tokens long (longer ones are dropped) plus max_new_tokens."""
    rollout_rows = config.prompts_per_micro_batch * config.micro_batches // ranks * config.group_size
    return max(config.eval_batch_size, rollout_rows), config.max_prompt_tokens + config.max_new_tokens


def planned_peak(model_config, config, device, checkpointing, profiles=None):
    """{component: GB} of the largest phase of a step, and "peak" and the phase's name (see the module
    docstring).
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
    groups = model_config.num_attention_heads // model_config.num_key_value_heads
    vocabulary = model_config.vocab_size
    kept = 0  # --compile: the decode buffers (of the largest call, reserved once), LoRA sampling copies
    if config.compile:
        rows, tokens = largest_decode_call(config)
        slots = cache_length(tokens) + SPARE_SLOTS
        kept = kv_cache_bytes(model_config, batch_bucket(rows), slots, e) + lora * e
    recent = 4 * lora * config.arca_recent_updates if config.credit == "arca-recent" else 0  # fp32 copies
    common = {"weights": weight_count(model_config) * e, "kept decode buffers (--compile)": kept,
              "LoRA, gradients and AdamW moments": 16 * lora, "arca-recent's older adapters": recent}
    recomputed = full["layer_per_token"] * micro_batch * sequence + full["layer_constant"]
    phases = {
        "rollout": {**common, "KV cache": kv_cache_bytes(model_config, rollout_rows, sequence, e),
                    "logits": 3 * 4 * rollout_rows * vocabulary},
        "evaluation": {**common,
                       "KV cache": kv_cache_bytes(model_config, config.eval_batch_size, sequence, e),
                       "logits": 3 * 4 * config.eval_batch_size * vocabulary},
        "training": {**common, "activations": saved["per_token"] * micro_batch * sequence + saved["constant"],
                     "one layer recomputed in backward": recomputed if checkpointing else 0,
                     "log-prob chunk": BYTES_PER_LOGIT * micro_batch * LOGPROB_CHUNK * vocabulary,
                     "attention bias": micro_batch * groups * sequence**2 * e},
    }
    phase = max(phases, key=lambda name: sum(phases[name].values()))
    plan = {name: value / 2**30 for name, value in phases[phase].items()}
    return {**plan, "peak": sum(plan.values()), "phase": phase}


def unplanned_margin_gb(model_config, config, plan):
    """What the plan leaves out, in GB: the CUDA context, the allocator's slack over the planned peak,
    and a no-grad pass's transients (one layer's working set of a micro-batch, about
    NO_GRAD_LAYER_SHARE times what a checkpointed layer keeps: its input and its MLP's widest tensor)."""
    e = torch.finfo(getattr(torch, config.dtype)).bits // 8
    sequence = config.max_prompt_tokens + config.max_new_tokens
    tokens = config.prompts_per_micro_batch * config.group_size * sequence
    widths = model_config.hidden_size + model_config.intermediate_size
    layer_working_set = NO_GRAD_LAYER_SHARE * tokens * widths * e
    return CUDA_CONTEXT_GB + ALLOCATOR_SLACK * plan["peak"] + layer_working_set / 2**30


def device_memory_bytes(device):
    """The device's memory: a GPU's total, or the host's physical memory for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resolve_gradient_checkpointing(model_config, config, device):
    """--gradient-checkpointing auto -> "on" when the planned peak without it, plus the margin for what
    the plan leaves out (unplanned_margin_gb), passes the device's memory, else "off" (recomputing costs
    about a third more time); "on" and "off" as given."""
    if config.gradient_checkpointing != "auto":
        return config.gradient_checkpointing
    without = planned_peak(model_config, config, device, checkpointing=False)
    margin = unplanned_margin_gb(model_config, config, without)
    available = device_memory_bytes(device) / 2**30
    choice = "on" if without["peak"] + margin > available else "off"
    print(f"--gradient-checkpointing auto: {choice} (planned peak without it {without['peak']:.1f} GB in "
          f"{without['phase']}, plus {margin:.1f} GB unplanned, device {available:.1f} GB)")
    return choice
