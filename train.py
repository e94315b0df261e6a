"""Train a LoRA adapter with GRPO and token-level credit: the paper's MATH sweep on one GPU, or the demo.

    python train.py                                  # GPU: the paper preset with ARCA; CPU: the demo
    python train.py --preset paper --credit uniform  # one row of the paper's sweep (README, The paper's run)
    python train.py --preset paper --rank 4          # ARCA at rank 4 (lora alpha follows: 2 r)
    python train.py --report runs/*                  # the paper's tables from finished runs

Outputs in --out: config.json (resolved config and trainable parameter count), metrics.jsonl (one
line per step), eval.json (greedy accuracy and pass@k, step 0 first), credit.html (the seven credit
methods' weights on a few evaluation completions), adapter/ (PEFT format) and checkpoint/ (all
that --resume needs: adapter, optimiser, scheduler, step, RNG states).

The configuration is one dataclass; each field is a kebab-case flag. Presets are plain instances.
"""

import argparse
import dataclasses
import datetime
import hashlib
import itertools
import json
import math
import os
import pickle
import random
import signal
import shutil
import sys
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from credit import METHODS, credit_page, credit_section
from data import CACHE_DIR, PROMPTS, data_sources, encode_prompts, load_data, select_eval_rows
from grpo import all_method_weights, gather, group_advantages, grpo_step, process_rank, world_size
from lora import apply_lora, load_adapter, sampling_copies, save_adapter
from memory import resolve_gradient_checkpointing
from math_reward import gsm8k_reward, gsm8k_strict_match, math_reward, score_batch, strict_match
from model import Qwen3, generate, load_tokenizer
from report import plot, read_metrics, report


# ----------------------------------------------------------------------------------------------
# Configuration


def option(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    preset: str = option("paper", "preset the other fields start from: paper or demo")
    model: str = option("Qwen/Qwen3-1.7B-Base", "checkpoint directory or Hugging Face hub id")
    task: str = option("math", "problems, prompt and answer rule: math (DigitalLearningGmbH/MATH-lighteval), gsm8k (openai/gsm8k) or demo (the CPU demo's additions)")
    data: str | None = option(None, "training problems, JSON lines with problem and answer (or solution); default: the task's train split from the hub")
    eval_data: str | None = option(None, "evaluation problems, same format; wins over --eval-set")
    data_revision: str | None = option(None, "hub revision (commit, branch or tag) of the task's dataset; default: the one data.py pins")
    eval_set: str = option("test", "evaluation problems: test (the task's own test split) or math500 (HuggingFaceH4/MATH-500, with --task math)")
    prompt_template: str | None = option(None, "prompt text; {problem} is replaced by the problem; default: the task's (the reference code's for math and gsm8k)")
    credit: str = option("arca", "token credit: uniform, surprisal, entropy, divergence, arca, or a control: arca-shuffled, entropy-top20")
    power: float = option(2.0, "sharpening power p of w = (alpha + eps)^p / sum")
    credit_eps: float = option(1e-8, "eps of the credit weights")
    arca_precision: str = option("bf16", "ARCA's two hidden states: bf16 (the paper's: the training forward and a bf16 adapter-off pass) or exact (two no-grad passes with fp32 activations, so the score is the adapter's, not bf16 rounding)")
    credit_eos: bool = option(False, "train and weight the EOS token that ends a completion (the reference code leaves it out)")
    reward: str = option("strict", "training reward: strict (the reference code's string match) or symbolic (math_reward's equivalence)")
    advantage: str = option("grpo", "advantage estimator: grpo or rloo (README, The method (1))")
    rank: int = option(64, "LoRA rank r")
    lora_alpha: float | None = option(None, "LoRA alpha; default 2 r")
    lora_dropout: float = option(0.05, "LoRA dropout")
    group_size: int = option(4, "K, completions per prompt")
    prompts_per_micro_batch: int = option(2, "prompts per micro-batch (each with K completions)")
    micro_batches: int = option(4, "micro-batches per optimiser step (gradient accumulation)")
    steps: int = option(100, "optimiser steps")
    lr: float = option(5e-6, "AdamW learning rate")
    warmup_steps: int = option(10, "linear warm-up steps before the cosine decay")
    weight_decay: float = option(0.0, "AdamW weight decay")
    grad_clip: float = option(1.0, "gradient-norm clip")
    max_prompt_tokens: int = option(512, "longer prompts are skipped")
    max_new_tokens: int = option(512, "completion length limit")
    temperature: float = option(1.0, "sampling temperature of training rollouts and pass@k")
    top_p: float = option(0.95, "nucleus mass of training rollouts and pass@k")
    top_k: int = option(50, "keep only the k most likely tokens before top-p, 0 = off (transformers' default 50)")
    beta: float = option(0.0, "coefficient of the k3 KL to the base model")
    diagnose_all: bool = option(True, "log all seven methods' Gini, EffN/T and top-10% mass on each step's completions (adds an adapter-off pass on one micro-batch when the method has none)")
    updates_per_batch: int = option(1, "optimiser updates per batch of rollouts; > 1 uses the PPO clipped ratio")
    clip_eps: float = option(0.2, "PPO clip range, used when updates-per-batch > 1")
    eval_problems: int | None = option(None, "evaluation problems: the first ones of the eval set, in file order; default 200 (math500: all 500)")
    eval_sample: bool = option(False, "evaluate on a fixed seeded sample (seed 0) of the evaluation data instead of its first rows")
    eval_every: int = option(20, "evaluate every this many steps (and at step 0 and the end)")
    pass_k: int = option(4, "k of pass@k (sampled)")
    eval_batch_size: int = option(64, "sequences per generate call in evaluation")
    html_completions: int = option(3, "completions shown in credit.html")
    save_every: int = option(20, "checkpoint every this many steps")
    reward_timeout: float = option(5.0, "seconds the answer checker may spend on one completion")
    seed: int = option(1337, "random seed")
    dtype: str = option("bfloat16", "base weight dtype: bfloat16 or float32 (LoRA weights are fp32)")
    lora_dtype: str = option("bfloat16", "dtype of the LoRA update's matmuls (A, B and AdamW's state stay fp32): bfloat16 or float32; never narrower than the activations (an exact-ARCA pass computes fp32)")
    gradient_checkpointing: str = option("auto", "recompute each layer in backward to save memory: on, off, or auto (on when the planned peak without it passes 90%% of the device's memory)")
    compile: bool = option(False, "sample through a static-shape decode step under torch.compile (CUDA graphs on a GPU), compiled once per batch and cache bucket")
    cpu_threads: int = option(0, "torch CPU threads, 0 = torch's default; the demo pins 1, so it prints the same numbers on every machine")
    out: str | None = option(None, "output directory; default runs/<preset>-<credit>-r<rank>")


PAPER = TrainConfig()  # the paper's settings (README, The paper's run)

DEMO = dataclasses.replace(
    PAPER,
    preset="demo",
    task="demo",
    model=str(CACHE_DIR / "demo-qwen3"),
    reward="symbolic",
    credit_eos=True,  # stopping after the box is part of the answer
    temperature=0.5,  # 22 sampled tokens: at 1.0 the half-trained model's copies fail too often for a signal in 150 steps
    top_k=0,
    eval_sample=True,
    cpu_threads=1,  # a CPU matmul's rounding depends on its thread count: one thread, the same result everywhere
    rank=8,
    lora_dropout=0.0,
    group_size=8,
    prompts_per_micro_batch=16,
    micro_batches=1,
    steps=150,
    lr=1e-3,
    warmup_steps=10,
    max_prompt_tokens=32,
    max_new_tokens=24,  # completions need 21 or 22 with EOS; more lets a run drift into junk after the box, which the reward cannot see
    eval_problems=200,
    eval_every=50,
    eval_batch_size=200,
    save_every=50,
    dtype="float32",
    lora_dtype="float32",
    gradient_checkpointing="off",
)

PRESETS = {"paper": PAPER, "demo": DEMO}


def parse_args(argv=None):
    """The config from a preset and the flags, plus the commands (--resume, --dry-run, --report)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = next(t for t in typing.get_args(f.type) or (f.type,) if t is not type(None))  # X | None -> X
        paper, demo = getattr(PAPER, f.name), getattr(DEMO, f.name)
        defaults = f"default {paper!r}" if paper == demo else f"paper {paper!r}, demo {demo!r}"
        help = f"{f.metadata['help']} ({defaults})".replace("%", "%%")  # argparse %-formats help
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        else:
            parser.add_argument(flag, type=kind, default=None, help=help)
    parser.add_argument("--resume", action="store_true", help="continue the stopped run in --out")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config as JSON and exit")
    parser.add_argument("--report", nargs="+", metavar="DIR", help="print the paper's tables for these runs and exit")
    parser.add_argument("--plot", metavar="FILE.png", help="with --report: also draw accuracy, reward and the seven signals' Gini over steps (needs matplotlib)")
    args = parser.parse_args(argv)

    preset_given = args.preset is not None
    preset = args.preset or ("paper" if torch.cuda.is_available() else "demo")
    if preset not in PRESETS:
        parser.error(f"--preset {preset!r}: expected one of {', '.join(PRESETS)}")
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None}
    config = dataclasses.replace(PRESETS[preset], **overrides)
    if config.lora_alpha is None:
        config.lora_alpha = 2.0 * config.rank  # the paper's alpha = 2 r
    if config.prompt_template is None and config.task in PROMPTS:
        config.prompt_template = PROMPTS[config.task]
    if config.eval_problems is None:
        config.eval_problems = 500 if config.eval_set == "math500" else 200
    if config.out is None:
        task = "" if config.task == PRESETS[preset].task else f"-{config.task}"
        config.out = f"runs/{config.preset}{task}-{config.credit}-r{config.rank}"
    check_config(config, parser)
    return config, args, preset_given


def check_config(config, parser):
    """Every option in its valid range, or parser.error naming the flag, the value and the range."""
    choices = {"credit": METHODS, "advantage": ("grpo", "rloo"),
               "task": ("math", "gsm8k", "demo"), "eval_set": ("test", "math500"), "lora_dtype": ("bfloat16", "float32"),
               "gradient_checkpointing": ("auto", "on", "off"),
               "reward": ("strict", "symbolic"), "dtype": ("bfloat16", "float32"), "arca_precision": ("bf16", "exact")}
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            parser.error(f"--{name.replace('_', '-')} {getattr(config, name)!r}: expected one of {', '.join(allowed)}")
    at_least_1, at_least_0, above_0 = (lambda v: v >= 1, ">= 1"), (lambda v: v >= 0, ">= 0"), (lambda v: v > 0, "> 0")
    ranges = {  # flag: (test, the valid range as the error states it)
        "steps": at_least_1, "rank": at_least_1, "group_size": (lambda v: v >= 2, ">= 2 (a group baseline needs 2 completions)"),
        "prompts_per_micro_batch": at_least_1, "micro_batches": at_least_1, "max_prompt_tokens": at_least_1,
        "max_new_tokens": at_least_1, "updates_per_batch": at_least_1, "pass_k": at_least_1, "eval_problems": at_least_1,
        "eval_every": at_least_1, "save_every": at_least_1, "eval_batch_size": at_least_1, "top_k": at_least_0,
        "warmup_steps": at_least_0, "html_completions": at_least_0, "cpu_threads": at_least_0, "power": at_least_0, "credit_eps": at_least_0,
        "lora_alpha": above_0, "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"), "lr": above_0, "weight_decay": at_least_0,
        "grad_clip": above_0, "temperature": at_least_0, "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"), "beta": at_least_0,
        "clip_eps": above_0, "reward_timeout": above_0,
    }
    for name, (valid, described) in ranges.items():
        value = getattr(config, name)
        if not (math.isfinite(value) and valid(value)):
            parser.error(f"--{name.replace('_', '-')} {value}: expected a value {described}")
    if config.eval_set == "math500" and config.task != "math":
        parser.error(f"--eval-set math500 is HuggingFaceH4/MATH-500, 500 MATH problems with MATH's answers; --task {config.task} "
                     "has its own test split (--eval-set test) or takes --eval-data FILE")


# ----------------------------------------------------------------------------------------------
# Evaluation


def score_strict(texts, golds, config):
    """The reference code's answer rule for the task (strict_match; GSM8K: gsm8k_strict_match): linear-time
    string work, scored in this process."""
    check = gsm8k_strict_match if config.task == "gsm8k" else strict_match
    return [check(text, gold) for text, gold in zip(texts, golds)], 0


def score_symbolic(texts, golds, config):
    """Symbolic equivalence of the task's answer (math_reward; GSM8K: gsm8k_reward), in worker processes
    bounded by --reward-timeout."""
    return score_batch(texts, golds, timeout=config.reward_timeout, scorer=gsm8k_reward if config.task == "gsm8k" else math_reward)


def task_roles(config):
    """The task's function from (problem, completion token texts) to its computed tokens, or None: the demo's
    additions know theirs (demo.token_roles); MATH, GSM8K and --data files do not."""
    if config.task == "demo" and not config.data:
        import demo

        return demo.token_roles
    return None


def score(texts, golds, config):
    """(rewards, timeouts) under the run's --reward."""
    return score_strict(texts, golds, config) if config.reward == "strict" else score_symbolic(texts, golds, config)


def prompt_seed(*parts):
    """A 63-bit seed from (stream, seed, step, index): the randomness of one prompt's completions,
    the same whichever batch or rank samples it."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2**63 - 1)


def generate_texts(model, tokenizer, prompts, config, temperature, row_generators=None, samples_per_prompt=1):
    """Completions (ids, text), samples_per_prompt of each prompt in a row, in batches of about
    eval_batch_size sequences; row_generators: one per completion (sampling)."""
    results = []
    per_batch = max(1, config.eval_batch_size // samples_per_prompt)  # prompts per generate call
    for start in range(0, len(prompts), per_batch):
        batch = prompts[start : start + per_batch]
        rows = slice(start * samples_per_prompt, (start + per_batch) * samples_per_prompt)
        generators = None if row_generators is None else row_generators[rows]
        with sampling_copies(model):
            tokens, mask = generate(model, batch, config.max_new_tokens, temperature=temperature, top_p=config.top_p, top_k=config.top_k,
                                    eos_token_id=tokenizer.eos_token_id, vocab_size=tokenizer.vocab_size, row_generators=generators,
                                    samples_per_prompt=samples_per_prompt, compile=config.compile)
        for row in range(len(tokens)):
            ids = tokens[row][mask[row]].tolist()
            results.append((ids, tokenizer.decode(ids)))
    return results


@torch.no_grad()
def evaluate(model, tokenizer, eval_rows, config, step, out):
    """Greedy accuracy and pass@k on the held-out rows under both rewards; writes credit.html for a few completions.

    greedy_accuracy and pass@k are under the run's --reward; the _strict and _symbolic keys give
    both checkers whatever trains (strict compares with the paper, symbolic counts right answers).
    The k samples of problem i draw from prompt_seed("eval", seed, step, i), apart from training's.
    Distributed: each rank evaluates a contiguous share of the problems, the scores are gathered,
    and rank 0 writes credit.html from its share (the first problems).
    """
    model.eval()
    device, k = model.lm_head.weight.device, config.pass_k
    share = math.ceil(len(eval_rows) / world_size())
    first = process_rank() * share
    rows = eval_rows[first : first + share]
    prompts = [row["prompt_ids"] for row in rows]
    golds = [row["answer"] for row in rows]
    greedy = generate_texts(model, tokenizer, prompts, config, 0.0)
    generators = [torch.Generator(device).manual_seed(prompt_seed("eval", config.seed, step, first + i)) for i in range(len(rows))]
    sampled = generate_texts(model, tokenizer, prompts, config, config.temperature, [g for g in generators for _ in range(k)], k)
    scores, timeouts = {}, 0  # {(greedy or sampled, reward): this share's scores}
    for reward, scorer in (("strict", score_strict), ("symbolic", score_symbolic)):
        scores["greedy", reward], greedy_timeouts = scorer([text for _, text in greedy], golds, config)
        scores["sampled", reward], sampled_timeouts = scorer([text for _, text in sampled], [g for g in golds for _ in range(k)], config)
        timeouts += greedy_timeouts + sampled_timeouts
    shares = gather((scores, timeouts))  # in rank order: the problems in file order
    result = {"step": step}
    for reward in ("strict", "symbolic"):
        greedy_scores = [x for share_scores, _ in shares for x in share_scores["greedy", reward]]
        sampled_scores = torch.tensor([x for share_scores, _ in shares for x in share_scores["sampled", reward]], dtype=torch.float64)
        result[f"greedy_accuracy_{reward}"] = sum(greedy_scores) / len(eval_rows)
        result[f"pass@{k}_{reward}"] = sampled_scores.view(len(eval_rows), k).amax(dim=1).mean().item()
    result["greedy_accuracy"] = result[f"greedy_accuracy_{config.reward}"]
    result[f"pass@{k}"] = result[f"pass@{k}_{config.reward}"]
    result["reward_timeouts"] = sum(t for _, t in shares)

    if config.html_completions and process_rank() == 0 and rows:
        write_credit_page(model, tokenizer, rows, sampled, scores["sampled", config.reward], config, step, out)
    return result


def write_credit_page(model, tokenizer, eval_rows, sampled, scores, config, step, out):
    """credit.html: the k sampled completions of the first evaluation problem whose rewards differ
    (else the first problem), right and wrong ones alternating, up to html_completions of them, each
    with its reward and the GRPO advantage its group gives it, and all seven methods' weights."""
    k, device = config.pass_k, model.lm_head.weight.device
    groups = torch.tensor(scores).view(-1, k)  # (problems, k)
    spread = (groups.amax(dim=1) > groups.amin(dim=1)).nonzero().flatten().tolist()
    problem = spread[0] if spread else 0
    rewards = groups[problem]  # (k,)
    advantages = group_advantages(rewards, torch.zeros(k, dtype=torch.long), config.advantage) if k > 1 else torch.zeros(k)
    right, wrong = [i for i in range(k) if rewards[i] > 0], [i for i in range(k) if rewards[i] <= 0]
    order = [i for pair in itertools.zip_longest(right, wrong) for i in pair if i is not None]
    shown = [i for i in order if sampled[problem * k + i][0]][: config.html_completions]
    if not shown:
        return
    completions = [sampled[problem * k + i][0] for i in shown]
    width = max(len(ids) for ids in completions)
    tokens = torch.zeros(len(shown), width, dtype=torch.long, device=device)  # (n, T)
    mask = torch.zeros(len(shown), width, dtype=torch.bool, device=device)  # (n, T)
    for row, ids in enumerate(completions):
        tokens[row, : len(ids)], mask[row, : len(ids)] = torch.tensor(ids, device=device), True
    prompt = eval_rows[problem]["prompt_ids"]
    weights = all_method_weights(model, [prompt] * len(shown), tokens, mask, config.power, config.credit_eps, tokenizer.vocab_size)
    sections = []
    for row, (i, ids) in enumerate(zip(shown, completions)):
        facts = {"completion": f"{i + 1} of {k} sampled at temperature {config.temperature}",
                 "problem": eval_rows[problem]["problem"], "gold answer": eval_rows[problem]["answer"],
                 f"reward ({config.reward})": f"{rewards[i].item():g}", f"advantage ({config.advantage})": f"{advantages[i].item():+.3f}"}
        sections.append(credit_section([tokenizer.decode([t]) for t in ids], {m: w[row, : len(ids)] for m, w in weights.items()}, facts))
    title = f"token credit: {out}, step {step} (training method: {config.credit}, rank {config.rank})"
    write_atomically(Path(out) / "credit.html", credit_page(title, sections, max(len(ids) for ids in completions)))


# ----------------------------------------------------------------------------------------------
# Files: atomic writes, checkpoints, resume
#
# A run directory holds what this project writes: RUN_FILES, checkpoint/ (with checkpoint.tmp/ and
# checkpoint.old/ during a save) and adapter/ (adapter.tmp/). An --out that is not a run directory
# is refused, and nothing is ever deleted that is not one of these.

RUN_FILES = ("config.json", "metrics.jsonl", "eval.json", "credit.html")
MAX_SKIPPED_IN_A_ROW = 3  # non-finite steps in a row before the run stops


def write_atomically(path, text):
    path = Path(path)
    staged = path.with_name(path.name + ".tmp")
    staged.write_text(text)
    staged.replace(path)


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
    states of every rank (one process: a list of one).

    Written to checkpoint.tmp, then swapped in: checkpoint -> checkpoint.old, checkpoint.tmp ->
    checkpoint, checkpoint.old removed. A kill at any point leaves checkpoint/ or checkpoint.old/
    complete (find_checkpoint takes the first), and each save first clears what a killed one left.
    """
    out = Path(out)
    staged, current, previous = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    save_adapter(model, staged / "adapter", config.model)
    state = {"step": step, "data_position": step * config.prompts_per_micro_batch * config.micro_batches,
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng, "config": asdict(config)}
    torch.save(state, staged / "state.pt")
    if current.exists():  # complete (it was renamed into place whole), so a leftover checkpoint.old is stale
        shutil.rmtree(previous, ignore_errors=True)
        current.rename(previous)
    staged.rename(current)
    shutil.rmtree(previous, ignore_errors=True)


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
        raise SystemExit(f"{path}: refused: it holds more than tensors, numbers, strings, lists and dicts, which a checkpoint "
                         f"written by train.py never does, so loading it could run code ({str(err).splitlines()[0]})") from None
    except (OSError, RuntimeError, EOFError) as err:
        raise SystemExit(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    state["optimizer"]["state"] = {index: {name: value if name == "step" else value.to(device) for name, value in moments.items()}
                                   for index, moments in state["optimizer"]["state"].items()}
    return state


def is_run_directory(out):
    """Whether out/config.json is one that train.py wrote."""
    try:
        info = json.loads((Path(out) / "config.json").read_text())
        return isinstance(info, dict) and isinstance(info.get("config"), dict) and "trainable_parameters" in info
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False


def check_resumable(out, config):
    """The saved config must equal this one in everything but the step budget, the output path and gradient checkpointing."""
    saved = json.loads((Path(out) / "config.json").read_text())["config"]
    current = asdict(config)
    same_run = ("steps", "out", "gradient_checkpointing")  # the step budget, the path, and a memory trade that changes no number
    differences = [f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in current if k not in same_run and saved.get(k) != current[k]]
    if differences:
        raise SystemExit(f"--resume: the config differs from the run in {out} (only --steps may change):\n  " + "\n  ".join(differences))


def prepare_out(out, resume):
    """The checkpoint to resume from, or None for a fresh start in `out`; refuses what would lose a user's files.

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
        raise SystemExit(f"{out} exists and is not a run directory of this project (it holds {', '.join(found)}); "
                         "nothing was touched: pass a new or empty --out")
    checkpoint = find_checkpoint(out)
    if checkpoint is None:
        print(f"{out}: the run there stopped before its first checkpoint; starting it again")
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
            (out / (name + ".tmp")).unlink(missing_ok=True)
        for name in ("checkpoint.tmp", "adapter.tmp"):
            shutil.rmtree(out / name, ignore_errors=True)
        return None
    if not resume:
        raise SystemExit(f"{out} already holds a run; pass --resume to continue it or --out for a new one (nothing was overwritten)")
    return checkpoint


def truncate_logs(out, step):
    """Keep each step once: drop metrics and evaluations written after the checkpoint (and a torn line)."""
    rows = [row for row in read_metrics(out) if row["step"] <= step]
    write_atomically(Path(out) / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    evals = Path(out) / "eval.json"
    if evals.exists():
        write_atomically(evals, json.dumps([e for e in json.loads(evals.read_text()) if e["step"] <= step], indent=1))


def append_line(path, row):
    """One JSON line, flushed to the disk before the step counts as done."""
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM during training: the first lets the step in progress finish, then
    the run saves that step's checkpoint and exits (130, 143); a second stops at once."""

    def __init__(self):
        self.signal = None

    def __call__(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        tqdm.write(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint (send it again to stop now)")


def save_final_adapter(out, model, config):
    staged = out / "adapter.tmp"
    shutil.rmtree(staged, ignore_errors=True)
    save_adapter(model, staged, config.model)
    shutil.rmtree(out / "adapter", ignore_errors=True)
    staged.rename(out / "adapter")


# ----------------------------------------------------------------------------------------------
# The run


def cosine_with_warmup(warmup_steps, total_steps):
    """lr multiplier of transformers' get_cosine_schedule_with_warmup (the reference code's):
    step / warmup_steps during warm-up, so the first update runs at lr 0, then a half cosine to 0.
    warmup 2, total 4 -> steps 0..4: 0, 0.5, 1, 0.5, 0."""

    def multiplier(step):
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))  # held at 0 past the end (resume with more --steps)

    return multiplier


def step_prompts(train_rows, step, prompts_per_step, seed):
    """The prompts of one step: a fresh seeded permutation of the data each epoch."""
    rows = []
    for index in range(step * prompts_per_step, (step + 1) * prompts_per_step):
        epoch, offset = divmod(index, len(train_rows))
        order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(seed + epoch))
        rows.append(train_rows[order[offset]])
    return rows


def is_eval_step(step, config):
    return step == 0 or step % config.eval_every == 0 or step == config.steps


def start_distributed():
    """(rank, number of ranks, device): torchrun's process group (NCCL on GPUs, gloo on CPUs), or (0, 1, the one device)."""
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


def load_model(config, device, rank, ranks):
    """The model with its LoRA adapter, and the tokenizer. The demo's checkpoint is built on first use.
    The same LoRA A on every rank (seeded before apply_lora), then each rank its own dropout masks.
    --gradient-checkpointing auto is resolved here (memory.py) and the config keeps the answer."""
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    if config.task == "demo" and config.model == DEMO.model:
        import demo

        on_first_rank(lambda: demo.build_demo_checkpoint(config.model), rank, ranks)  # built once, then cached
    model = Qwen3.from_pretrained(config.model, device=device, dtype=getattr(torch, config.dtype))
    apply_lora(model, config.rank, config.lora_alpha, config.lora_dropout, compute_dtype=getattr(torch, config.lora_dtype))
    if ranks > 1:
        torch.manual_seed(config.seed + 1 + rank)
    config.gradient_checkpointing = resolve_gradient_checkpointing(model.config, config, device)  # auto -> on or off, in config.json
    model.gradient_checkpointing = config.gradient_checkpointing == "on"
    return model, load_tokenizer(config.model)


def write_run_info(out, config, model, device, ranks, train_rows, eval_rows):
    """config.json: the resolved config, where the problems come from, the trainable parameter count."""
    out.mkdir(parents=True, exist_ok=True)
    info = {"config": asdict(config), "data": data_sources(config), "trainable_parameters": sum(p.numel() for p in model.parameters()
            if p.requires_grad), "device": str(device), "processes": ranks}
    write_atomically(out / "config.json", json.dumps(info, indent=1))
    print(f"{out}: {config.preset} preset, task {config.task}, credit {config.credit}, rank {config.rank}, "
          f"{info['trainable_parameters']:,} trainable parameters, {len(train_rows)} training / {len(eval_rows)} eval problems, "
          f"{device}" + (f", {ranks} processes" if ranks > 1 else ""))


def restore(checkpoint_dir, out, config, model, optimizer, scheduler, generator, rank, ranks):
    """Load a checkpoint into the live model, optimiser, scheduler and RNGs; returns (its step, the evaluations so far).
    metrics.jsonl and eval.json lose what was written after it."""
    check_resumable(out, config)
    state = load_state(checkpoint_dir / "state.pt", model.lm_head.weight.device)
    if isinstance(state["rng"], dict):  # a checkpoint from before torchrun support: one process's states
        state["rng"] = [state["rng"]]
    if len(state["rng"]) != ranks:
        raise SystemExit(f"--resume: {out} was trained on {len(state['rng'])} process(es), this is {ranks}; "
                         f"resume it with torchrun --nproc-per-node {len(state['rng'])}" if len(state["rng"]) > 1 else
                         f"--resume: {out} was trained on 1 process, this is {ranks}; resume it with python train.py")
    load_adapter(model, checkpoint_dir / "adapter")
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


def step_batch(train_rows, step, config, rank, ranks):
    """This rank's share of the step's prompts: (prompt ids, gold answers, one random seed per prompt)."""
    per_step = config.prompts_per_micro_batch * config.micro_batches
    share = per_step // ranks
    rows = step_prompts(train_rows, step, per_step, config.seed)[rank * share : (rank + 1) * share]
    seeds = [prompt_seed("rollout", config.seed, step, rank * share + i) for i in range(share)]
    return [r["prompt_ids"] for r in rows], [r["answer"] for r in rows], seeds


def record_eval(model, tokenizer, eval_rows, config, step, out, evals, rank):
    """evaluate() at this step (every rank takes part); rank 0 appends it to eval.json and prints it."""
    result = evaluate(model, tokenizer, eval_rows, config, step, out)
    if rank == 0:
        evals.append(result)
        write_atomically(out / "eval.json", json.dumps(evals, indent=1))
        shown = ("greedy_accuracy", f"pass@{config.pass_k}") if config.reward == "symbolic" else (
            "greedy_accuracy_strict", f"pass@{config.pass_k}_strict", "greedy_accuracy_symbolic", f"pass@{config.pass_k}_symbolic")
        tqdm.write(f"step {step}: " + ", ".join(f"{k} {result[k]:.3f}" for k in shown))


class Progress:
    """A live bar on a terminal; in a log file, a plain line every 5% of the run."""

    def __init__(self, config, start_step, rank):
        self.config, self.rank = config, rank
        self.interactive, self.every = sys.stderr.isatty() and rank == 0, max(1, config.steps // 20)
        self.bar = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps, desc="GRPO", dynamic_ncols=True,
                        disable=not self.interactive)

    def __iter__(self):
        return iter(self.bar)

    def show(self, step, metrics):
        seconds = metrics["rollout_s"] + metrics["reward_s"] + metrics["train_s"]
        self.bar.set_postfix(reward=f"{metrics['reward_mean']:.2f}", gini=f"{metrics['weight_gini']:.2f}", s_per_step=f"{seconds:.1f}")
        if not self.interactive and self.rank == 0 and (step % self.every == 0 or step == self.config.steps):
            print(f"step {step}/{self.config.steps}: reward {metrics['reward_mean']:.3f}, gini {metrics['weight_gini']:.3f}, "
                  f"{seconds:.2f} s", flush=True)


class LastFinishedStep:
    """What a stop saves: the last finished step's number, RNG states and scheduler position (the adapter
    and the optimiser are the live ones, unchanged until the next update), and the step last saved."""

    def __init__(self, out, model, optimizer, scheduler, generator, config, rank, ranks, step, saved):
        self.out, self.model, self.optimizer, self.scheduler, self.generator = out, model, optimizer, scheduler, generator
        self.config, self.rank, self.ranks, self.saved, self.skipped_in_a_row = config, rank, ranks, saved, 0
        self.finished(step)

    def finished(self, step, skipped_update=False):
        self.step, self.rng, self.updates = step, rng_states(self.generator), self.scheduler.last_epoch
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped_update else 0

    def save(self):
        rngs = gather(self.rng)  # every rank's RNG states, for an exact resume of each
        if self.rank == 0:
            save_checkpoint(self.out, self.model, self.optimizer, self.scheduler, self.step, rngs, self.config)
        self.saved = self.step

    def save_if_due(self):
        """The periodic checkpoint, the last step's, or the one before stopping on non-finite steps."""
        if self.step % self.config.save_every == 0 or self.step == self.config.steps or self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            self.save()
        if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise SystemExit(f"stopping: {self.skipped_in_a_row} steps in a row had a non-finite loss or gradient and were skipped "
                             f"(steps {self.step - self.skipped_in_a_row + 1}-{self.step}); checkpoint at step {self.step} in "
                             f"{self.out}. Check the rewards for NaN, or lower --lr; --dtype float32 rules out bf16 overflow")

    def save_after_error(self, err):
        """An error or a second signal mid-step: save the last finished step if the adapter has not moved since
        (with several ranks the others may be inside a collective: the last checkpoint stands)."""
        moved = self.scheduler.last_epoch != self.updates  # an update ran after the last finished step
        if self.ranks == 1 and not moved:
            save_checkpoint(self.out, self.model, self.optimizer, self.scheduler, self.step, [self.rng], self.config)
        what = "stopped" if isinstance(err, KeyboardInterrupt) else f"{type(err).__name__} during step {self.step + 1}"
        print(f"\n{what}: " + (f"checkpoint saved at step {self.step} in {self.out}; continue with --resume" if self.ranks == 1 and not moved
                               else f"{self.out}'s last checkpoint stands; continue with --resume"), file=sys.stderr)


def finish(out, model, config, start_step, last, stop_signal, rank):
    """After the loop: a stopped run saves its step and exits 128 + the signal; a finished one writes adapter/."""
    if stop_signal:
        if last.saved != last.step:
            last.save()
        if rank == 0:
            print(f"\n{signal.Signals(stop_signal).name}: checkpoint saved at step {last.step} in {out}; continue with --resume")
        raise SystemExit(128 + stop_signal)
    if rank == 0:
        if start_step >= config.steps:
            print(f"{out}: already finished at step {start_step}; raise --steps to train further")
        if not (out / "adapter" / "adapter_config.json").exists() or start_step < config.steps:
            save_final_adapter(out, model, config)  # a resume also writes what a finished run lacks
        print(f"done: adapter in {out / 'adapter'}, metrics in {out / 'metrics.jsonl'}, evaluations in {out / 'eval.json'}")


def run(config, resume=False):
    """Train (or resume) one run in config.out; returns the directory.

    Durability: a step counts as done once its metrics line is on disk. SIGINT/SIGTERM let the
    step in progress finish, save its checkpoint and exit 130/143. An error (or a second signal)
    saves the last finished step's checkpoint when the adapter has not moved since, so a resume
    from any of these is bit-identical to an uninterrupted run; the run also stops, with a
    checkpoint, after MAX_SKIPPED_IN_A_ROW non-finite steps in a row.

    Under torchrun (WORLD_SIZE > 1) each rank takes an equal, contiguous share of every step's
    prompts and of the evaluation problems; grpo_step sums the gradients; rank 0 alone writes
    files. A prompt's completions draw from prompt_seed(seed, step, its index in the step), so 1
    and N processes sample the same completions up to the float differences of batching. An error
    on one rank ends that process, and torchrun then ends the others; the last checkpoint stands.
    """
    rank, ranks, device = start_distributed()
    out = Path(config.out)
    if (config.prompts_per_micro_batch * config.micro_batches) % ranks:
        raise SystemExit(f"{config.prompts_per_micro_batch * config.micro_batches} prompts per step (--prompts-per-micro-batch x "
                         f"--micro-batches) do not divide among {ranks} processes; use a multiple of {ranks}")
    checkpoint_dir = on_first_rank(lambda: prepare_out(out, resume), rank, ranks)
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    train_rows, eval_rows = on_first_rank(lambda: load_data(config), rank, ranks)  # first: a bad dataset fails in seconds

    model, tokenizer = load_model(config, device, rank, ranks)
    train_rows = encode_prompts(train_rows, tokenizer, config, "training", quiet=rank > 0)
    eval_rows = encode_prompts(select_eval_rows(eval_rows, config), tokenizer, config, "evaluation", quiet=rank > 0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(config.warmup_steps, config.steps))
    generator = torch.Generator(device).manual_seed(config.seed)
    start_step, evals = 0, []
    if checkpoint_dir is not None:
        start_step, evals = restore(checkpoint_dir, out, config, model, optimizer, scheduler, generator, rank, ranks)
    elif rank == 0:
        write_run_info(out, config, model, device, ranks, train_rows, eval_rows)

    last = LastFinishedStep(out, model, optimizer, scheduler, generator, config, rank, ranks, start_step,
                            saved=start_step if checkpoint_dir is not None else None)
    roles_fn = task_roles(config)  # the demo knows which tokens compute the answer: computed_mass/<method>
    stop, stop_signal = StopRequest(), 0
    handlers = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        if is_eval_step(start_step, config) and start_step not in [e["step"] for e in evals]:
            record_eval(model, tokenizer, eval_rows, config, start_step, out, evals, rank)  # step 0, or one a stop interrupted
        progress = Progress(config, start_step, rank)
        for step in progress:
            stop_signal = max(gather(stop.signal or 0))  # every rank stops at the same step
            if stop_signal:
                break
            prompts, golds, seeds = step_batch(train_rows, step, config, rank, ranks)
            metrics, _, _ = grpo_step(model, optimizer, scheduler, prompts, golds, tokenizer, lambda texts, golds: score(texts, golds, config),
                                      config, generator, fidelity=is_eval_step(step + 1, config), prompt_seeds=seeds, roles_fn=roles_fn)
            if rank == 0:
                append_line(out / "metrics.jsonl", {"step": step + 1, **metrics})
            last.finished(step + 1, metrics["skipped_update"])
            progress.show(step + 1, metrics)
            if is_eval_step(step + 1, config):
                record_eval(model, tokenizer, eval_rows, config, step + 1, out, evals, rank)
            last.save_if_due()
    except (KeyboardInterrupt, Exception) as err:
        last.save_after_error(err)
        if isinstance(err, KeyboardInterrupt):
            raise SystemExit(130) from None
        raise
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    finish(out, model, config, start_step, last, stop_signal, rank)
    return out


def main(argv=None):
    config, args, preset_given = parse_args(argv)
    if args.report:
        print(report(args.report))
        if args.plot:
            plot(args.report, args.plot)
        return
    if args.dry_run:
        print(json.dumps({**asdict(config), "data_sources": data_sources(config)}, indent=1))
        return
    if config.preset == "paper" and not torch.cuda.is_available():
        if config.model == PAPER.model:
            raise SystemExit("the paper preset with Qwen3-1.7B needs a CUDA GPU (100 GRPO steps of 32 completions of up to 512 tokens). "
                             "On this machine run the CPU demo, python train.py --preset demo, or pass a small local --model DIR")
        print(f"no CUDA GPU: running the paper preset on the CPU with {config.model}; expect it to be slow")
    if not preset_given:
        print("No CUDA GPU found: running the demo preset (a tiny Qwen3 learning column addition on the CPU: about "
              "under 3 minutes on 2 idle cores, about 40 s of it building the model the first time). On a GPU, `python train.py` runs the "
              "paper's MATH experiment." if config.preset == "demo"
              else "CUDA GPU found: running the paper preset (Qwen3-1.7B-Base on MATH, README: The paper's run).")
    try:
        run(config, resume=args.resume)
        if dist.is_initialized():
            dist.barrier()  # every rank done (rank 0 writes last) before the process group goes
    except torch.cuda.OutOfMemoryError:
        raise SystemExit("CUDA out of memory. Lower memory with --gradient-checkpointing on, --prompts-per-micro-batch 1 "
                         "--micro-batches 8 (same batch), a smaller --eval-batch-size, or --max-new-tokens.") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
