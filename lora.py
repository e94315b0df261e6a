"""LoRA from scratch, with an adapter that switches off exactly, saved in PEFT's format.

Design (Hu et al. 2021, "LoRA"; initialisation and file layout as Hugging Face PEFT):
- `LoRALinear` wraps a frozen `nn.Linear` and adds a rank-r update:

      y = base(x) + (dropout(x) @ A^T @ B^T) * alpha / r      A: (r, in), B: (out, r)

  A is Kaiming-uniform (PEFT's default), B is zero, so a fresh adapter changes nothing.
  A and B are fp32 whatever the base dtype (the optimiser's master weights). The update's
  matmuls run in `compute_dtype` (an `apply_lora` argument; fp32 by default, as PEFT's
  autocast_adapter_dtype does), or in the input's dtype when that is wider (an fp32 pass on a
  bf16 model), and the sum is rounded once to the base dtype. With compute_dtype bf16 on a
  bf16 model the update costs no fp32 copy of x: backward keeps x itself (or its dropout).
- `apply_lora` swaps every matching linear layer for a `LoRALinear` and freezes every
  other parameter. A target matches a module named `target` or ending in `.target`
  (PEFT's rule for a list of targets).
- `disable_adapter(model)` is a context manager under which every LoRALinear returns
  `base(x)` itself: the base model bit for bit, which is also the reference policy.
  It saves each layer's flag and restores it on exit (exception included), so nesting
  is safe.
- `merge_adapter` / `unmerge_adapter` fold B @ A * alpha / r into the base weight and
  take it out again, for export and evaluation; unmerge restores the weight up to its
  dtype's rounding (about one bf16 ulp; reload the base to have it bit for bit).
  Rollouts during training run unmerged: merging a small update into bf16 weights
  rounds most of it away. While merged, disabling the adapter and a forward in
  training mode raise an error.
- `sampling_copies(model)` is a context manager for rollouts (no gradients): inside it
  every LoRALinear computes `base(x) + (x @ A^T) @ (B * alpha / r)^T` from copies of A and
  of the scaled B in the base weight's dtype, the last matmul adding onto the base output
  (addmm): 3 kernels a layer where the training path launches 5 in fp32 (the base, two
  matmuls, the scale, the add) and 7 in bf16 (two casts as well). The update is computed
  in the model dtype, not folded into W, so a small update keeps its relative precision
  (~2^-8 in bf16) instead of being rounded to W's ulp. The copies are refilled on entry, so
  a rollout after an optimiser step always sees the new A and B; they are buffers (left out
  of the state dict), allocated once and kept, so that a CUDA graph reads them in place.
- `RecentAdapters` keeps the adapter as it was before each of the last k optimiser updates
  (arca-recent's reference: the adapter now against itself k updates ago). A forward with an
  older adapter runs through `torch.func.functional_call(model, older, ...)`, which sets the
  live parameters aside for the call and changes none of them, so a training forward's
  autograd graph is untouched (copying old values into the parameters would break it).
- `save_adapter` / `load_adapter` use PEFT's layout, which PEFT, transformers and vLLM
  load: `adapter_config.json` and `adapter_model.safetensors` with keys
  `base_model.model.<module path>.lora_A.weight` (PEFT drops the adapter name). The
  module path is the model's own, so the model must mirror the Hugging Face module tree.

Meta device: A and B are created on the base weight's device, so `apply_lora` on a
model built on `meta` gives the right shapes and parameter count with no memory. To
use such a model, materialise it (`model.to_empty(device=...)`, load the base weights),
then call `reset_parameters()` on every LoRALinear or `load_adapter`. The usual path
is simpler: load the base model, then `apply_lora`.

Left out: bias in the adapter, DoRA, rsLoRA, per-layer ranks, several adapters at once,
embedding layers. Cast the model to its dtype before `apply_lora`: a later
`model.to(dtype)` would cast A and B too.
"""

import json
import math
import os
from collections import deque
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class LoRALinear(nn.Module):
    """A frozen linear layer plus a rank-r update B @ A scaled by alpha / r."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base.weight.device  # meta stays meta until the model is materialised
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank, device=device, dtype=torch.float32))
        self.enabled = True
        self.merged = False
        self.compute_dtype = compute_dtype  # the update's matmuls run in this dtype, or the input's if wider
        # sampling_copies(model)'s copies of A and B * alpha / r in the base weight's dtype, used while
        # self.sampling is set. Buffers (not in the state dict) made once and refilled in place, so that a
        # compiled decode step's CUDA graph reads them at the same address on every rollout.
        self.sampling = False
        self.register_buffer("sampling_A", None, persistent=False)  # (r, in)
        self.register_buffer("sampling_B", None, persistent=False)  # (out, r)
        self.reset_parameters()

    def reset_parameters(self):
        """A as PEFT's default (nn.Linear's Kaiming-uniform), B zero: the update starts at 0."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """The update folded in by merging: B @ A * alpha / r, (out, in), fp32."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged and self.training:
            raise RuntimeError("LoRA adapter is merged into the base weights: call "
                               "unmerge_adapter(model) before training (or model.eval() to evaluate)")
        if self.merged or not self.enabled:
            return self.base(x)  # merged: the update is in the weight; disabled: exactly the base layer
        if self.sampling:
            return self.sampling_forward(x)
        y = self.base(x)  # (..., out)
        # bf16 on a bf16 model; fp32 for an fp32 adapter or an fp32 pass
        dtype = torch.promote_types(self.compute_dtype, x.dtype)
        h = self.dropout(x).to(dtype)  # (..., in): x itself without dropout or cast: backward keeps no copy
        down = F.linear(h, self.lora_A.to(dtype))  # (..., r)
        update = F.linear(down, self.lora_B.to(dtype)) * self.scaling  # (..., out)
        return (y + update).to(y.dtype)  # added in `dtype`, rounded once to the base's

    def sampling_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inside sampling_copies: base(x) + (x @ A^T) @ (B * alpha / r)^T in the base dtype, three
        matmuls, the update added by the last one (addmm, rounded once). No dropout, no gradients."""
        if torch.is_grad_enabled():
            raise RuntimeError("sampling_copies(model) is for generation: run it under torch.no_grad() "
                               "(training needs the fp32 path, whose gradients reach A and B)")
        x2d = x.reshape(-1, x.shape[-1]).to(self.sampling_A.dtype)  # (N, in)
        down = F.linear(x2d, self.sampling_A)  # (N, r)
        y = torch.addmm(self.base(x2d), down, self.sampling_B.t())  # (N, out) = base + (N, r) @ (r, out)
        return y.view(*x.shape[:-1], y.shape[-1])  # (..., out)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, enabled={self.enabled}, merged={self.merged}"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear in the model by module path; an error if there is none."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        raise ValueError("the model has no LoRALinear layers: call apply_lora(model, ...) first")
    return layers


def _matches(name: str, targets) -> bool:
    """PEFT's rule for a list of targets: "q_proj" matches "model.layers.0.self_attn.q_proj"."""
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
               targets=DEFAULT_TARGETS, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Wrap every nn.Linear whose name matches a target in a LoRALinear; freeze the rest.
    compute_dtype: the dtype of the update's matmuls (A and B themselves stay fp32)."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA layers: apply_lora once per model")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for target in targets:
        if not any(_matches(name, [target]) for name in linears):
            candidates = sorted({name.rsplit(".", 1)[-1] for name in linears})
            raise ValueError(f"LoRA target {target!r} matches no linear layer; "
                             f"the linear layers are named {candidates}")
    model.requires_grad_(False)
    for name, linear in linears.items():
        if _matches(name, targets):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            lora = LoRALinear(linear, rank, alpha, dropout, compute_dtype)
            lora.train(linear.training)  # keep the model's mode
            setattr(parent, child, lora)
    return model


@contextmanager
def disable_adapter(model: nn.Module):
    """Run the exact base model inside the block; the adapter comes back on exit."""
    layers = list(lora_layers(model).values())
    if any(layer.merged for layer in layers):
        raise RuntimeError("cannot disable a merged LoRA adapter: call unmerge_adapter(model) first")
    saved = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, saved):
            layer.enabled = enabled


@contextmanager
def sampling_copies(model: nn.Module):
    """Generate inside the block with copies of A and B * alpha / r in the base weights' dtype
    (see LoRALinear.sampling_forward), refilled on entry; the training path is back on exit."""
    layers = list(lora_layers(model).values())
    if any(layer.sampling for layer in layers):
        raise RuntimeError("sampling_copies(model) is already active")
    with torch.no_grad():
        for layer in layers:
            dtype = layer.base.weight.dtype
            device = layer.lora_A.device
            current = layer.sampling_A
            if current is None or current.dtype != dtype or current.device != device:  # made once, refilled
                layer.sampling_A = torch.empty(layer.lora_A.shape, dtype=dtype, device=device)  # (r, in)
                layer.sampling_B = torch.empty(layer.lora_B.shape, dtype=dtype, device=device)  # (out, r)
            layer.sampling_A.copy_(layer.lora_A)
            layer.sampling_B.copy_(layer.lora_B * layer.scaling)
            layer.sampling = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.sampling = False


def adapter_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every A and B by parameter name (model.layers.0.self_attn.q_proj.lora_A, ...): the live tensors."""
    return {name: p for name, p in model.named_parameters() if name.endswith((".lora_A", ".lora_B"))}


class RecentAdapters:
    """The adapter as it was before each of the last k applied optimiser updates, oldest first.

    A ring (a deque of k fp32 copies of every A and B) filled by an optimiser pre-step hook, so
    it holds exactly the updates that were applied (a skipped one never calls step). oldest() is
    the adapter k updates ago; until k updates exist, the one before the first update (the initial
    adapter, whose B = 0 is the base model), and before any update the live adapter itself.
    state() and load() carry the ring through a checkpoint. k copies of the adapter in memory:
    279 MB each for Qwen3-1.7B at rank 64.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, k: int):
        self.model, self.ring = model, deque(maxlen=k)
        optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: self.push())

    @torch.no_grad()
    def push(self):
        self.ring.append({name: p.detach().clone() for name, p in adapter_parameters(self.model).items()})

    def oldest(self) -> dict[str, torch.Tensor]:
        return self.ring[0] if self.ring else adapter_parameters(self.model)

    def state(self) -> list:
        return [{name: t.cpu() for name, t in snapshot.items()} for snapshot in self.ring]

    def load(self, state: list):
        device = next(iter(adapter_parameters(self.model).values())).device
        self.ring.clear()
        self.ring.extend({name: t.to(device) for name, t in snapshot.items()} for snapshot in state)


@torch.no_grad()
def merge_adapter(model: nn.Module) -> nn.Module:
    """W <- W + B @ A * alpha / r in every LoRALinear, for export and evaluation only."""
    for name, layer in lora_layers(model).items():
        if layer.merged:
            raise RuntimeError(f"{name}: LoRA adapter is already merged")
        w = layer.base.weight
        w.copy_(w.float() + layer.delta_weight())
        layer.merged = True
    return model


@torch.no_grad()
def unmerge_adapter(model: nn.Module) -> nn.Module:
    """W <- W - B @ A * alpha / r: the base weights back, up to their dtype's rounding."""
    for name, layer in lora_layers(model).items():
        if not layer.merged:
            raise RuntimeError(f"{name}: LoRA adapter is not merged")
        w = layer.base.weight
        w.copy_(w.float() - layer.delta_weight())
        layer.merged = False
    return model


def _adapter_config(model: nn.Module) -> dict:
    """The fields of PEFT's LoraConfig that describe this adapter (the rest keep PEFT's defaults)."""
    layers = lora_layers(model)
    first = next(iter(layers.values()))
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": first.rank,
        "lora_alpha": first.alpha,
        "lora_dropout": first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in layers}),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }


def _peft_keys(name: str) -> tuple[str, str]:
    """Module path -> PEFT's saved keys, e.g. model.layers.3.self_attn.q_proj ->
    base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight (and lora_B)."""
    return f"base_model.model.{name}.lora_A.weight", f"base_model.model.{name}.lora_B.weight"


def _replace_atomically(path: str, write):
    """write(tmp) to a temporary name in the same directory, then rename over path."""
    tmp = f"{path}.tmp"
    write(tmp)
    os.replace(tmp, path)


def save_adapter(model: nn.Module, directory: str, base_model_name_or_path: str):
    """Write adapter_config.json and adapter_model.safetensors in PEFT's layout."""
    os.makedirs(directory, exist_ok=True)
    tensors = {}
    for name, layer in lora_layers(model).items():
        key_a, key_b = _peft_keys(name)
        tensors[key_a] = layer.lora_A.detach().cpu().contiguous()  # (r, in)
        tensors[key_b] = layer.lora_B.detach().cpu().contiguous()  # (out, r)
    config = _adapter_config(model) | {"base_model_name_or_path": base_model_name_or_path}

    def write_config(tmp):
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)

    # Weights first: a config on disk means the weights next to it are complete.
    _replace_atomically(os.path.join(directory, WEIGHTS_NAME),
                        lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _replace_atomically(os.path.join(directory, CONFIG_NAME), write_config)


# The config fields that change what a loaded adapter computes; load_adapter checks them.
CHECKED_FIELDS = ("peft_type", "r", "lora_alpha", "target_modules", "bias", "fan_in_fan_out",
                  "use_rslora", "use_dora", "rank_pattern", "alpha_pattern")


def _check_config(found: dict, expected: dict, path: str):
    """Each checked field as the model has it, or an error naming the field, e.g.
    "adapter_config.json: r is 8 in the adapter, but the model has 4"."""
    for field in CHECKED_FIELDS:
        got, want = found.get(field, expected[field]), expected[field]
        if field == "target_modules" and isinstance(got, list):
            got = sorted(got)  # PEFT writes a set: any order
        if got != want:
            raise ValueError(f"{path}: {field} is {got!r} in the adapter, but the model has {want!r}")


@torch.no_grad()
def load_adapter(model: nn.Module, directory: str) -> nn.Module:
    """Load A and B saved by save_adapter or PEFT into a model that has had apply_lora."""
    layers = lora_layers(model)
    if any(layer.merged for layer in layers.values()):
        raise RuntimeError("cannot load into a merged LoRA adapter: call unmerge_adapter(model) first")
    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    with open(config_path) as f:
        _check_config(json.load(f), _adapter_config(model), config_path)
    tensors = load_file(weights_path)
    expected = {key: param for name, layer in layers.items()
                for key, param in zip(_peft_keys(name), (layer.lora_A, layer.lora_B))}
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{weights_path}: keys differ from the model's LoRA layers; "
                         f"missing {missing[:5]} ({len(missing)} in all), "
                         f"unexpected {unexpected[:5]} ({len(unexpected)} in all)")
    for key, param in expected.items():
        if tensors[key].shape != param.shape:
            raise ValueError(f"{weights_path}: {key} has shape {tuple(tensors[key].shape)}, "
                             f"but the model expects {tuple(param.shape)}")
    for key, param in expected.items():
        param.copy_(tensors[key])
    return model
