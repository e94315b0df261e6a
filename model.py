"""Qwen3 in plain PyTorch: the model, its safetensors loader and its tokenizer.

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

Attention: with a padding mask, the G query heads that share a K/V head are folded into one
head's queries, so grouped-query attention runs without copying K/V and on a fused masked kernel;
the additive mask is built once per forward (`attention_bias`). Without a mask, SDPA's own GQA.
With a KV cache (sampling.py's, or compiled_decode.py's static one), each attention layer hands its
new keys and values to the cache and attends over what the cache returns.

Left out: sliding-window attention and rope scaling (no Qwen3 dense base model uses them; a config
asking for them is refused), dropout inside the base model (Qwen3 has none), and generation, which
lives in sampling.py (the eager loop) and compiled_decode.py (its static-shape fast path).
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
    # transformers' default when config.json leaves it out; Qwen3-1.7B-Base says true
    tie_word_embeddings: bool = False
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
            raise FileNotFoundError(f"{path}: no config.json here; "
                                    "a checkpoint directory needs one") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if raw.get("model_type") != "qwen3":
            raise ValueError(f"{path}: model_type is {raw.get('model_type')!r}, expected 'qwen3' (this "
                             "loader only knows Qwen3)")
        # transformers >= 5 writes `dtype` and `rope_parameters`; official Qwen3 files use `torch_dtype` and
        # `rope_theta`.
        if "dtype" in raw and "torch_dtype" not in raw:
            raw["torch_dtype"] = raw["dtype"]
        rope = raw.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default" or raw.get("rope_scaling"):
            raise ValueError(f"{path}: rope scaling {rope or raw.get('rope_scaling')} is not supported, only "
                             "plain RoPE")
        if "rope_theta" in rope and "rope_theta" not in raw:
            raw["rope_theta"] = rope["rope_theta"]
        if raw.get("use_sliding_window"):
            raise ValueError(f"{path}: use_sliding_window=true is not supported")
        names = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in raw.items() if k in names and v is not None})
        if config.num_attention_heads % config.num_key_value_heads:
            raise ValueError(f"{path}: num_attention_heads={config.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={config.num_key_value_heads}")
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


class InputDtypeLinear(nn.Linear):
    """nn.Linear computed in its input's dtype: a no-op cast for a bf16 input on bf16 weights; for an
    fp32 input the weight is upcast for this one matmul (the exact-ARCA passes, grpo.py), so fp32
    activations never need an fp32 copy of the model."""

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class Attention(nn.Module):
    def __init__(self, config, layer_index):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = InputDtypeLinear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = InputDtypeLinear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = InputDtypeLinear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = InputDtypeLinear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)  # per head, before RoPE
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, KV, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        q = apply_rotary(self.q_norm(q).transpose(1, 2), cos, sin)  # (B, H, T, D)
        k = apply_rotary(self.k_norm(k).transpose(1, 2), cos, sin)  # (B, KV, T, D)
        if cache is not None:  # this step's keys and values into the cache; attend over every slot it holds
            k, v = cache.update(self.layer_index, k, v)  # (B, KV, S, D) each
        if mask is None:  # plain causal attention, no padding: the flash kernel takes GQA as is
            gqa = self.num_heads != self.num_kv_heads
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)  # (B, H, T, D)
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
        self.gate_proj = InputDtypeLinear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = InputDtypeLinear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = InputDtypeLinear(config.intermediate_size, config.hidden_size, bias=False)

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


class DecoderStack(nn.Module):
    """The `model.` part of the checkpoint (transformers' Qwen3Model): embeddings, layers, final norm."""

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
    # (B, 1, G*T, S)
    bias = torch.zeros(B, 1, GT, -(-S // 16) * 16, device=key_mask.device, dtype=dtype)[..., :S]
    return bias.masked_fill_(~visible, float("-inf"))


class Qwen3(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        self.lm_head = InputDtypeLinear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False  # recompute each layer in backward (non-reentrant)

    def forward(self, input_ids, attention_mask=None, kv_cache=None, position_ids=None, compute_dtype=None):
        """Last hidden states (B, T, hidden) after the final norm.

        input_ids (B, T). attention_mask (B, S): 1 for real tokens, S = T, or with a KV cache the
        slots it holds and the new ones; or a ready additive bias (B, 1, G * T or 1, S) as
        attention_bias builds it (the decode loops keep one), used as is. position_ids (B, T): each
        token's position, counted from a (B, S) mask when not given (required with a ready bias).
        kv_cache: sampling.KVCache (or compiled_decode's static one): each layer writes its new
        keys and values to it and attends over what it holds; it also holds the rotary table.
        compute_dtype: the activations' dtype (default: the weights'); float32 on a bf16 model
        upcasts each weight as it is used.
        """
        B, T = input_ids.shape
        dtype = compute_dtype or self.model.embed_tokens.weight.dtype
        x = self.model.embed_tokens(input_ids).to(dtype)  # (B, T, hidden)
        groups = self.config.num_attention_heads // self.config.num_key_value_heads
        if attention_mask is not None and attention_mask.dim() == 4:
            if position_ids is None:
                raise ValueError("a ready 4D attention bias needs position_ids (they cannot be counted from "
                                 "it)")
            mask = attention_mask  # (B, 1, G*T or 1, S)
        elif attention_mask is not None:
            mask = attention_bias(attention_mask, T, groups, x.dtype)  # (B, 1, G*T, S)
            if position_ids is None:  # per-row positions, counted over the real tokens
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]  # (B, T)
        elif kv_cache is not None:
            raise ValueError("a forward with a KV cache needs an attention_mask over its filled slots "
                             "and the new ones")
        else:
            mask = None  # causal, no padding
            if position_ids is None:
                position_ids = torch.arange(T, device=input_ids.device).expand(B, T)  # (B, T)
        if kv_cache is not None:
            cos, sin = kv_cache.rotary(position_ids)  # (B, T, D) each, looked up in the cache's table
        else:
            cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, kv_cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
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
    """A local directory as is; otherwise a hub id, fetched with huggingface_hub (json and safetensors
    only)."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_hub_id)
    if path.exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):  # not a hub id
        raise FileNotFoundError(f"{path_or_hub_id}: not a checkpoint directory (expected a folder with "
                                "config.json and *.safetensors, or a hub id like Qwen/Qwen3-1.7B-Base)")
    from huggingface_hub import snapshot_download

    print(f"{path_or_hub_id}: no such local directory ({path.resolve()}); fetching it from the Hugging "
          "Face hub", flush=True)
    try:
        return Path(snapshot_download(str(path_or_hub_id), allow_patterns=["*.json", "*.safetensors"]))
    except Exception as err:
        raise OSError(
            f"{path_or_hub_id!r} is not a local directory ({path.resolve()} does not exist), and the Hugging "
            f"Face hub could not fetch it as a model id ({type(err).__name__}: {err}). A typo in a path? "
            "Offline? Download it on a connected machine (huggingface-cli download <id>) and pass the local "
            "directory, or set HF_HUB_OFFLINE=1 to use the local cache."
        ) from None


def checkpoint_files(directory):
    """{file: names its index assigns to it, or None without an index}: `model.safetensors`, or the shards of
    its index."""
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
                raise ValueError(f"{index_path}: shard name {shard!r} must be a plain file name inside "
                                 f"{directory}")
            files.setdefault(directory / shard, set()).add(name)
        files = dict(sorted(files.items()))
    else:
        files = {directory / "model.safetensors": None}
    for file in files:
        if not file.exists():
            listed = f" (listed in {index_path.name})" if index_path.exists() else ""
            raise FileNotFoundError(f"{file}: missing weights file{listed}")
        with open(file, "rb") as handle:
            if handle.read(40).startswith(b"version https://git-lfs"):
                raise ValueError(f"{file}: this is a git-lfs pointer, not weights; run `git lfs pull` in "
                                 f"{directory} or download the real file")
    return files


def some_names(names, shown=5):
    names = sorted(names)
    return f"{names[:shown]}{' ...' if len(names) > shown else ''} ({len(names)} in all)"


def load_weights(model, directory, device, dtype):
    """Read every tensor onto `device` as `dtype`, strictly: names, shapes and float dtypes must match the
    model, each name in exactly one file (the one the index names).

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
            raise ValueError(f"{file}: not a readable safetensors file "
                             f"({type(err).__name__}: {err})") from None
        with reader:
            names = set(reader.keys())
            if assigned is not None and names != assigned:
                wrong = (names - assigned) | (assigned - names)
                raise ValueError(f"{file}: its tensors differ from what model.safetensors.index.json assigns "
                                 f"to it: {some_names(wrong)}")
            for name in sorted(names):
                if name in found_in:
                    raise ValueError(f"{file}: tensor {name!r} is also in {found_in[name]}; each tensor must "
                                     "be in one file")
                found_in[name] = file
                if name not in expected and not (tied and name == "lm_head.weight"):
                    unexpected.append(name)
                    continue
                tensor_slice = reader.get_slice(name)
                if not tensor_slice.get_dtype().startswith(("F", "BF")):
                    raise ValueError(f"{file}: tensor {name!r} has dtype {tensor_slice.get_dtype()}, "
                                     "expected floating point weights")
                shape = tuple(tensor_slice.get_shape())
                wanted = expected["model.embed_tokens.weight" if name == "lm_head.weight" and tied else name]
                if shape != wanted:
                    raise ValueError(f"{file}: tensor {name!r} has shape {shape}, expected {wanted} from "
                                     "config.json")
                if tied and name == "lm_head.weight":
                    stored_head = (file, reader.get_tensor(name))
                else:
                    loaded[name] = reader.get_tensor(name).to(device=device, dtype=dtype)
    if unexpected:
        raise ValueError(f"{directory}: unexpected tensor(s) {some_names(unexpected)}; is this a Qwen3 "
                         "checkpoint? (expected names like model.layers.0.self_attn.q_proj.weight)")
    missing = set(expected) - set(loaded)
    if missing:
        hint = ""
        if missing == {"lm_head.weight"}:
            hint = (" config.json says the head is untied (tie_word_embeddings is false or missing, as in "
                    "transformers), but the files hold no lm_head.weight")
        raise ValueError(f"{directory}: missing tensor(s) {some_names(missing)}.{hint}")
    if stored_head is not None:
        file, head = stored_head
        if not torch.equal(head.to(device=device, dtype=dtype), loaded["model.embed_tokens.weight"]):
            raise ValueError(f"{file}: config.json ties lm_head to the embedding (tie_word_embeddings "
                             "true), but the file holds a different lm_head.weight; set tie_word_embeddings "
                             "false if the head is its own")
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
        if isinstance(configured, list):
            configured = configured[0]
        eos_token_id = configured if configured is not None else eos_token_id
    if eos_token_id is None:
        raise ValueError(f"{directory}: no eos_token_id in config.json and no <|endoftext|> token in "
                         f"{file.name}")
    return Tokenizer(tokenizer, eos_token_id, eos_token_id, tokenizer.get_vocab_size(with_added_tokens=True))

