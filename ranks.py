"""Ranks: the few torch.distributed calls a data-parallel run makes (NCCL on GPUs, gloo on CPUs).

Under torchrun each of W processes takes an equal share of every step's prompts; grpo.py sums the
LoRA gradients over the processes once per update and normalises the loss by the step's global
number of completions, so the update is the one-process update. With one process (no process
group) every function here is the identity: a plain `python train.py` never touches
torch.distributed.
"""

import datetime
import os

import torch
import torch.distributed as dist


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def process_rank():
    return dist.get_rank() if world_size() > 1 else 0


def completions_on_every_rank(local_completions):
    """The step's global number of completions N, the loss's normaliser: every rank holds as many."""
    return local_completions * world_size()


def all_reduce_gradients(parameters):
    """Sum the gradients of `parameters` over the ranks, in one flat buffer (one collective per update);
    with one process, nothing."""
    if world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.flatten() for g in grads])  # (trainable parameters,)
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(parameters, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g)
        offset += g.numel()


def sum_on_every_rank(value):
    """A device tensor summed over the ranks (one collective; one process: itself)."""
    if world_size() == 1:
        return value
    total = value.clone()
    dist.all_reduce(total)
    return total


def quantile_on_every_rank(values, mask, q, capacity):
    """The q quantile of values[mask] (B, T) pooled over the ranks, on the device, with no read of it:
    each rank's values, NaN where the mask is off, padded with NaN to `capacity` entries (at least
    B * T) and gathered in one collective; nanquantile skips the NaNs (all NaN: NaN)."""
    local = torch.where(mask.bool(), values.float(), float("nan")).flatten()  # (B * T,)
    if world_size() > 1:
        padded = torch.full((capacity,), float("nan"), device=values.device)
        padded[: local.numel()] = local
        pooled = [torch.empty_like(padded) for _ in range(world_size())]
        dist.all_gather(pooled, padded)
        local = torch.cat(pooled)  # (W * capacity,)
    return torch.nanquantile(local, q)


def gather(value):
    """[value of rank 0, value of rank 1, ...] (one process: [value])."""
    if world_size() == 1:
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def start_distributed():
    """(rank, number of ranks, device): torchrun's process group (NCCL on GPUs, gloo on CPUs), or (0, 1, the
    one device)."""
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
    if ranks == 1:
        return 0, 1, device
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=10))
    return dist.get_rank(), ranks, device


def on_first_rank(fn, rank, ranks):
    """fn() on rank 0 alone (it owns the files); its result, or its SystemExit, on every rank."""
    outcome = [None]
    if rank == 0:
        try:
            outcome = [("result", fn())]
        except SystemExit as err:
            outcome = [("exit", err.code)]
    if ranks > 1:
        dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "exit":
        raise SystemExit(value)
    return value


def barrier():
    """Wait for every rank (nothing with one process)."""
    if world_size() > 1:
        dist.barrier()


def end_distributed():
    """The process group goes, if there is one (also after an error: no collective here)."""
    if dist.is_initialized():
        dist.destroy_process_group()
