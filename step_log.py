"""What a GRPO step measures: its statistics, phase times and peak memory, and the passes that only
measure (every credit method on the same completions, ARCA's fidelity, the task's token roles).

grpo.grpo_step hands its tensors to a StepLog at four places: the rollout (`sampled`), the reward
(`scored`), each micro-batch (`micro_batch`) and each update (`update`). The statistics are summed on
the device and read to the host once per update, together with the grad norm (`update` returns
whether both are finite, so the step knows whether to apply the update); `metrics()` then gives the
line of metrics.jsonl, gathered over the ranks in one collective.

On the first micro-batch of the step (rank 0 only) a StepLog also runs the measuring passes:
- every method's Gini, EffN/T and top-10% mass on the same tokens (gini/<method>, ...): uniform,
  surprisal, entropy and entropy-top20 always; divergence, ARCA and arca-shuffled when the
  adapter-off pass ran, which diagnose_all runs here when the training method did not;
- ARCA's fidelity at evaluation steps (arca_exact_corr, arca_floor_ratio: how much of the score that
  trains is the adapter's and how much bf16 rounding; README, ARCA's precision);
- with a task that knows which tokens compute its answer (the demo's roles_fn), each method's share
  of weight on them (computed_mass/<method>), on every micro-batch.
"""

import math
import resource
import time

import torch

from credit import METHODS, arca_scores, credit_weights, diagnostic_sums
from grpo import completion_forward, completion_hidden, exact_adapted_hidden, reference_pass
from lora import disable_adapter
from ranks import gather, process_rank


class StepLog:
    """The observer of one grpo_step (see the module docstring); `metrics()` after the step.

    lr: the learning rate the step's update runs at; fidelity: measure ARCA's fidelity (train.py asks
    at evaluation steps); roles_fn(problem text, completion token texts): which tokens compute the
    answer (a list of bools, or None when the completion cannot be parsed), for a task that knows.
    """

    def __init__(self, model, tokenizer, config, lr, fidelity=False, roles_fn=None):
        self.model, self.tokenizer, self.config, self.lr = model, tokenizer, config, lr
        self.fidelity, self.roles_fn = fidelity, roles_fn
        self.device = model.lm_head.weight.device
        self.clock = PhaseClock(self.device)
        self.totals, self.reports, self.roles = {}, [], None

    def sampled(self, rollout):
        self.rollout = rollout
        self.clock.lap("rollout")

    def scored(self, completions, scores, timeouts):
        self.completions, self.scores, self.timeouts = completions, scores, timeouts
        if self.roles_fn:  # the task's computed tokens, to measure where each method's credit lands
            self.roles = token_roles(self.rollout, completions.ids, self.tokenizer, self.roles_fn)
        self.clock.lap("reward")

    def micro_batch(self, rows, mask, inputs, weights, loss, kl):
        """Add this micro-batch's statistics (device tensors, no read); mask (B, T) is its trained tokens."""
        first_of_step = not self.reports and not self.totals and process_rank() == 0  # measure: once, rank 0
        width, rollout = mask.shape[1], self.rollout
        roles = None if self.roles is None else (self.roles[0][rows, :width], self.roles[1][rows])
        stats = micro_batch_statistics(
            self.model, rollout.prompts[rows], rollout.tokens[rows, :width], mask,
            rollout.sampler_logprobs[rows, :width], inputs, weights, loss, kl, self.config,
            diagnose_all=first_of_step and self.config.diagnose_all, fidelity=first_of_step and self.fidelity,
            seeds=rollout.seeds[rows], roles=roles)
        self.totals = add_statistics(self.totals, stats)

    def update(self, grad_norm):
        """The update's statistics and grad norm read to the host (one copy); whether both are finite."""
        self.reports.append(read_statistics(self.totals, grad_norm))
        self.totals = {}
        return math.isfinite(self.reports[-1]["grad_norm"]) and math.isfinite(self.reports[-1]["loss"])

    def metrics(self):
        """The step's line of metrics.jsonl (over every rank's completions)."""
        self.clock.lap("train")
        completions = self.completions
        return step_metrics(self.reports, self.scores, completions.lengths, completions.stopped,
                            self.timeouts, self.lr, self.clock, self.device, self.config)


# ----------------------------------------------------------------------------------------------
# Statistics summed on the device, read to the host once per update


def token_roles(rollout, ids, tokenizer, roles_fn):
    """(computed (N, T) bool, parsed (N,) bool) on the device, from roles_fn(problem, completion token texts)
    for each completion (ids: their token ids); a completion roles_fn cannot parse has no computed token
    and parsed False."""
    computed = torch.zeros(rollout.tokens.shape, dtype=torch.bool)  # (N, T) on the host
    parsed = torch.zeros(len(ids), dtype=torch.bool)  # (N,)
    for row, (prompt, completion) in enumerate(zip(rollout.prompts, ids)):
        flags = roles_fn(tokenizer.decode(prompt), [tokenizer.decode([token]) for token in completion])
        if flags is not None:
            computed[row, : len(flags)], parsed[row] = torch.tensor(flags, dtype=torch.bool), True
    return computed.to(rollout.tokens.device), parsed.to(rollout.tokens.device)


def micro_batch_statistics(model, prompts, tokens, mask, sampler_logprobs, inputs, weights, loss, kl, config,
                           diagnose_all=False, fidelity=False, seeds=None, roles=None):
    """This micro-batch's contribution to the step's metrics, as device tensors (sums; *_max: maxima).
    sampler_logprobs (B, T): the rollout's, for the sampler/trainer gap; the rest as train_micro_batch's.

    Every method's Gini, EffN/T and top-10% mass on the same tokens (gini/<method>, ...; sums over
    rows, with rows/<method>): uniform, surprisal, entropy and entropy-top20 always, divergence,
    ARCA and arca-shuffled when the adapter-off pass ran. diagnose_all runs that pass here when the
    step did not. fidelity adds arca_exact_corr and arca_floor_ratio (credit arca; see
    arca_fidelity). roles, (computed (B, T), parsed (B,)) from token_roles, add each method's weight
    on the computed tokens of the parsed completions (computed_mass/<method>, with parsed/<method>)
    and the count of completions the task could not parse.
    """
    gap = ((inputs["token_logprobs"] - sampler_logprobs).abs() * mask).sum()
    entropy = (inputs["entropies"] * mask).sum()
    stats = {"loss": loss, "kl": kl, "trained_tokens": mask.sum(), "entropy_sum": entropy,
             "logprob_gap_sum": gap}
    if diagnose_all and inputs["h_base"] is None:
        inputs = {**inputs, **reference_pass(model, prompts, tokens, mask, config)}
    for method in measurable(inputs):
        if method == config.credit:
            method_weights = weights
        else:
            method_weights = credit_weights(method, mask, config.credit_eps, config.power, seeds, **inputs)
        for key, value in zip(("gini", "effective_token_ratio", "top10_mass", "rows"),
                              diagnostic_sums(method_weights, mask)):
            stats[f"{key}/{method}"] = value  # gini/arca, rows/arca, ...
        if method == "entropy-gate":  # the share of the trained tokens the gate keeps
            stats["kept/entropy-gate"] = ((method_weights > 0) & mask).sum()
        if roles is not None:
            computed, parsed = roles[0] & mask, roles[1] & mask.any(dim=1)  # (B, T), (B,)
            stats[f"computed_mass/{method}"] = ((method_weights * computed).sum(dim=1) * parsed).sum()
            stats[f"parsed/{method}"] = parsed.sum()
    trains = config.credit
    stats.update(rows=stats[f"rows/{trains}"], weight_gini=stats[f"gini/{trains}"],
                 effective_token_ratio=stats[f"effective_token_ratio/{trains}"],
                 top10_mass=stats[f"top10_mass/{trains}"])
    if roles is not None:
        stats["unparsed_completions"] = (~roles[1]).sum()
    if inputs["h_base"] is not None:
        residual = arca_scores(inputs["h_adapted"], inputs["h_base"]) * mask  # (B, T) ||h_adapted - h_base||
        stats.update(arca_norm_sum=residual.sum(), arca_norm_max=residual.max(), arca_tokens=mask.sum())
        if fidelity and config.credit == "arca":
            exact = config.arca_precision == "exact"
            stats["arca_exact_corr"], stats["arca_floor_ratio"] = arca_fidelity(
                model, prompts, tokens, mask, inputs["h_adapted"], inputs["h_base"], exact)
    return stats


def measurable(inputs):
    """The methods these credit inputs give weights for: the training forward's alone (uniform,
    surprisal, entropy, entropy-top20, entropy-gate), with the adapter-off pass divergence, ARCA and
    arca-shuffled too, and arca-recent when it trains (its older adapter's pass ran)."""
    needs = {"divergence": "h_base", "arca": "h_base", "arca-shuffled": "h_base", "arca-recent": "h_recent"}
    return [method for method in METHODS if method not in needs or inputs.get(needs[method]) is not None]


def add_statistics(totals, stats):
    """Micro-batch statistics added up: sums add, *_max take the larger. (The fidelity figures come
    from one micro-batch, the first, so they are never added.)"""
    merged = dict(totals)
    for key, value in stats.items():
        if key not in merged:
            merged[key] = value
        elif key.endswith("_max"):
            merged[key] = torch.maximum(merged[key], value)
        else:
            merged[key] = merged[key] + value
    return merged


def read_statistics(totals, grad_norm):
    """The update's statistics and its grad norm as Python floats, in one read from the device; with
    several ranks, every rank's sums and maxima merged (one collective)."""
    names = [*totals, "grad_norm"]
    values = [torch.as_tensor(totals[name], dtype=torch.float32, device=grad_norm.device) for name in totals]
    local = dict(zip(names, torch.stack(values + [grad_norm.float()]).tolist()))
    return {**merge_totals(gather(local)), "grad_norm": local["grad_norm"]}  # the grad norm is every rank's


def merge_totals(totals_by_rank):
    """Sum the ranks' statistics; maxima take the max."""
    merged = {}
    for totals in totals_by_rank:
        for key, value in totals.items():
            if key.endswith("_max"):
                merged[key] = max(merged.get(key, value), value)
            else:
                merged[key] = merged.get(key, 0) + value
    return merged


def step_metrics(reports, rewards, lengths, stopped, timeouts, lr, clock, device, config):
    """The metrics line of a step (metrics.jsonl): the first update's statistics, the last update's grad
    norm, and the step's rewards, lengths, stops and times over every rank (one collective)."""
    first, last = reports[0], reports[-1]
    local = dict(rewards=rewards, lengths=lengths, stopped=stopped, timeouts=timeouts, phases=clock.seconds(),
                 peak_memory_gb=peak_memory_gb(device))
    by_rank = gather(local)
    rewards = [r for rank in by_rank for r in rank["rewards"]]  # every rank's, in order: Python numbers
    lengths = [n for rank in by_rank for n in rank["lengths"]]
    stopped = [s for rank in by_rank for s in rank["stopped"]]
    phases = {name: max(rank["phases"][name] for rank in by_rank) for name in ("rollout", "reward", "train")}
    K = config.group_size
    groups = [rewards[start : start + K] for start in range(0, len(rewards), K)]  # in order
    rows, trained_tokens = max(first["rows"], 1), max(first["trained_tokens"], 1)
    mean = sum(rewards) / len(rewards)  # (a NaN reward makes a NaN mean and std, as it should)
    arca_norm_mean = None  # no adapter-off pass, no residual
    if "arca_norm_sum" in first:
        arca_norm_mean = first["arca_norm_sum"] / max(first["arca_tokens"], 1)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (len(rewards) - 1)) if len(rewards) > 1 else 0.0
    per_method = {f"{key}/{method}": first[f"{key}/{method}"] / first[f"rows/{method}"]
                  for method in METHODS if first.get(f"rows/{method}")
                  for key in ("gini", "effective_token_ratio", "top10_mass")}
    computed_mass = {f"computed_mass/{method}": first[f"computed_mass/{method}"] / first[f"parsed/{method}"]
                     for method in METHODS if first.get(f"parsed/{method}")}  # a task with roles_fn
    return {
        "reward_mean": mean,
        "reward_std": std,
        "zero_spread_groups": sum(max(group) == min(group) for group in groups) / len(groups),
        "reward_timeouts": sum(rank["timeouts"] for rank in by_rank),
        "loss": first["loss"],
        "kl": first["kl"],
        "logprob_gap": first["logprob_gap_sum"] / trained_tokens,
        "entropy": first["entropy_sum"] / trained_tokens,
        "kept/entropy-gate": first["kept/entropy-gate"] / trained_tokens,
        "completion_len": sum(lengths) / len(lengths),
        "truncated": 1 - sum(stopped) / len(stopped),
        "weight_gini": first["weight_gini"] / rows,
        "effective_token_ratio": first["effective_token_ratio"] / rows,
        "top10_mass": first["top10_mass"] / rows,
        "arca_norm_mean": arca_norm_mean,
        "arca_norm_max": first.get("arca_norm_max"),
        "arca_exact_corr": first.get("arca_exact_corr"),  # with fidelity and credit arca
        "arca_floor_ratio": first.get("arca_floor_ratio"),
        **per_method, **computed_mass,
        **{key: first[key] for key in ("unparsed_completions",) if key in first},  # a task with roles_fn
        "grad_norm": last["grad_norm"],
        "skipped_update": not (math.isfinite(last["grad_norm"]) and math.isfinite(last["loss"])),
        "lr": lr,
        "rollout_s": phases["rollout"],
        "reward_s": phases["reward"],
        "train_s": phases["train"],
        "tokens_per_s": sum(lengths) / sum(phases.values()),
        "peak_memory_gb": max(rank["peak_memory_gb"] for rank in by_rank),
    }


class PhaseClock:
    """Seconds spent in each phase of a step (the device synchronised at each lap, so a GPU's queued work
    counts)."""

    def __init__(self, device):
        self.device, self.last, self.laps = device, time.perf_counter(), {}

    def lap(self, name):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.laps[name], self.last = now - self.last, now

    def seconds(self):
        return dict(self.laps)


def peak_memory_gb(device):
    """Peak GPU memory allocated by torch, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


# ----------------------------------------------------------------------------------------------
# Passes that only measure: ARCA's fidelity, every method on the same completions


def pearson(x, y):
    """Pearson correlation of two 1-D tensors (0 when either is constant)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = (x.norm() * y.norm()).item()
    return (x @ y).item() / denominator if denominator > 0 else 0.0


def arca_fidelity(model, prompts, tokens, mask, h_adapted, h_base, exact):
    """How much of ARCA's score is the adapter: (Pearson per token between the ARCA scores that train
    and the exact ones, mean bf16-computed score / mean exact score), on this micro-batch.

    h_adapted, h_base: the pair ARCA trains on (fp32 if exact). The missing pair is computed here:
    the exact one in bf16 mode; in exact mode the bf16 one, with dropout off.
    """
    with torch.no_grad():
        if exact:
            exact_scores = arca_scores(h_adapted, h_base)[mask]  # (valid,)
            was_training = model.training
            model.eval()
            bf16_adapted = completion_hidden(model, prompts, tokens, mask)
            with disable_adapter(model):
                bf16_scores = arca_scores(bf16_adapted, completion_hidden(model, prompts, tokens, mask))[mask]
            model.train(was_training)
            training_scores = exact_scores
        else:
            with disable_adapter(model):
                exact_base = completion_hidden(model, prompts, tokens, mask, torch.float32)
            exact_scores = arca_scores(exact_adapted_hidden(model, prompts, tokens, mask), exact_base)[mask]
            bf16_scores = training_scores = arca_scores(h_adapted, h_base)[mask]
    floor_ratio = float("nan")  # no adapter yet: no ratio
    if exact_scores.sum() > 0:
        floor_ratio = bf16_scores.mean().item() / exact_scores.mean().item()
    return pearson(training_scores, exact_scores), floor_ratio


@torch.no_grad()
def all_method_weights(model, prompts, tokens, mask, power, eps=1e-8, vocab_size=None):
    """{method: weights (B, T)} for every credit method on the same completions (eval mode, no grad;
    arca-recent aside: its older adapter belongs to a training step)."""
    model.eval()
    mask = mask.bool()
    logprobs, entropies, h_adapted = completion_forward(model, prompts, tokens, mask, vocab_size)
    with disable_adapter(model):
        ref_logprobs, _, h_base = completion_forward(model, prompts, tokens, mask, vocab_size)
    inputs = dict(token_logprobs=logprobs, entropies=entropies, ref_token_logprobs=ref_logprobs,
                  h_adapted=h_adapted, h_base=h_base)
    return {method: credit_weights(method, mask, eps, power, **inputs) for method in measurable(inputs)}
