"""Durable runs: a run directory's files, its checkpoints, stopping on a signal and resuming exactly.

A run directory holds what this project writes: RUN_FILES, checkpoint/ and adapter/ (with their
.tmp/ and .old/ siblings during a save). An --out that is not a run directory is refused, and nothing
is ever deleted that is not one of these. Every file is written whole under a temporary name and
renamed into place (write_atomically, replace_directory), so a kill at any moment leaves the old
version or the new one, never a torn file; metrics.jsonl grows by one flushed line per step.

Resuming is bit-identical to an uninterrupted run: a checkpoint holds the adapter (PEFT's layout),
the optimiser, the scheduler, the step and every rank's RNG states. SIGINT and SIGTERM let the step
in progress finish and save it (StopRequest); an error, or a second signal, saves the last finished
step when the adapter has not moved since (Checkpointer.save_after_error); SIGKILL leaves the last
periodic checkpoint. `state.pt` is read with weights_only=True: a checkpoint cannot run code.
"""

import json
import os
import pickle
import random
import shutil
import signal
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from lora import load_adapter, save_adapter
from ranks import gather, on_first_rank
from report import read_metrics

RUN_FILES = ("config.json", "metrics.jsonl", "eval.json", "credit.html")
RUN_DIRECTORIES = ("checkpoint", "adapter")  # each with .tmp and .old siblings while it is replaced
MAX_SKIPPED_IN_A_ROW = 3  # non-finite steps in a row before the run stops


# ----------------------------------------------------------------------------------------------
# Writing without tearing


def write_atomically(path, text):
    """Write `text` to path.tmp, then rename it over `path`: the old file or the new one, never half of
    one."""
    path = Path(path)
    staged = path.with_name(path.name + ".tmp")
    staged.write_text(text, encoding="utf-8")
    staged.replace(path)


def replace_directory(path, write):
    """write(staged) fills path.tmp, which is then swapped in: path -> path.old, path.tmp -> path, path.old
    removed. A kill at any point leaves path or path.old complete (find_checkpoint takes the first),
    and each replacement first clears what a killed one left."""
    staged, previous = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    write(staged)
    if path.exists():  # complete (it was renamed into place whole), so a leftover path.old is stale
        shutil.rmtree(previous, ignore_errors=True)
        path.rename(previous)
    staged.rename(path)
    shutil.rmtree(previous, ignore_errors=True)


def append_line(path, row):
    """One JSON line, flushed to the disk before the step counts as done."""
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


# ----------------------------------------------------------------------------------------------
# Checkpoints


def rng_states(generator):
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "sampler": generator.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states, generator):
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    generator.set_state(states["sampler"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(out, model, optimizer, scheduler, step, rng, config):
    """checkpoint/ = adapter (PEFT) + state.pt, for the step boundary `step` with `rng`, the RNG
    states of every rank (one process: a list of one); replaced whole (replace_directory)."""
    state = {"step": step, "data_position": step * config.prompts_per_micro_batch * config.micro_batches,
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng,
             "config": asdict(config)}
    if hasattr(model, "recent_adapters"):  # arca-recent's ring of older adapters
        state["recent_adapters"] = model.recent_adapters.state()

    def write(staged):
        save_adapter(model, staged / "adapter", config.model)
        torch.save(state, staged / "state.pt")

    replace_directory(Path(out) / "checkpoint", write)


def save_final_adapter(out, model, config):
    """adapter/ in PEFT's layout, replaced whole."""
    replace_directory(Path(out) / "adapter", lambda staged: save_adapter(model, staged, config.model))


def find_checkpoint(out):
    """The newest complete checkpoint directory, or None (a kill mid-swap leaves checkpoint.old)."""
    for name in ("checkpoint", "checkpoint.old"):
        if (Path(out) / name / "state.pt").exists():
            return Path(out) / name
    return None


def load_state(path, device):
    """state.pt, read with weights_only=True: tensors, numbers, strings, lists, tuples and dicts, never code.

    Read onto the CPU whatever `device` is: the RNG states must stay CPU byte tensors (torch.set_rng_state
    and Generator.set_state refuse others). The optimiser's moments then go to `device`, where its
    parameters are; its step counters stay as saved (optimizer.load_state_dict places them).
    """
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        raise SystemExit(f"{path}: refused: it holds more than tensors, numbers, strings, lists and dicts, "
                         "which a checkpoint written by train.py never does, so loading it could run code "
                         f"({str(err).splitlines()[0]})") from None
    except (OSError, RuntimeError, EOFError) as err:
        raise SystemExit(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    for moments in state["optimizer"]["state"].values():
        for name, value in moments.items():
            if name != "step":
                moments[name] = value.to(device)
    return state


# ----------------------------------------------------------------------------------------------
# Starting, resuming and stopping a run


def is_run_directory(out):
    """Whether out/config.json is one that train.py wrote."""
    try:
        info = json.loads((Path(out) / "config.json").read_text())
        return isinstance(info, dict) and isinstance(info.get("config"),
                                                     dict) and "trainable_parameters" in info
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False


def check_resumable(out, config):
    """The saved config must equal this one in everything but the step budget, the output path and
    gradient checkpointing (a memory trade that changes no number)."""
    saved = json.loads((Path(out) / "config.json").read_text())["config"]
    current = asdict(config)
    same_run = ("steps", "out", "gradient_checkpointing")
    differences = [f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in current
                   if k not in same_run and saved.get(k) != current[k]]
    if differences:
        raise SystemExit(f"--resume: the config differs from the run in {out} (only --steps may change):\n  "
                         + "\n  ".join(differences))


def prepare_out(out, resume):
    """The checkpoint to resume from, or None for a fresh start in `out`; refuses what would lose a user's
    files.

    - missing or empty: a fresh start;
    - holding files this project did not write (no config.json of ours): refused, nothing touched;
    - a run that stopped before its first checkpoint: started again (with or without --resume),
      after removing only the files the project writes;
    - a run with a checkpoint: needs --resume.
    """
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        if resume:
            raise SystemExit(f"--resume: no run in {out}")
        return None
    if not out.is_dir() or not is_run_directory(out):
        found = sorted(p.name for p in out.iterdir())[:5] if out.is_dir() else ["(a file)"]
        raise SystemExit(f"{out} exists and is not a run directory of this project (it holds "
                         f"{', '.join(found)}); "
                         "nothing was touched: pass a new or empty --out")
    checkpoint = find_checkpoint(out)
    if checkpoint is None:
        print(f"{out}: the run there stopped before its first checkpoint; starting it again")
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
            (out / (name + ".tmp")).unlink(missing_ok=True)
        for name in RUN_DIRECTORIES:
            for suffix in (".tmp", ".old"):
                shutil.rmtree(out / (name + suffix), ignore_errors=True)
        return None
    if not resume:
        raise SystemExit(f"{out} already holds a run; pass --resume to continue it or --out for a new one "
                         "(nothing was overwritten)")
    return checkpoint


def truncate_logs(out, step):
    """Keep each step once: drop metrics and evaluations written after the checkpoint (and a torn line)."""
    rows = [row for row in read_metrics(out) if row["step"] <= step]
    write_atomically(Path(out) / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    evals = Path(out) / "eval.json"
    if evals.exists():
        kept = [e for e in json.loads(evals.read_text()) if e["step"] <= step]
        write_atomically(evals, json.dumps(kept, indent=1))


def restore(checkpoint_dir, out, config, model, optimizer, scheduler, generator, rank, ranks):
    """Load a checkpoint into the live model, optimiser, scheduler and RNGs; returns (its step, the
    evaluations so far). metrics.jsonl and eval.json lose what was written after it."""
    check_resumable(out, config)
    state = load_state(checkpoint_dir / "state.pt", model.lm_head.weight.device)
    if isinstance(state["rng"], dict):  # a checkpoint from before torchrun support: one process's states
        state["rng"] = [state["rng"]]
    saved_ranks = len(state["rng"])
    if saved_ranks != ranks:
        how = f"torchrun --nproc-per-node {saved_ranks}" if saved_ranks > 1 else "python train.py"
        raise SystemExit(f"--resume: {out} was trained on {saved_ranks} process(es), this is {ranks}; "
                         f"resume it with {how}")
    load_adapter(model, checkpoint_dir / "adapter")
    if hasattr(model, "recent_adapters"):
        model.recent_adapters.load(state["recent_adapters"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_states(state["rng"][rank], generator)

    def truncate_and_read_evals():
        truncate_logs(out, state["step"])
        return json.loads((out / "eval.json").read_text()) if (out / "eval.json").exists() else []

    evals = on_first_rank(truncate_and_read_evals, rank, ranks)
    if rank == 0:
        print(f"resuming {out} at step {state['step']}")
    return state["step"], evals


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM during training: the first lets the step in progress finish, then
    the run saves that step's checkpoint and exits (130, 143); a second stops at once."""

    def __init__(self):
        self.signal = None

    def __call__(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        tqdm.write(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint "
                   "(send it again to stop now)")


class Checkpointer:
    """Saves the run at step boundaries: every save_every steps, at the last step, before stopping on
    non-finite steps, on a stop signal, and after an error. It remembers the last finished step (its
    number, RNG states and scheduler position; the adapter and the optimiser are the live ones,
    unchanged until the next update) and the step last saved."""

    def __init__(self, out, model, optimizer, scheduler, generator, config, rank, ranks, step, saved):
        self.out, self.model, self.optimizer, self.scheduler = out, model, optimizer, scheduler
        self.generator, self.config, self.rank, self.ranks = generator, config, rank, ranks
        self.saved, self.skipped_in_a_row = saved, 0
        self.finished(step)

    def finished(self, step, skipped_update=False):
        self.step, self.rng, self.updates = step, rng_states(self.generator), self.scheduler.last_epoch
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped_update else 0

    def save(self):
        rngs = gather(self.rng)  # every rank's RNG states, for an exact resume of each
        if self.rank == 0:
            save_checkpoint(self.out, self.model, self.optimizer, self.scheduler, self.step, rngs,
                            self.config)
        self.saved = self.step

    def save_if_due(self):
        """The periodic checkpoint, the last step's, or the one before stopping on non-finite steps."""
        stopping = self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW
        if self.step % self.config.save_every == 0 or self.step == self.config.steps or stopping:
            self.save()
        if stopping:
            first = self.step - self.skipped_in_a_row + 1
            raise SystemExit(f"stopping: {self.skipped_in_a_row} steps in a row had a non-finite loss or "
                             f"gradient and were skipped (steps {first}-{self.step}); checkpoint at step "
                             f"{self.step} in {self.out}. Check the rewards for NaN, or lower --lr; --dtype "
                             "float32 rules out bf16 overflow")

    def save_after_error(self, err):
        """An error or a second signal mid-step: save the last finished step if the adapter has not moved
        since (with several ranks the others may be inside a collective: the last checkpoint stands)."""
        moved = self.scheduler.last_epoch != self.updates  # an update ran after the last finished step
        saving = self.ranks == 1 and not moved
        if saving:
            save_checkpoint(self.out, self.model, self.optimizer, self.scheduler, self.step, [self.rng],
                            self.config)
        what = f"{type(err).__name__} during step {self.step + 1}"
        if isinstance(err, KeyboardInterrupt):
            what = "stopped"
        where = (f"checkpoint saved at step {self.step} in {self.out}" if saving
                 else f"{self.out}'s last checkpoint stands")
        print(f"\n{what}: {where}; continue with --resume", file=sys.stderr)


def finish(out, model, config, start_step, checkpointer, stop_signal, rank):
    """After the loop: a stopped run saves its step and exits 128 + the signal; a finished one writes
    adapter/."""
    if stop_signal:
        if checkpointer.saved != checkpointer.step:
            checkpointer.save()
        if rank == 0:
            print(f"\n{signal.Signals(stop_signal).name}: checkpoint saved at step {checkpointer.step} in "
                  f"{out}; "
                  "continue with --resume")
        raise SystemExit(128 + stop_signal)
    if rank == 0:
        if start_step >= config.steps:
            print(f"{out}: already finished at step {start_step}; raise --steps to train further")
        if not (out / "adapter" / "adapter_config.json").exists() or start_step < config.steps:
            save_final_adapter(out, model, config)  # a resume also writes what a finished run lacks
        print(f"done: adapter in {out / 'adapter'}, metrics in {out / 'metrics.jsonl'}, "
              f"evaluations in {out / 'eval.json'}")
