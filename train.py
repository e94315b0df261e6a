"""Train a LoRA adapter with GRPO and token-level credit: the paper's MATH sweep on one GPU, or the demo.

    python train.py                                  # GPU: the paper preset with ARCA; CPU: the demo
    python train.py --preset paper --credit uniform  # one row of the paper's sweep (README, The paper's run)
    python train.py --preset paper --rank 4          # ARCA at rank 4 (lora alpha follows: 2 r)
    python train.py --report runs/*                  # the paper's tables from finished runs

Outputs in --out: config.json (resolved config and trainable parameter count), metrics.jsonl (one
line per step), eval.json (greedy accuracy and pass@k, step 0 first), credit.html (every credit
method's weights on a few evaluation completions), adapter/ (PEFT format) and checkpoint/ (all
that --resume needs: adapter, optimiser, scheduler, step, RNG states).

The configuration is one dataclass; each field is a kebab-case flag. Presets are plain instances.
The loop is `run`: set up, resume, then for each step its prompts, grpo_step, the metrics line, an
evaluation when due and a checkpoint when due. Durability (runs.py), the evaluation (evaluation.py),
ranks (ranks.py) and a step's statistics (step_log.py) live in files of their own.
"""

import argparse
import dataclasses
import json
import math
import os
import random
import signal
import sys
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from compiled_decode import reserve_decode_buffers
from credit import METHODS
from data import (CACHE_DIR, PROMPTS, data_sources, encode_prompts, load_data, prompt_seed, select_eval_rows,
                  step_prompts)
from evaluation import record_eval, score, task_roles
from grpo import grpo_step
from lora import RecentAdapters, apply_lora
from memory import largest_decode_call, resolve_gradient_checkpointing
from model import Qwen3, load_tokenizer
from ranks import barrier, end_distributed, gather, on_first_rank, start_distributed
from report import plot, report
from runs import Checkpointer, StopRequest, append_line, finish, prepare_out, restore, write_atomically
from step_log import StepLog
from trackers import TRACKERS, Tracker


# ----------------------------------------------------------------------------------------------
# Configuration


def option(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    preset: str = option("paper", "preset the other fields start from: paper or demo")
    model: str = option("Qwen/Qwen3-1.7B-Base", "checkpoint directory or Hugging Face hub id")
    task: str = option("math", "problems, prompt and answer rule: math "
                               "(DigitalLearningGmbH/MATH-lighteval), gsm8k (openai/gsm8k) or demo (the CPU "
                               "demo's additions)")
    data: str | None = option(None, "training problems, JSON lines with problem and answer (or solution); "
                                    "default: the task's train split from the hub")
    eval_data: str | None = option(None, "evaluation problems, same format; wins over --eval-set")
    data_revision: str | None = option(None, "hub revision (commit, branch or tag) of the task's dataset; "
                                             "default: the one data.py pins")
    eval_set: str = option("test", "evaluation problems: test (the task's own test split) or math500 "
                                   "(HuggingFaceH4/MATH-500, with --task math)")
    prompt_template: str | None = option(None, "prompt text; {problem} is replaced by the problem; default: "
                                               "the task's (the reference code's for math and gsm8k)")
    credit: str = option("arca", "token credit: uniform, surprisal, entropy, divergence, arca (the "
                                 "paper's five), entropy-gate (TRL's top_entropy_quantile), or a control of "
                                 "this project: arca-shuffled, entropy-top20, arca-recent")
    arca_recent_updates: int = option(5, "k of arca-recent: the adapter now against itself k updates ago "
                                         "(a control of this project, not the paper's)")
    entropy_quantile: float = option(0.2, "rho of entropy-gate: the share of the micro-batch's tokens "
                                          "kept, those at or above its (1 - rho) entropy quantile")
    power: float = option(2.0, "sharpening power p of w = (alpha + eps)^p / sum")
    credit_eps: float = option(1e-8, "eps of the credit weights")
    arca_precision: str = option("bf16", "ARCA's two hidden states: bf16 (the paper's: the training forward "
                                         "and a bf16 adapter-off pass) or exact (two no-grad passes with "
                                         "fp32 activations, so the score is the adapter's, not bf16 "
                                         "rounding)")
    credit_eos: bool = option(False, "train and weight the EOS token that ends a completion (the reference "
                                     "code leaves it out)")
    reward: str = option("strict", "training reward: strict (the reference code's string match) or symbolic "
                                   "(math_reward's equivalence)")
    advantage: str = option("grpo", "advantage estimator: grpo or rloo (README, The method (1))")
    scale_rewards: str = option("group", "grpo's advantage: group ((R - mean) / std over each prompt's "
                                         "completions) or none (R - mean; TRL's scale_rewards none)")
    loss_type: str = option("sequence", "the loss's normaliser (README, The method (2)): sequence (the "
                                        "paper's: each completion's weighted sum, over the step's "
                                        "completions), token (over the step's trained tokens: DAPO's, TRL's "
                                        "dapo) or dr_grpo (over completions x max-new-tokens)")
    mask_truncated: bool = option(False, "give no loss weight to completions that hit max-new-tokens without "
                                         "EOS (TRL's mask_truncated_completions); they still count in the "
                                         "rewards and in truncated")
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
    top_k: int = option(50, "keep only the k most likely tokens before top-p, 0 = off (transformers' "
                            "default 50)")
    beta: float = option(0.0, "coefficient of the k3 KL to the base model")
    diagnose_all: bool = option(True, "log every method's Gini, EffN/T and top-10% mass on each step's "
                                      "completions (adds an adapter-off pass on one micro-batch when the "
                                      "method has none)")
    updates_per_batch: int = option(1, "optimiser updates per batch of rollouts; > 1 uses the PPO clipped "
                                       "ratio")
    clip_eps: float = option(0.2, "PPO clip range, used when updates-per-batch > 1")
    eval_problems: int | None = option(None, "evaluation problems: the first ones of the eval set, in file "
                                             "order; default 200 (math500: all 500)")
    eval_sample: bool = option(False, "evaluate on a fixed seeded sample (seed 0) of the evaluation data "
                                      "instead of its first rows")
    eval_every: int = option(20, "evaluate every this many steps (and at step 0 and the end)")
    pass_k: int = option(4, "k of pass@k (sampled)")
    eval_batch_size: int = option(64, "sequences per generate call in evaluation")
    html_completions: int = option(3, "completions shown in credit.html")
    save_every: int = option(20, "checkpoint every this many steps")
    reward_timeout: float = option(5.0, "seconds the answer checker may spend on one completion")
    seed: int = option(1337, "random seed")
    dtype: str = option("bfloat16", "base weight dtype: bfloat16 or float32 (LoRA weights are fp32)")
    lora_dtype: str = option("bfloat16", "dtype of the LoRA update's matmuls (A, B and AdamW's state stay "
                                         "fp32): bfloat16 or float32; never narrower than the activations "
                                         "(an exact-ARCA pass computes fp32)")
    gradient_checkpointing: str = option("auto", "recompute each layer in backward to save memory: on, off, "
                                                 "or auto (on when the planned peak without it passes 90% "
                                                 "of the device's memory)")
    compile: bool = option(False, "sample through a static-shape decode step under torch.compile (CUDA "
                                  "graphs on a GPU), compiled once per batch and cache bucket")
    deterministic: bool = option(False, "torch's deterministic algorithms and cuBLAS workspace, so that a "
                                        "GPU run repeats itself (a CPU run always does); slower")
    cpu_threads: int = option(0, "torch CPU threads, 0 = torch's default; the demo pins 1, so it prints the "
                                 "same numbers on every machine")
    report_to: str = option("none", "also send the metrics to none, tensorboard (<out>/tensorboard), wandb "
                                    "or trackio (each imported only when asked)")
    out: str | None = option(None, "output directory; default runs/<preset>-<credit>-r<rank>")


PAPER = TrainConfig()  # the paper's settings (README, The paper's run)

DEMO = dataclasses.replace(
    PAPER,
    preset="demo",
    task="demo",
    model=str(CACHE_DIR / "demo-qwen3"),
    reward="symbolic",
    credit_eos=True,  # stopping after the box is part of the answer
    # 22 sampled tokens: at 1.0 the half-trained model's copies fail too often for a signal in 150 steps
    temperature=0.5,
    top_k=0,
    eval_sample=True,
    # a CPU matmul's rounding depends on its thread count: one thread, the same result everywhere
    cpu_threads=1,
    rank=8,
    lora_dropout=0.0,
    group_size=8,
    prompts_per_micro_batch=16,
    micro_batches=1,
    steps=150,
    lr=1e-3,
    warmup_steps=10,
    max_prompt_tokens=32,
    # completions need 21 or 22 with EOS; more lets a run drift into junk after the box, unseen by the reward
    max_new_tokens=24,
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--report", nargs="+", metavar="DIR",
                        help="print the paper's tables for these runs and exit")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="with --report: also draw accuracy, reward and every signal's Gini over "
                             "steps (needs matplotlib)")
    args = parser.parse_args(argv)

    preset_given = args.preset is not None
    preset = args.preset or ("paper" if torch.cuda.is_available() else "demo")
    if preset not in PRESETS:
        parser.error(f"--preset {preset!r}: expected one of {', '.join(PRESETS)}")
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    overrides = {name: value for name, value in given.items() if value is not None}
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
    choices = {"credit": METHODS, "advantage": ("grpo", "rloo"), "task": ("math", "gsm8k", "demo"),
               "eval_set": ("test", "math500"), "lora_dtype": ("bfloat16", "float32"),
               "gradient_checkpointing": ("auto", "on", "off"), "reward": ("strict", "symbolic"),
               "dtype": ("bfloat16", "float32"), "arca_precision": ("bf16", "exact"),
               "scale_rewards": ("group", "none"), "loss_type": ("sequence", "token", "dr_grpo"),
               "report_to": TRACKERS}
    for name, allowed in choices.items():
        value = getattr(config, name)
        if value not in allowed:
            parser.error(f"--{name.replace('_', '-')} {value!r}: expected one of {', '.join(allowed)}")
    at_least_1 = (lambda v: v >= 1, ">= 1")
    at_least_0 = (lambda v: v >= 0, ">= 0")
    above_0 = (lambda v: v > 0, "> 0")
    ranges = {  # flag: (test, the valid range as the error states it)
        "steps": at_least_1, "rank": at_least_1,
        "group_size": (lambda v: v >= 2, ">= 2 (a group baseline needs 2 completions)"),
        "prompts_per_micro_batch": at_least_1, "micro_batches": at_least_1, "max_prompt_tokens": at_least_1,
        "max_new_tokens": at_least_1, "updates_per_batch": at_least_1, "pass_k": at_least_1,
        "eval_problems": at_least_1, "eval_every": at_least_1, "save_every": at_least_1,
        "eval_batch_size": at_least_1, "top_k": at_least_0, "warmup_steps": at_least_0,
        "html_completions": at_least_0, "cpu_threads": at_least_0, "power": at_least_0,
        "credit_eps": at_least_0,
        "lora_alpha": above_0, "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"), "lr": above_0,
        "weight_decay": at_least_0, "grad_clip": above_0, "temperature": at_least_0,
        "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"), "beta": at_least_0, "clip_eps": above_0,
        "reward_timeout": above_0, "arca_recent_updates": at_least_1,
        "entropy_quantile": (lambda v: 0 < v <= 1, "in (0, 1]"),
    }
    for name, (valid, described) in ranges.items():
        value = getattr(config, name)
        if not (math.isfinite(value) and valid(value)):
            parser.error(f"--{name.replace('_', '-')} {value}: expected a value {described}")
    if config.eval_set == "math500" and config.task != "math":
        parser.error("--eval-set math500 is HuggingFaceH4/MATH-500, 500 MATH problems with MATH's answers; "
                     f"--task {config.task} has its own test split (--eval-set test) or takes "
                     "--eval-data FILE")


# ----------------------------------------------------------------------------------------------
# Setting up a run


def cosine_with_warmup(warmup_steps, total_steps):
    """lr multiplier of transformers' get_cosine_schedule_with_warmup (the reference code's):
    step / warmup_steps during warm-up, so the first update runs at lr 0, then a half cosine to 0.
    warmup 2, total 4 -> steps 0..4: 0, 0.5, 1, 0.5, 0."""

    def multiplier(step):
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))  # 0 past the end (resumed for longer)

    return multiplier


def is_eval_step(step, config):
    return step == 0 or step % config.eval_every == 0 or step == config.steps


def load_model(config, device, rank, ranks):
    """The model with its LoRA adapter, and the tokenizer. The demo's checkpoint is built on first use.
    The same LoRA A on every rank (seeded before apply_lora), then each rank its own dropout masks.
    --gradient-checkpointing auto is resolved here (memory.py) and the config keeps the answer. With
    --compile the decode buffers of the run's largest generate call are reserved here, once."""
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    if config.task == "demo" and config.model == DEMO.model:
        import demo

        on_first_rank(lambda: demo.build_demo_checkpoint(config.model), rank, ranks)  # built once, cached
    model = Qwen3.from_pretrained(config.model, device=device, dtype=getattr(torch, config.dtype))
    lora_dtype = getattr(torch, config.lora_dtype)
    apply_lora(model, config.rank, config.lora_alpha, config.lora_dropout, compute_dtype=lora_dtype)
    if ranks > 1:
        torch.manual_seed(config.seed + 1 + rank)
    # auto becomes on or off here, and config.json records which
    config.gradient_checkpointing = resolve_gradient_checkpointing(model.config, config, device)
    model.gradient_checkpointing = config.gradient_checkpointing == "on"
    if config.compile:  # the largest generate call's decode buffers, allocated once
        reserve_decode_buffers(model, *largest_decode_call(config, ranks))
    return model, load_tokenizer(config.model)


def check_processes(config, ranks):
    """The step's prompts must divide among the processes (each takes an equal share)."""
    per_step = config.prompts_per_micro_batch * config.micro_batches
    if per_step % ranks:
        raise SystemExit(f"{per_step} prompts per step (--prompts-per-micro-batch x --micro-batches) do not "
                         f"divide among {ranks} processes; use a multiple of {ranks}")


def optimizer_and_schedule(model, config, device):
    """AdamW on the LoRA parameters, and the reference's warm-up then cosine schedule (by update)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay,
                                  fused=device.type == "cuda")
    schedule = cosine_with_warmup(config.warmup_steps, config.steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def write_run_info(out, config, model, device, ranks, train_rows, eval_rows):
    """config.json: the resolved config, where the problems come from, the trainable parameter count."""
    out.mkdir(parents=True, exist_ok=True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info = {"config": asdict(config), "data": data_sources(config), "trainable_parameters": trainable,
            "device": str(device), "processes": ranks}
    write_atomically(out / "config.json", json.dumps(info, indent=1))
    print(f"{out}: {config.preset} preset, task {config.task}, credit {config.credit}, rank {config.rank}, "
          f"{trainable:,} trainable parameters, {len(train_rows)} training / {len(eval_rows)} eval problems, "
          f"{device}" + (f", {ranks} processes" if ranks > 1 else ""))


def step_batch(train_rows, step, config, rank, ranks):
    """This rank's share of the step's prompts: (prompt ids, gold answers, one random seed per prompt)."""
    per_step = config.prompts_per_micro_batch * config.micro_batches
    share = per_step // ranks
    rows = step_prompts(train_rows, step, per_step, config.seed)[rank * share : (rank + 1) * share]
    seeds = [prompt_seed("rollout", config.seed, step, rank * share + i) for i in range(share)]
    return [r["prompt_ids"] for r in rows], [r["answer"] for r in rows], seeds


class Progress:
    """A live bar on a terminal; in a log file, a plain line every 5% of the run."""

    def __init__(self, config, start_step, rank):
        self.config, self.rank = config, rank
        self.interactive, self.every = sys.stderr.isatty() and rank == 0, max(1, config.steps // 20)
        self.bar = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps, desc="GRPO",
                        dynamic_ncols=True, disable=not self.interactive)

    def __iter__(self):
        return iter(self.bar)

    def show(self, step, metrics):
        seconds = metrics["rollout_s"] + metrics["reward_s"] + metrics["train_s"]
        self.bar.set_postfix(reward=f"{metrics['reward_mean']:.2f}", gini=f"{metrics['weight_gini']:.2f}",
                             s_per_step=f"{seconds:.1f}")
        if not self.interactive and self.rank == 0 and (step % self.every == 0 or step == self.config.steps):
            print(f"step {step}/{self.config.steps}: reward {metrics['reward_mean']:.3f}, "
                  f"gini {metrics['weight_gini']:.3f}, {seconds:.2f} s", flush=True)


# ----------------------------------------------------------------------------------------------
# The run


def make_deterministic():
    """--deterministic: the cuBLAS workspace that deterministic matmuls need (set before the first one)
    and torch's deterministic algorithms, strict: an operation without a deterministic form on the
    device raises instead of running (the samplers' running sums take sampling.cumulative_sum's fixed
    order; the attention backward its deterministic path). README, Reproducibility."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def run(config, resume=False):
    """Train (or resume) one run in config.out; returns the directory.

    Durability (runs.py): a step counts as done once its metrics line is on disk. SIGINT/SIGTERM let
    the step in progress finish, save its checkpoint and exit 130/143. An error (or a second signal)
    saves the last finished step's checkpoint when the adapter has not moved since, so a resume
    from any of these is bit-identical to an uninterrupted run (on a CPU; on a GPU with
    --deterministic: make_deterministic); the run also stops, with a checkpoint, after
    MAX_SKIPPED_IN_A_ROW non-finite steps in a row.

    Under torchrun (WORLD_SIZE > 1) each rank takes an equal, contiguous share of every step's
    prompts and of the evaluation problems; grpo_step sums the gradients; rank 0 alone writes
    files. A prompt's completions draw from prompt_seed(seed, step, its index in the step), so 1
    and N processes sample the same completions up to the float differences of batching. An error
    on one rank ends that process, and torchrun then ends the others; the last checkpoint stands.
    """
    if config.deterministic:
        make_deterministic()
    rank, ranks, device = start_distributed()
    out = Path(config.out)
    check_processes(config, ranks)
    tracker = Tracker(config.report_to, rank)  # a missing package ends the run here, before anything runs
    checkpoint_dir = on_first_rank(lambda: prepare_out(out, resume), rank, ranks)
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    # the problems first (a bad dataset fails in seconds), then the model, then the prompts as token ids
    train_rows, eval_rows = on_first_rank(lambda: load_data(config), rank, ranks)
    model, tokenizer = load_model(config, device, rank, ranks)
    train_rows = encode_prompts(train_rows, tokenizer, config, "training", quiet=rank > 0)
    eval_rows = select_eval_rows(eval_rows, config)
    eval_rows = encode_prompts(eval_rows, tokenizer, config, "evaluation", quiet=rank > 0)
    optimizer, scheduler = optimizer_and_schedule(model, config, device)
    if config.credit == "arca-recent":  # the adapter before each of the last k updates (grpo.credit_inputs)
        model.recent_adapters = RecentAdapters(model, optimizer, config.arca_recent_updates)
    generator = torch.Generator(device).manual_seed(config.seed)
    start_step, evals = 0, []
    if checkpoint_dir is not None:
        start_step, evals = restore(checkpoint_dir, out, config, model, optimizer, scheduler, generator, rank,
                                    ranks)
    elif rank == 0:
        write_run_info(out, config, model, device, ranks, train_rows, eval_rows)
    tracker.start(out, asdict(config))

    checkpointer = Checkpointer(out, model, optimizer, scheduler, generator, config, rank, ranks, start_step,
                                saved=start_step if checkpoint_dir is not None else None)
    roles_fn = task_roles(config)  # the demo knows which tokens compute the answer: computed_mass/<method>

    def reward_fn(texts, golds):  # the run's --reward, looked up at each call (tests replace `score`)
        return score(texts, golds, config)

    stop, stop_signal = StopRequest(), 0
    handlers = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        if is_eval_step(start_step, config) and start_step not in [e["step"] for e in evals]:
            # step 0's evaluation, or one a stop interrupted
            record_eval(model, tokenizer, eval_rows, config, start_step, out, evals, rank, tracker)
        progress = Progress(config, start_step, rank)
        for step in progress:
            stop_signal = max(gather(stop.signal or 0))  # every rank stops at the same step
            if stop_signal:
                break
            prompts, golds, seeds = step_batch(train_rows, step, config, rank, ranks)
            log = StepLog(model, tokenizer, config, lr=scheduler.get_last_lr()[0],
                          fidelity=is_eval_step(step + 1, config), roles_fn=roles_fn)
            grpo_step(model, optimizer, scheduler, prompts, golds, tokenizer, reward_fn, config, generator,
                      log, prompt_seeds=seeds)
            metrics = log.metrics()
            if rank == 0:
                append_line(out / "metrics.jsonl", {"step": step + 1, **metrics})
                tracker.log(metrics, step + 1)
            checkpointer.finished(step + 1, metrics["skipped_update"])
            progress.show(step + 1, metrics)
            if is_eval_step(step + 1, config):
                record_eval(model, tokenizer, eval_rows, config, step + 1, out, evals, rank, tracker)
            checkpointer.save_if_due()
    except (KeyboardInterrupt, Exception) as err:
        checkpointer.save_after_error(err)
        if isinstance(err, KeyboardInterrupt):
            raise SystemExit(130) from None
        raise
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        tracker.close()
    finish(out, model, config, start_step, checkpointer, stop_signal, rank)
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
            raise SystemExit("the paper preset with Qwen3-1.7B needs a CUDA GPU (100 GRPO steps of 32 "
                             "completions of up to 512 tokens). On this machine run the CPU demo, python "
                             "train.py --preset demo, or pass a small local --model DIR")
        print(f"no CUDA GPU: running the paper preset on the CPU with {config.model}; expect it to be slow")
    if not preset_given and config.preset == "demo":
        print("No CUDA GPU found: running the demo preset (a tiny Qwen3 learning column addition on the CPU: "
              "under 3 minutes on 2 idle cores, up to 40 s of it building the model the first time). On a "
              "GPU, `python train.py` runs the paper's MATH experiment.")
    elif not preset_given:
        print("CUDA GPU found: running the paper preset (Qwen3-1.7B-Base on MATH, README: The paper's run).")
    try:
        run(config, resume=args.resume)
        barrier()  # every rank done (rank 0 writes last) before the process group goes
    except torch.cuda.OutOfMemoryError:
        raise SystemExit("CUDA out of memory. Lower memory with --gradient-checkpointing on, "
                         "--prompts-per-micro-batch 1 --micro-batches 8 (same batch), a smaller "
                         "--eval-batch-size, or --max-new-tokens.") from None
    finally:
        end_distributed()


if __name__ == "__main__":
    main()
