"""Qwen3 in plain PyTorch: the model, its safetensors loader, the tokenizer and a batched sampler.

The architecture follows Hugging Face's `Qwen3ForCausalLM` (transformers/models/qwen3), which is the
oracle in the tests:

    embed -> N x [x + Attn(RMSNorm(x)); x + MLP(RMSNorm(x))] -> RMSNorm -> lm_head
    Attn: grouped-query attention; q and k get a per-head RMSNorm *before* the rotary embedding
          (Qwen3's addition over Qwen2), rotary in the half-rotation layout, no biases.
    MLP:  down(silu(gate(x)) * up(x)).

The module tree mirrors transformers' names (`model.layers.3.self_attn.q_proj`, ...), so checkpoint
keys map one to one onto `state_dict()` keys and a LoRA adapter's keys are PEFT's keys with a prefix.

`Qwen3.forward` returns the last hidden states after the final norm (what ARCA reads); logits are
`model.lm_head(hidden)`, so callers compute them only where they need them (the sampler on the last
position, training in chunks over completion positions).

Padding: `attention_mask` (B, T) marks real tokens with 1. Positions are counted per row from the
mask, so a left-padded row computes exactly what the unpadded sequence computes.

Sampling (`generate`) pre-fills left-padded prompts into a static KV cache allocated once per call,
then decodes one token per step with the cache written in place. Finished rows are checked every
few steps, not every step, so the loop does not wait on the GPU for each token. Top-p sorts the
vocabulary on a GPU (no host sync) and draws by exact rejection on the CPU, where a sort costs
more than the whole step of a small model (`sample_next_token`).

Attention: with a padding mask, the G query heads that share a K/V head are folded into one
head's queries, so grouped-query attention runs without copying K/V and on a fused masked kernel;
the additive mask is built once per forward (`attention_bias`). Without a mask, SDPA's own GQA.

Left out: sliding-window attention and rope scaling (no Qwen3 dense base model uses them; a config
asking for them is refused), and dropout inside the base model (Qwen3 has none).
"""

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from torch.utils.checkpoint import checkpoint


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class Qwen3Config:
    """The fields of a Hugging Face Qwen3 `config.json`, under the same names."""

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128  # from the config, never hidden_size / heads (they differ in Qwen3-0.6B)
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = False  # transformers' default when config.json leaves it out; Qwen3-1.7B-Base says true
    attention_bias: bool = False
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151643
    torch_dtype: str = "bfloat16"
    model_type: str = "qwen3"

    @classmethod
    def from_json(cls, path):
        """Read a `config.json`; unknown keys are ignored, unsupported features refused."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no config.json here; a checkpoint directory needs one") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if raw.get("model_type") != "qwen3":
            raise ValueError(f"{path}: model_type is {raw.get('model_type')!r}, expected 'qwen3' (this loader only knows Qwen3)")
        # transformers >= 5 writes `dtype` and `rope_parameters`; official Qwen3 files use `torch_dtype` and `rope_theta`.
        if "dtype" in raw and "torch_dtype" not in raw:
            raw["torch_dtype"] = raw["dtype"]
        rope = raw.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default" or raw.get("rope_scaling"):
            raise ValueError(f"{path}: rope scaling {rope or raw.get('rope_scaling')} is not supported, only plain RoPE")
        if "rope_theta" in rope and "rope_theta" not in raw:
            raw["rope_theta"] = rope["rope_theta"]
        if raw.get("use_sliding_window"):
            raise ValueError(f"{path}: use_sliding_window=true is not supported")
        names = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in raw.items() if k in names and v is not None})
        if config.num_attention_heads % config.num_key_value_heads:
            raise ValueError(f"{path}: num_attention_heads={config.num_attention_heads} is not a multiple of num_key_value_heads={config.num_key_value_heads}")
        return config


# ----------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back (as transformers does)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # F.rms_norm is x * rsqrt(mean(x^2) + eps) in one kernel; fp32 inside, weight applied after the cast
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rotary_cos_sin(position_ids, head_dim, theta, dtype):
    """cos and sin of the rotary angles for each position, in the half-rotation layout.

    position_ids (B, T) -> cos, sin (B, T, head_dim): angle_j = pos * theta^(-2j/head_dim), repeated
    over both halves of the head dimension.
    """
    exponent = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / theta**exponent  # (head_dim/2,)
    angles = position_ids.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x, cos, sin):
    """Rotate pairs (x_j, x_{j+D/2}) by their angle. x (B, H, T, D), cos/sin (B, T, D)."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D)
    first, second = x.chunk(2, dim=-1)  # (B, H, T, D/2) each
    rotated = torch.cat([-second, first], dim=-1)  # (B, H, T, D)
    return x * cos + rotated * sin


class Linear(nn.Linear):
    """nn.Linear computed in its input's dtype: a no-op cast for a bf16 input on bf16 weights; for an
    fp32 input the weight is upcast for this one matmul (the exact-ARCA passes, grpo.py), so fp32
    activations never need an fp32 copy of the model."""

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class KVCache:
    """Key/value buffers written in place: one K and one V tensor per layer, (B, KV, S, D) each.

    Rows are left-padded, so all rows write the same slots: `length` (a Python int, no device sync)
    counts the slots filled so far. `cos`, `sin` (S, D) are the rotary table of every position a
    slot can hold, computed once instead of at each decode step. In the compiled decode step, `slot`
    is a (1,) device tensor, the slot this step writes, and the tensors are views of DecodeBuffers'.
    """

    def __init__(self, keys, values, cos, sin):
        self.keys, self.values = keys, values  # L tensors (B, KV, S, D) each
        self.cos, self.sin = cos, sin  # (S, D)
        self.length = 0
        self.slot = None

    @classmethod
    def allocate(cls, config, batch_size, max_length, device, dtype):
        shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
        keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        positions = torch.arange(max_length, device=device)[None]  # (1, S): a position never exceeds its slot
        cos, sin = rotary_cos_sin(positions, config.head_dim, config.rope_theta, dtype)  # (1, S, D)
        return cls(keys, values, cos[0], sin[0])


class Attention(nn.Module):
    def __init__(self, config, layer_index):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)  # per head, before RoPE
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.num_heads, self.head_dim)).transpose(1, 2)  # (B, H, T, D)
        k = self.k_norm(self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)).transpose(1, 2)  # (B, KV, T, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None and cache.slot is not None:  # static decode step: write at a device-tensor slot, read it all
            layer_keys, layer_values = cache.keys[self.layer_index], cache.values[self.layer_index]  # (B, KV, S, D)
            layer_keys.index_copy_(2, cache.slot, k)  # in place: this layer's tensor, at a static address
            layer_values.index_copy_(2, cache.slot, v)
            k, v = layer_keys, layer_values  # unwritten slots are masked
        elif cache is not None:
            start, end = cache.length, cache.length + T
            cache.keys[self.layer_index][:, :, start:end] = k
            cache.values[self.layer_index][:, :, start:end] = v
            k = cache.keys[self.layer_index][:, :, :end]  # (B, KV, S, D)
            v = cache.values[self.layer_index][:, :, :end]  # (B, KV, S, D)
        if mask is None:  # plain causal attention, no padding: the flash kernel takes GQA as is
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=self.num_heads != self.num_kv_heads)  # (B, H, T, D)
        else:
            # GQA by folding: the G query heads that share a K/V head become G * T queries of that head,
            # so K/V are neither copied per query head nor passed with enable_gqa, which the fused
            # masked kernel (CUDA memory-efficient) lacks and would send the call to the math fallback.
            # `mask` is attention_bias's (B, 1, G * T, S), query row g * T + t.
            G = self.num_heads // self.num_kv_heads
            q = q.reshape(B, self.num_kv_heads, G * T, self.head_dim)  # (B, KV, G*T, D)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, KV, G*T, D)
            out = out.view(B, self.num_heads, T, self.head_dim)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_index):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """The `model.` part of the checkpoint: embeddings, layers, final norm."""

    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


# ----------------------------------------------------------------------------------------------
# The model


def attention_mask_4d(key_mask, num_queries):
    """Boolean SDPA mask (B, 1, T, S) from the key padding mask (B, S) of which the last T are queries.

    A query sees the real keys at or before its own slot. Each query also sees itself, so a padding
    query never has an empty row (an empty row makes SDPA return NaN, which would then leak through
    the zero attention weights of later layers). Example, S = 3, T = 3, key_mask row [0, 1, 1]:
        query 0 (pad): [1, 0, 0]   query 1: [0, 1, 0]   query 2: [0, 1, 1]
    """
    S = key_mask.shape[1]
    key_index = torch.arange(S, device=key_mask.device)  # (S,)
    query_index = key_index[S - num_queries :, None]  # (T, 1)
    causal = key_index[None, :] <= query_index  # (T, S)
    visible = causal[None] & key_mask[:, None, :].bool()  # (B, T, S)
    visible |= key_index[None, :] == query_index  # (B, T, S)
    return visible[:, None]  # (B, 1, T, S)


def attention_bias(key_mask, num_queries, groups, dtype):
    """Additive SDPA mask (B, 1, G * T, S) for attention with the G query heads of a KV head folded.

    0 where attention_mask_4d is True, -inf elsewhere; its T query rows are repeated G times (row
    g * T + t is query t), matching Attention's fold of (B, H, T, D) queries into (B, KV, G * T, D).
    Built once per forward and shared by every layer: SDPA would otherwise convert a boolean mask
    anew in each layer (and keep each copy for backward). The key axis is allocated padded to a
    multiple of 16 and sliced back to S, the alignment CUDA's memory-efficient kernel wants (it
    pads a misaligned mask itself, again once per layer). Example, G = 2, T = 1, key_mask [[0, 1]]:
        [[[[-inf, 0], [-inf, 0]]]]
    """
    visible = attention_mask_4d(key_mask, num_queries).repeat(1, 1, groups, 1)  # (B, 1, G*T, S)
    B, _, GT, S = visible.shape
    bias = torch.zeros(B, 1, GT, -(-S // 16) * 16, device=key_mask.device, dtype=dtype)[..., :S]  # (B, 1, G*T, S)
    return bias.masked_fill_(~visible, float("-inf"))


class Qwen3(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False  # recompute each layer in backward (non-reentrant)

    def forward(self, input_ids, attention_mask=None, kv_cache=None, position_ids=None, compute_dtype=None):
        """Last hidden states after the final norm.

        input_ids (B, T). attention_mask (B, S): 1 for real tokens; with a cache it covers the cached
        slots and the new ones (S = cache.length + T), else S = T. It may instead be a ready additive
        bias (B, 1, G * T or 1, S) as attention_bias builds it, used as is (the sampler's decode
        steps update one in place). position_ids (B, T): each token's position, counted from
        attention_mask when not given (required with a ready bias). compute_dtype: the activations'
        dtype (default: the weights'); float32 on a bf16 model upcasts each weight as it is used.
        Returns (B, T, hidden).
        """
        B, T = input_ids.shape
        static = kv_cache is not None and kv_cache.slot is not None  # generate(compile=True)'s decode step
        past = kv_cache.length if kv_cache is not None and not static else 0
        x = self.model.embed_tokens(input_ids).to(compute_dtype or self.model.embed_tokens.weight.dtype)  # (B, T, hidden)
        groups = self.config.num_attention_heads // self.config.num_key_value_heads
        if attention_mask is None:
            mask = None if kv_cache is None or T == 1 else attention_bias(torch.ones(B, past + T, device=input_ids.device), T, groups, x.dtype)
            if position_ids is None:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)  # (B, T)
        elif attention_mask.dim() == 4:
            if position_ids is None:
                raise ValueError("a ready 4D attention bias needs position_ids (they cannot be counted from it)")
            mask = attention_mask  # (B, 1, G*T or 1, S)
        else:
            mask = attention_bias(attention_mask, T, groups, x.dtype)  # (B, 1, G*T, S)
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]  # (B, T) per-row positions
        if kv_cache is not None:
            cos, sin = kv_cache.cos[position_ids], kv_cache.sin[position_ids]  # (B, T, D) looked up
        else:
            cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)  # (B, T, D)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, kv_cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv_cache)
        if kv_cache is not None and not static:
            kv_cache.length += T
        return self.model.norm(x)  # (B, T, hidden)

    @classmethod
    def from_pretrained(cls, path_or_hub_id, device=None, dtype=None):
        """Load a checkpoint directory (or a Hugging Face hub id) straight onto `device` in `dtype`.

        dtype defaults to the checkpoint's own (`torch_dtype` in config.json), device to the CPU.
        """
        directory = resolve_checkpoint(path_or_hub_id)
        config = Qwen3Config.from_json(directory / "config.json")
        device = torch.device(device or "cpu")
        dtype = dtype or getattr(torch, config.torch_dtype)
        with torch.device("meta"):
            model = cls(config)
        load_weights(model, directory, device, dtype)
        return model.eval()


# ----------------------------------------------------------------------------------------------
# Loading


def resolve_checkpoint(path_or_hub_id):
    """A local directory as is; otherwise a hub id, fetched with huggingface_hub (json and safetensors only)."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(path_or_hub_id).count("/") != 1 or str(path_or_hub_id).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{path_or_hub_id}: not a checkpoint directory (expected a folder with config.json and *.safetensors, or a hub id like Qwen/Qwen3-1.7B-Base)")
    from huggingface_hub import snapshot_download

    print(f"{path_or_hub_id}: no such local directory ({path.resolve()}); fetching it from the Hugging Face hub", flush=True)
    try:
        return Path(snapshot_download(str(path_or_hub_id), allow_patterns=["*.json", "*.safetensors"]))
    except Exception as err:
        raise OSError(
            f"{path_or_hub_id!r} is not a local directory ({path.resolve()} does not exist), and the Hugging Face hub "
            f"could not fetch it as a model id ({type(err).__name__}: {err}). A typo in a path? Offline? Download it "
            "on a connected machine (huggingface-cli download <id>) and pass the local directory, or set "
            "HF_HUB_OFFLINE=1 to use the local cache."
        ) from None


def checkpoint_files(directory):
    """{file: names its index assigns to it, or None without an index}: `model.safetensors`, or the shards of its index."""
    index_path = directory / "model.safetensors.index.json"
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError(f"weight_map is a {type(weight_map).__name__}")
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index_path}: expected JSON with a 'weight_map' object ({err})") from None
        files = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
                raise ValueError(f"{index_path}: shard name {shard!r} must be a plain file name inside {directory}")
            files.setdefault(directory / shard, set()).add(name)
        files = dict(sorted(files.items()))
    else:
        files = {directory / "model.safetensors": None}
    for file in files:
        if not file.exists():
            raise FileNotFoundError(f"{file}: missing weights file" + (f" (listed in {index_path.name})" if index_path.exists() else ""))
        with open(file, "rb") as handle:
            if handle.read(40).startswith(b"version https://git-lfs"):
                raise ValueError(f"{file}: this is a git-lfs pointer, not weights; run `git lfs pull` in {directory} or download the real file")
    return files


def some_names(names, shown=5):
    names = sorted(names)
    return f"{names[:shown]}{' ...' if len(names) > shown else ''} ({len(names)} in all)"


def load_weights(model, directory, device, dtype):
    """Read every tensor onto `device` as `dtype`, strictly: names, shapes and float dtypes must match the model,
    each name in exactly one file (the one the index names).

    Tensors are read one at a time from memory-mapped files, so host memory stays near one tensor
    beyond the weights themselves. A tied checkpoint (tie_word_embeddings true) uses the embedding as
    lm_head; a tied file that stores a different `lm_head.weight` is refused, and an untied config
    (transformers' default when the key is missing) needs `lm_head.weight` in the files.
    """
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}  # tied lm_head appears once
    tied = model.config.tie_word_embeddings
    loaded, found_in, unexpected, stored_head = {}, {}, [], None
    for file, assigned in checkpoint_files(directory).items():
        try:
            reader = safe_open(file, framework="pt", device="cpu")
        except Exception as err:  # empty, truncated, HTML error page, ...
            raise ValueError(f"{file}: not a readable safetensors file ({type(err).__name__}: {err})") from None
        with reader:
            names = set(reader.keys())
            if assigned is not None and names != assigned:
                wrong = (names - assigned) | (assigned - names)
                raise ValueError(f"{file}: its tensors differ from what model.safetensors.index.json assigns to it: {some_names(wrong)}")
            for name in sorted(names):
                if name in found_in:
                    raise ValueError(f"{file}: tensor {name!r} is also in {found_in[name]}; each tensor must be in one file")
                found_in[name] = file
                if name not in expected and not (tied and name == "lm_head.weight"):
                    unexpected.append(name)
                    continue
                tensor_slice = reader.get_slice(name)
                if not tensor_slice.get_dtype().startswith(("F", "BF")):
                    raise ValueError(f"{file}: tensor {name!r} has dtype {tensor_slice.get_dtype()}, expected floating point weights")
                shape = tuple(tensor_slice.get_shape())
                wanted = expected["model.embed_tokens.weight" if name == "lm_head.weight" and tied else name]
                if shape != wanted:
                    raise ValueError(f"{file}: tensor {name!r} has shape {shape}, expected {wanted} from config.json")
                if tied and name == "lm_head.weight":
                    stored_head = (file, reader.get_tensor(name))
                else:
                    loaded[name] = reader.get_tensor(name).to(device=device, dtype=dtype)
    if unexpected:
        raise ValueError(f"{directory}: unexpected tensor(s) {some_names(unexpected)}; is this a Qwen3 checkpoint? "
                         "(expected names like model.layers.0.self_attn.q_proj.weight)")
    missing = set(expected) - set(loaded)
    if missing:
        hint = (" config.json says the head is untied (tie_word_embeddings is false or missing, as in transformers), "
                "but the files hold no lm_head.weight" if missing == {"lm_head.weight"} else "")
        raise ValueError(f"{directory}: missing tensor(s) {some_names(missing)}.{hint}")
    if stored_head is not None:
        file, head = stored_head
        if not torch.equal(head.to(device=device, dtype=dtype), loaded["model.embed_tokens.weight"]):
            raise ValueError(f"{file}: config.json ties lm_head to the embedding (tie_word_embeddings true), but the file holds "
                             "a different lm_head.weight; set tie_word_embeddings false if the head is its own")
    for name, tensor in loaded.items():
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, nn.Parameter(tensor))
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight


# ----------------------------------------------------------------------------------------------
# Tokenizer


@dataclass
class Tokenizer:
    """A `tokenizers.Tokenizer` with the checkpoint's special ids.

    Qwen3 base models stop on `<|endoftext|>`, which is also their pad token. `vocab_size` counts the
    real ids (151,669 for Qwen3); the embedding has more rows (151,936), which are never sampled.
    """

    tokenizer: object
    eos_token_id: int
    pad_token_id: int
    vocab_size: int

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(path_or_hub_id):
    """Load `tokenizer.json`; EOS from the checkpoint's config.json when present, else `<|endoftext|>`."""
    from tokenizers import Tokenizer as HFTokenizer

    directory = resolve_checkpoint(path_or_hub_id)
    file = directory / "tokenizer.json"
    if not file.exists():
        raise FileNotFoundError(f"{file}: no tokenizer.json in the checkpoint directory")
    tokenizer = HFTokenizer.from_file(str(file))
    eos_token_id = tokenizer.token_to_id("<|endoftext|>")
    if (directory / "config.json").exists():
        configured = json.loads((directory / "config.json").read_text()).get("eos_token_id")
        eos_token_id = configured[0] if isinstance(configured, list) else configured if configured is not None else eos_token_id
    if eos_token_id is None:
        raise ValueError(f"{directory}: no eos_token_id in config.json and no <|endoftext|> token in {file.name}")
    return Tokenizer(tokenizer, eos_token_id, eos_token_id, tokenizer.get_vocab_size(with_added_tokens=True))


# ----------------------------------------------------------------------------------------------
# Log-probabilities and sampling


def token_logprobs(logits, tokens):
    """log pi(token) and the entropy of pi, in fp32: the one helper for the sampler and training.

    logits (..., V), tokens (...) -> logprobs (...), entropies (...).
    """
    logits = logits.float()
    log_normaliser = logits.logsumexp(dim=-1)  # (...)
    logprobs = logits.gather(-1, tokens[..., None]).squeeze(-1) - log_normaliser  # (...)
    entropies = log_normaliser - (logits.softmax(dim=-1) * logits).sum(dim=-1)  # (...) H = logZ - E[logit]
    return logprobs, entropies


UNIFORMS_PER_DRAW = 4  # pre-drawn uniforms per row and token: 3 rejection rounds, then the sorting sampler


def draw_from_cumulative(cumulative, total, generator=None, uniforms=None):
    """Inverse-CDF draw: the first index whose cumulative mass exceeds u, u uniform in [0, total).

    cumulative (B, V) nondecreasing, total (B, 1) -> (B, 1). Index i is drawn with probability
    (cumulative[i] - cumulative[i - 1]) / total when total <= cumulative[-1]; one uniform number
    per row (uniforms (B,) when given, else drawn from generator) and a binary search.
    """
    u = torch.rand(total.shape, device=total.device, generator=generator) if uniforms is None else uniforms[:, None]  # (B, 1)
    return torch.searchsorted(cumulative, u * total, right=True)  # (B, 1)


def sample_top_p_sorted(probs, top_p, generator=None, uniforms=None):
    """Top-p by sorting the vocabulary (any device, no host sync): the reference.

    probs (B, V) -> tokens (B,); top_p a float or a 0-d tensor. Kept: the tokens whose strictly
    likelier mass, cumulative[i - 1], is below p, i.e. the count of cumulative < p plus the token
    that crosses p. The sort is stable: tokens of equal probability stay in id order.
    """
    probs, ids = probs.sort(dim=-1, descending=True, stable=True)  # (B, V)
    cumulative = probs.cumsum(dim=-1)  # (B, V) nondecreasing
    kept = ((cumulative < top_p).sum(dim=-1, keepdim=True) + 1).clamp(max=probs.shape[-1])  # (B, 1) tokens kept
    choice = draw_from_cumulative(cumulative, cumulative.gather(-1, kept - 1), generator, uniforms)  # (B, 1)
    return ids.gather(-1, choice.clamp(max=kept - 1)).squeeze(-1)  # (B,)


def sample_top_k_top_p(logits, top_k, top_p, generator=None, uniforms=None):
    """Top-k then top-p without sorting the vocabulary: the same tokens, for the same uniforms, as
    sample_top_p_sorted(top_k_filter(logits, top_k).softmax(-1), top_p), which sorts all of it.

    logits (B, V), already divided by the temperature -> tokens (B,); top_p a float or a 0-d tensor.
    Only the k candidates of `topk` are sorted. Every token tied with the k-th largest logit is kept,
    as top_k_filter keeps it, and such tokens come last, in id order, as the stable sort puts them:
    the draw runs over [the candidates above the k-th value, by probability; the tied ones, by id].
    Example, logits [[3, 1, 2, 2]], top_k 2: kept 3 (id 0) then the tie 2, 2 (ids 2, 3).
    """
    values, ids = logits.topk(top_k, dim=-1)  # (B, k), descending
    kth = values[:, -1:]  # (B, 1) the k-th largest logit
    probs = torch.where(logits >= kth, logits, float("-inf")).softmax(dim=-1)  # (B, V) top_k_filter's distribution
    ids, order = ids.sort(dim=-1)  # by id, then a stable sort by value: ties in id order
    values, order = values.gather(-1, order).sort(dim=-1, descending=True, stable=True)  # (B, k)
    ids = ids.gather(-1, order)  # (B, k)
    head = torch.where(values > kth, probs.gather(-1, ids), 0.0)  # (B, k) the candidates above the k-th value
    tied = torch.where(logits == kth, probs, 0.0)  # (B, V) the k-th value's tokens, in id order
    cumulative = torch.cat([head, tied], dim=-1).cumsum(dim=-1)  # (B, k + V): the sorted cumulative, with zeros between
    kept = ((cumulative < top_p).sum(dim=-1, keepdim=True) + 1).clamp(max=cumulative.shape[-1])  # (B, 1)
    choice = draw_from_cumulative(cumulative, cumulative.gather(-1, kept - 1), generator, uniforms).clamp(max=kept - 1)  # (B, 1)
    head_token = ids.gather(-1, choice.clamp(max=top_k - 1))  # (B, 1)
    return torch.where(choice < top_k, head_token, choice - top_k).squeeze(-1)  # (B,) a tied token's position is its id


def sample_top_p_by_rejection(probs, top_p, generator=None, max_rounds=64, uniforms=None):
    """Top-p without sorting the vocabulary, exact: the path used on the CPU, where a sort is slow.

    probs (B, V) -> tokens (B,). Draw a token from probs restricted to the tokens above a floor
    (at first 0). It is in the nucleus iff the mass of strictly likelier tokens is below p; if it
    is not, no token as unlikely is either, so the floor rises to its probability and the row
    draws again. The nucleus is always above the floor, so an accepted draw has exactly the
    distribution of probs restricted to the nucleus; the most likely token is always accepted.
    A round is three passes over the vocabulary (a sort costs ~50 on the CPU); at p = 0.95 a
    row is accepted in the first round with probability >= 0.95. Reading back which rows are
    still drawing syncs with the device, free on the CPU but not on a GPU. A drawn token with no
    likelier token is always accepted (so p = 0 keeps the top token), and rows still drawing after
    max_rounds (only NaN probabilities get there) go to the sorting sampler: it never loops forever.
    With pre-drawn uniforms (B, U), round r uses column r and the sorting sampler the last one
    (so max_rounds is U - 1): an accepted draw is a nucleus draw in every round, so it stays exact.
    """
    tokens = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)  # (B,)
    rows = torch.arange(probs.shape[0], device=probs.device)  # (R,) rows still drawing
    floor = torch.zeros(probs.shape[0], 1, device=probs.device)  # (R, 1)
    max_rounds = max_rounds if uniforms is None else uniforms.shape[1] - 1
    for round_index in range(max_rounds):
        if not len(rows):
            return tokens
        cumulative = torch.where(probs > floor, probs, 0.0).cumsum(dim=-1)  # (R, V)
        u = None if uniforms is None else uniforms[rows, round_index]  # (R,)
        draw = draw_from_cumulative(cumulative, cumulative[:, -1:], generator, u).clamp(max=probs.shape[-1] - 1)  # (R, 1)
        drawn_prob = probs.gather(-1, draw)  # (R, 1)
        likelier = torch.where(probs > drawn_prob, probs, 0.0).sum(dim=-1)  # (R,) mass of strictly likelier tokens
        accepted = (likelier < top_p) | (likelier == 0)  # (R,)
        tokens[rows[accepted]] = draw[accepted, 0]
        floor = torch.maximum(floor, drawn_prob)[~accepted]  # (R', 1)
        rows, probs = rows[~accepted], probs[~accepted]  # (R',), (R', V)
    if len(rows):
        tokens[rows] = sample_top_p_sorted(probs, top_p, generator, None if uniforms is None else uniforms[rows, -1])
    return tokens


def top_k_filter(logits, top_k):
    """Logits (B, V) with every token below the k-th largest of its row set to -inf (ties with the
    k-th kept, as transformers' TopKLogitsWarper does). top_k 0 or >= V: unchanged.

    logits [[1.0, 3.0, 2.0, 0.5]], top_k 2 -> [[-inf, 3.0, 2.0, -inf]]
    """
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth_largest = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))  # (B, V)


def sample_next_token(logits, temperature, top_p, generator=None, top_k=0, uniforms=None):
    """One token per row from fp32 logits (B, V): greedy at temperature 0, else temperature, then
    top-k, then top-p, in the order of transformers' sampling warpers.

    Top-k keeps the k most likely tokens (0: all; ties with the k-th kept). Top-p then keeps the
    smallest set of the most likely remaining tokens whose mass reaches p, including the token that
    crosses p (and any token tied with it, on the CPU). Example, probs [0.5, 0.3, 0.2], p = 0.6:
    keeps 0.5 and 0.3. With p >= 1 every token top-k left is kept and nothing is sorted. On the CPU
    top-p draws by rejection (no sort); elsewhere from the top-k candidates (sample_top_k_top_p), or
    by sorting when top-k is off. uniforms (B, UNIFORMS_PER_DRAW): pre-drawn random numbers for this
    token instead of the generator (see generate).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,)
    logits = logits / temperature
    u = None if uniforms is None else uniforms[:, 0]
    if top_p >= 1:
        cumulative = top_k_filter(logits, top_k).softmax(dim=-1).cumsum(dim=-1)  # (B, V)
        return draw_from_cumulative(cumulative, cumulative[:, -1:], generator, u).clamp(max=logits.shape[-1] - 1).squeeze(-1)  # (B,)
    if logits.device.type == "cpu":
        return sample_top_p_by_rejection(top_k_filter(logits, top_k).softmax(dim=-1), top_p, generator, uniforms=uniforms)
    if 0 < top_k < logits.shape[-1]:
        return sample_top_k_top_p(logits, top_k, top_p, generator, u)
    return sample_top_p_sorted(logits.softmax(dim=-1), top_p, generator, u)


def next_token_logits(model, hidden, vocab_size):
    """fp32 logits (B, V) from the last hidden states (B, H); rows past the tokenizer's vocab_size real ids at -inf."""
    logits = model.lm_head(hidden).float()  # (B, V)
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits[:, vocab_size:] = float("-inf")
    return logits


def drawn_logprob(logits, token):
    """log pi(token) (B,) under the untempered logits (B, V): token_logprobs' formula without its entropy pass."""
    return logits.gather(-1, token[:, None]).squeeze(-1) - logits.logsumexp(dim=-1)


def pack_prompts(prompts, device):
    """Left-padded prompt ids and their mask (B, P), laid out on the host and copied to the device once.
    [[5, 6], [7]] -> ids [[5, 6], [0, 7]], mask [[1, 1], [0, 1]]."""
    P = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), P, dtype=torch.long)  # (B, P)
    mask = torch.zeros(len(prompts), P, dtype=torch.bool)  # (B, P)
    for row, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {row} is empty; every prompt needs at least one token")
        ids[row, P - len(prompt) :] = torch.tensor(prompt)
        mask[row, P - len(prompt) :] = True
    return ids.to(device), mask.to(device)


def prefill(model, prompts, samples_per_prompt, cache):
    """The prompts' keys and values into `cache` (B = prompts x K rows, row p * K + k is prompt p's), each
    distinct prompt computed once and copied to its K rows; returns the last hidden states (B, H)."""
    device, K = model.lm_head.weight.device, samples_per_prompt
    prompt_ids, prompt_mask = pack_prompts(prompts, device)  # (B / K, P)
    if K == 1:
        return model(prompt_ids, prompt_mask, kv_cache=cache)[:, -1]  # (B, hidden): the last slot is real in every row
    shared = KVCache.allocate(model.config, len(prompts), prompt_ids.shape[1], device, cache.keys[0].dtype)
    hidden = model(prompt_ids, prompt_mask, kv_cache=shared)[:, -1]  # (B / K, hidden)
    for layer in range(model.config.num_hidden_layers):
        cache.keys[layer][:, :, : shared.length] = shared.keys[layer].repeat_interleave(K, dim=0)  # (B, KV, P, D)
        cache.values[layer][:, :, : shared.length] = shared.values[layer].repeat_interleave(K, dim=0)
    cache.length = shared.length
    return hidden.repeat_interleave(K, dim=0)  # (B, hidden)


@torch.no_grad()
def generate(model, prompts, max_new_tokens, *, temperature, top_p, eos_token_id, generator=None,
             vocab_size=None, return_logprobs=False, check_every=8, top_k=0, row_generators=None, samples_per_prompt=1,
             compile=False):
    """Sample completions for a batch of prompts of different lengths.

    prompts: list of token-id lists. eos_token_id: an id or a list of ids that end a completion (an empty list: none does).
    vocab_size: the tokenizer's number of real ids; embedding rows past it are never sampled.
    temperature, top_k, top_p: see sample_next_token (temperature 0: greedy).
    row_generators: one torch.Generator per row instead of `generator`; each row's random numbers are
    drawn from its own up front (max_new_tokens x UNIFORMS_PER_DRAW), so a row's completion does not
    depend on which other rows share its batch (or its process, in a distributed run).
    samples_per_prompt: K completions of each prompt, rows p * K .. p * K + K - 1: each distinct
    prompt is prefilled once and its K/V copied to its K rows (as GRPO's groups and pass@k need).
    compile: the fast path, generate_compiled (a static-shape decode step under torch.compile, CUDA
    graphs on a GPU); greedy tokens equal this path's, sampled ones are the sorted sampler's draws.
    Returns tokens (B, N) and mask (B, N), N <= max_new_tokens: mask is True up to and including a
    row's first EOS, False after it (those slots hold the EOS id). With return_logprobs, also the
    fp32 log-probs (B, N) of the drawn tokens under the untempered model distribution (what the
    training forward recomputes).

    Example, eos 0, max_new_tokens 4: a row drawing 5, 0 then stops -> tokens [5, 0, 0, 0],
    mask [1, 1, 0, 0]; a row drawing 7, 8, 9, 6 -> mask [1, 1, 1, 1] (truncated, no EOS).

    Per decode step the loop does no work that does not depend on the step: the cache holds the
    rotary table, the attention bias is one buffer whose next slot is opened in place, positions
    are the prompt lengths plus the step. It reads the device once every check_every steps (have
    all rows stopped?). It runs under inference_mode (no autograd bookkeeping at all); every tensor
    it returns was allocated outside it, so they are ordinary tensors that a training forward may use.
    """
    if compile:
        return generate_compiled(model, prompts, max_new_tokens, temperature=temperature, top_p=top_p, eos_token_id=eos_token_id,
                                 generator=generator, vocab_size=vocab_size, return_logprobs=return_logprobs, check_every=check_every,
                                 top_k=top_k, row_generators=row_generators, samples_per_prompt=samples_per_prompt)
    device = model.lm_head.weight.device
    eos_list = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    eos_ids, fill_id = torch.tensor(eos_list, device=device), eos_list[0] if eos_list else 0  # fill_id: what finished rows hold
    K, P = samples_per_prompt, max(len(p) for p in prompts)
    B = len(prompts) * K
    cache = KVCache.allocate(model.config, B, P + max_new_tokens, device, model.lm_head.weight.dtype)
    row_prompt_mask = pack_prompts(prompts, device)[1].repeat_interleave(K, dim=0)  # (B, P) real prompt slots
    # Decode-step attention bias (B, 1, 1, S): 0 on real slots, -inf on padding and on slots not yet
    # written. One query row broadcasts over the G folded heads; keys padded to 16 (see attention_bias).
    key_bias = torch.full((B, 1, 1, -(-(P + max_new_tokens) // 16) * 16), float("-inf"), device=device, dtype=cache.keys[0].dtype)
    key_bias[:, 0, 0, :P].masked_fill_(row_prompt_mask, 0.0)
    first_position = row_prompt_mask.sum(dim=1, keepdim=True)  # (B, 1) position of each row's first new token
    tokens = torch.full((B, max_new_tokens), fill_id, dtype=torch.long, device=device)  # (B, N)
    mask = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=device)  # (B, N)
    logprobs = torch.zeros(B, max_new_tokens, device=device)  # (B, N)
    finished = torch.zeros(B, dtype=torch.bool, device=device)  # (B,)
    uniforms = None
    if row_generators is not None and temperature > 0:
        uniforms = torch.stack([torch.rand(max_new_tokens, UNIFORMS_PER_DRAW, generator=g, device=g.device) for g in row_generators]).to(device)  # (B, N, U)

    with torch.inference_mode():
        hidden = prefill(model, prompts, K, cache)  # (B, hidden)
        for step in range(max_new_tokens):
            logits = next_token_logits(model, hidden, vocab_size)  # (B, V)
            next_token = sample_next_token(logits, temperature, top_p, generator, top_k, None if uniforms is None else uniforms[:, step])  # (B,)
            next_token = next_token.masked_fill(finished, fill_id)  # (B,)
            tokens[:, step] = next_token
            mask[:, step] = ~finished
            if return_logprobs:
                logprobs[:, step] = drawn_logprob(logits, next_token)
            if len(eos_ids):
                finished |= torch.isin(next_token, eos_ids)
            if step + 1 == max_new_tokens or ((step + 1) % check_every == 0 and bool(finished.all())):
                break
            key_bias[..., P + step] = 0.0  # the slot this token is written to
            hidden = model(next_token[:, None], key_bias[..., : P + step + 1], kv_cache=cache,
                           position_ids=first_position + step)[:, -1]  # (B, hidden)
    return trim(tokens, mask, logprobs, return_logprobs)


def trim(tokens, mask, logprobs, return_logprobs):
    """Drop trailing slots that no row used."""
    steps = int(mask.sum(dim=1).max())
    tokens, mask, logprobs = tokens[:, :steps], mask[:, :steps], logprobs[:, :steps] * mask[:, :steps]
    return (tokens, mask, logprobs) if return_logprobs else (tokens, mask)


# ----------------------------------------------------------------------------------------------
# The fast path: a static-shape decode step under torch.compile (CUDA graphs on a GPU)
#
# One compiled graph per (greedy or sampling, batch bucket, cache-length bucket): batches are padded
# to a power of two and caches to a multiple of CACHE_BUCKET slots, so a paper run compiles a handful
# of graphs (rollouts of 32, evaluation batches of 64 and their tail) and reuses them every step.
# Temperature and top-p are tensor inputs, not constants: changing them recompiles nothing. The
# tensors the step writes in place (each layer's K and V, the attention bias) and reads (the rotary
# table, the LoRA sampling copies) stay at the same addresses between calls (DecodeBuffers, kept on
# the model), so a CUDA graph is recorded once per bucket and then replayed.

COMPILE_MIN_TORCH = (2, 6)  # torch.compile features the fast path needs (static addresses, cudagraph step marks, recompile limits)
CACHE_BUCKET = 256  # cache lengths are multiples of this
MAX_GRAPHS = 64  # compiled graphs of the decode step before torch.compile refuses (an error, never a silent eager fallback)


def batch_bucket(rows):
    """The compiled step's batch size for `rows` rows: the next power of two. 3 -> 4, 32 -> 32, 33 -> 64."""
    return 1 << (rows - 1).bit_length()


class DecodeBuffers:
    """The compiled decode step's state, kept on the model so that every call of a bucket reads and
    writes the same addresses: per layer one K and one V arena, one attention-bias arena and the
    rotary table, each as large as the largest bucket used so far. A bucket's cache is made of views
    of the arenas' first elements, built once and reused. Growing the arenas (a larger bucket) moves
    them, so each graph is recorded again once. The arenas start at zero and unwritten slots are
    masked, so values left by an earlier call are never read."""

    def __init__(self, config, device, dtype):
        self.config, self.device, self.dtype = config, device, dtype
        self.capacity = self.length = 0  # elements per K/V arena; rotary table length
        self.caches = {}  # (batch, length) -> (KVCache, key_bias (batch, 1, 1, length))

    def get(self, batch, length):
        config = self.config
        width = -(-length // 16) * 16  # the bias's key axis, padded as attention_bias pads it
        per_layer = batch * config.num_key_value_heads * length * config.head_dim
        if per_layer > self.capacity or length > self.length:
            self.capacity, self.length = max(per_layer, self.capacity), max(length, self.length)
            self.keys = [torch.zeros(self.capacity, device=self.device, dtype=self.dtype) for _ in range(config.num_hidden_layers)]
            self.values = [torch.zeros(self.capacity, device=self.device, dtype=self.dtype) for _ in range(config.num_hidden_layers)]
            self.bias = torch.zeros(self.capacity, device=self.device, dtype=self.dtype)  # >= batch * width: head_dim >= 16
            positions = torch.arange(self.length, device=self.device)[None]  # (1, S)
            self.cos, self.sin = (t[0] for t in rotary_cos_sin(positions, config.head_dim, config.rope_theta, self.dtype))  # (S, D)
            self.caches = {}
        if (batch, length) not in self.caches:
            shape = (batch, config.num_key_value_heads, length, config.head_dim)
            cache = KVCache([k[:per_layer].view(shape) for k in self.keys], [v[:per_layer].view(shape) for v in self.values],
                            self.cos[:length], self.sin[:length])
            key_bias = self.bias[: batch * width].view(batch, 1, 1, width)[..., :length]  # (B, 1, 1, S)
            for tensor in (*cache.keys, *cache.values, cache.cos, cache.sin, key_bias):
                torch._dynamo.mark_static_address(tensor)  # a CUDA graph may write them in place
            self.caches[batch, length] = cache, key_bias
        return self.caches[batch, length]


def decode_step(model, hidden, finished, uniforms, position, cache, key_bias, eos_ids, fill_id, temperature, top_p, top_k,
                vocab_size, greedy):
    """generate's loop body with static shapes, for torch.compile: one token per row from `hidden`
    (B, H), then the forward of that token with its K/V written at cache.slot (a device tensor).

    No Python number is read from a tensor, the cache and key_bias (B, 1, 1, S) keep their full
    length S (unwritten slots are -inf in key_bias), the random numbers are pre-drawn (uniforms
    (B, UNIFORMS_PER_DRAW)), temperature and top_p are 0-d tensors, and top-p draws from the top-k
    candidates (or sorts, without top-k): no rejection loop. Returns (token (B,), its log-prob (B,),
    finished (B,), the next hidden (B, H)).
    """
    logits = next_token_logits(model, hidden, vocab_size)  # (B, V)
    if greedy:
        token = logits.argmax(dim=-1)  # (B,)
    elif 0 < top_k < logits.shape[-1]:
        token = sample_top_k_top_p(logits / temperature, top_k, top_p, uniforms=uniforms[:, 0])  # (B,)
    else:
        token = sample_top_p_sorted((logits / temperature).softmax(dim=-1), top_p, uniforms=uniforms[:, 0])  # (B,)
    token = token.masked_fill(finished, fill_id)  # (B,)
    logprob = drawn_logprob(logits, token)  # (B,)
    finished = finished | torch.isin(token, eos_ids)  # (B,)
    key_bias.index_fill_(-1, cache.slot, 0.0)  # open the slot this token is written to
    hidden = model(token[:, None], key_bias, kv_cache=cache, position_ids=position)[:, -1]  # (B, H)
    return token, logprob, finished, hidden


_compiled_decode_step = None  # torch.compile(decode_step), built on first use and kept: its compilations are reused


def compiled_decode_step(device):
    global _compiled_decode_step
    if tuple(int(part) for part in torch.__version__.split(".")[:2]) < COMPILE_MIN_TORCH:
        raise RuntimeError(f"--compile needs torch >= {'.'.join(map(str, COMPILE_MIN_TORCH))}, this is {torch.__version__}; "
                           "upgrade torch or run without --compile (the eager path computes the same completions)")
    if _compiled_decode_step is None:
        mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs on a GPU, inductor's default on a CPU
        _compiled_decode_step = torch.compile(decode_step, fullgraph=True, dynamic=False, mode=mode)
    return _compiled_decode_step


@torch.no_grad()
def generate_compiled(model, prompts, max_new_tokens, *, temperature, top_p, eos_token_id, generator=None, vocab_size=None,
                      return_logprobs=False, check_every=8, top_k=0, row_generators=None, samples_per_prompt=1):
    """generate(..., compile=True): the same contract as generate, through the compiled decode_step.

    The B rows are padded to batch_bucket(B) (the padding rows repeat row 0 and start finished) and
    the cache to a multiple of CACHE_BUCKET slots, in DecodeBuffers' tensors. Greedy tokens equal
    the eager path's; sampled tokens are sample_top_p_sorted's (or sample_top_k_top_p's, the same)
    for pre-drawn uniforms, which the eager CPU path, drawing by rejection, spends differently.
    """
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    step_fn = compiled_decode_step(device)
    eos_list = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    eos_ids, fill_id = torch.tensor(eos_list, device=device), eos_list[0] if eos_list else 0
    K, P = samples_per_prompt, max(len(p) for p in prompts)
    B = len(prompts) * K
    rows, length = batch_bucket(B), -(-(P + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET
    if getattr(model, "decode_buffers", None) is None or model.decode_buffers.dtype != dtype:
        model.decode_buffers = DecodeBuffers(model.config, device, dtype)
    cache, key_bias = model.decode_buffers.get(rows, length)
    cache.length = 0
    with torch.inference_mode():
        hidden = prefill(model, prompts, K, KVCache([k[:B] for k in cache.keys], [v[:B] for v in cache.values], cache.cos, cache.sin))
        for keys, values in zip(cache.keys, cache.values):  # padding rows: row 0's prompt
            keys[B:], values[B:] = keys[:1], values[:1]
    hidden = torch.cat([hidden, hidden[:1].expand(rows - B, -1)]).contiguous()  # (rows, H)
    row_prompt_mask = pack_prompts(prompts, device)[1].repeat_interleave(K, dim=0)  # (B, P)
    row_prompt_mask = torch.cat([row_prompt_mask, row_prompt_mask[:1].expand(rows - B, -1)])  # (rows, P)
    key_bias.fill_(float("-inf"))
    key_bias[:, 0, 0, :P].masked_fill_(row_prompt_mask, 0.0)
    first_position = row_prompt_mask.sum(dim=1, keepdim=True)  # (rows, 1)
    finished = torch.arange(rows, device=device) >= B  # (rows,) the padding rows never sample
    uniforms = torch.zeros(max_new_tokens, rows, UNIFORMS_PER_DRAW, device=device)  # (N, rows, U): a step's (rows, U) has fixed strides
    if temperature > 0 and row_generators is not None:
        uniforms[:, :B] = torch.stack([torch.rand(max_new_tokens, UNIFORMS_PER_DRAW, generator=g, device=g.device) for g in row_generators], dim=1).to(device)
    elif temperature > 0:
        uniforms[:, :B] = torch.rand(B, max_new_tokens, UNIFORMS_PER_DRAW, generator=generator, device=device).transpose(0, 1)
    settings = dict(eos_ids=eos_ids, fill_id=fill_id, top_k=top_k, vocab_size=vocab_size, greedy=temperature == 0,
                    temperature=torch.tensor(float(temperature or 1.0), device=device), top_p=torch.tensor(float(min(top_p, 1.0)), device=device))
    tokens, logprobs, valid = [], [], []
    for step in range(max_new_tokens):
        cache.slot = torch.full((1,), P + step, dtype=torch.long, device=device)
        valid.append(~finished)
        torch.compiler.cudagraph_mark_step_begin()  # a CUDA graph's replay overwrites its last outputs: keep copies
        with torch._dynamo.config.patch(recompile_limit=MAX_GRAPHS, fail_on_recompile_limit_hit=True):
            outputs = step_fn(model, hidden, finished, uniforms[step], first_position + step, cache, key_bias, **settings)
        token, logprob, finished, hidden = (t.clone() for t in outputs)
        tokens.append(token)
        logprobs.append(logprob)
        if (step + 1) % check_every == 0 and bool(finished.all()):
            break
    cache.slot = None
    tokens, mask, logprobs = (torch.stack(t, dim=1)[:B] for t in (tokens, valid, logprobs))  # (B, N) each
    return trim(tokens, mask, logprobs, return_logprobs)
