"""One GRPO step with token-level credit (ARCA and its baselines) on a LoRA-adapted Qwen3.

A step: sample K completions for each of P prompts (adapter on, unmerged, no dropout), score them,
turn the rewards into one advantage per completion, weight each completion's tokens with a credit
method, and take one optimiser step on (ARCA.md §2)

    L = -(1/N) sum_i A_i sum_t w_it log pi(y_it | y_i<t, x_i)   +   beta (1/N) sum_i mean_t k3_it

- N = P * K, the completions of the whole optimiser step. Each micro-batch adds its share of the
  sum divided by this N, so gradient accumulation gives exactly the full-batch gradient.
- A_i: GRPO's group-normalised advantage (sample std, n - 1, floored at eps); RLOO as an option.
- w_it: credit weights from credit.py, summing to 1 over each completion's valid tokens, detached.
  Uniform weights make the inner sum the per-sequence mean log-prob.
- One update per batch (the paper's setting) is exactly on-policy, so the plain log-prob objective
  is used. With several updates per batch, PPO's clipped ratio to the first pass's log-probs
  replaces log pi. With one update per batch the loss value itself is about 0 (the advantages of a
  group sum to 0): its gradient, not its value, carries the signal.
- k3 KL to the reference policy, the base model (adapter off): exp(r) - r - 1 with r = ref - logp,
  a per-completion mean over tokens; beta = 0 by default, as in the paper.

Passes per micro-batch (ARCA.md §5): one training forward, adapter on, with grad, gives the
log-probs, entropies and the adapted last hidden states (taken detached for ARCA). One no-grad
forward with the adapter switched off gives the reference log-probs and the base hidden states,
shared by ARCA, the divergence method and the KL term; it is skipped when none of them is needed.
The reference code runs two extra forwards for ARCA; this runs at most one. In training mode the
adapted forward includes LoRA dropout, so ARCA's h_adapted carries it too. With --arca-precision
exact the adapter-off pass runs with fp32 activations and ARCA's h_adapted comes from one more
no-grad fp32 pass, dropout off (bf16 rounding would otherwise be most of a small adapter's score).
With --no-credit-eos a completion's final EOS is out of the loss, the weights, the KL and the
diagnostics (loss_mask), as in the reference code.

Left out: a value model, reward models, entropy bonuses, filtering of zero-spread groups (they get
A = 0 and add nothing to the policy gradient).
"""

import math
import resource
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from credit import METHODS, arca_scores, credit_diagnostics, credit_scores, token_weights
from lora import disable_adapter, sampling_copies
from model import generate, token_logprobs


# ----------------------------------------------------------------------------------------------
# Advantages (ARCA.md §1)


def group_advantages(rewards, prompt_index, estimator="grpo", eps=1e-4):
    """One advantage per completion, from the rewards of the completions of the same prompt.

    rewards (N,) float, prompt_index (N,) long -> advantages (N,).
    grpo: (R_i - mean_group) / max(std_group, eps), sample std.  rloo: R_i - mean of the others.
    Example, one group of rewards [1, 0, 0, 1]: grpo [0.866, -0.866, -0.866, 0.866],
    rloo [0.667, -0.667, -0.667, 0.667]; a group [1, 1, 1, 1] gives zeros for both.
    """
    num_groups = int(prompt_index.max()) + 1
    counts = torch.bincount(prompt_index, minlength=num_groups).to(rewards.dtype)  # (G,)
    if (counts < 2).any():
        raise ValueError(f"every prompt needs at least 2 completions for a group baseline, got group sizes {counts.tolist()}")
    sums = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device).index_add_(0, prompt_index, rewards)  # (G,)
    if estimator == "rloo":
        others_mean = (sums[prompt_index] - rewards) / (counts[prompt_index] - 1)  # (N,)
        return rewards - others_mean
    if estimator != "grpo":
        raise ValueError(f"unknown advantage estimator {estimator!r}; expected 'grpo' or 'rloo'")
    mean = (sums / counts)[prompt_index]  # (N,)
    squares = torch.zeros_like(sums).index_add_(0, prompt_index, (rewards - mean) ** 2)  # (G,)
    std = (squares / (counts - 1)).sqrt()[prompt_index]  # (N,)
    return (rewards - mean) / std.clamp(min=eps)


# ----------------------------------------------------------------------------------------------
# Forward passes over prompt + completion


def pack_sequences(prompts, completions, completion_mask):
    """Left-pad the prompts and append the completions: the layout of every training forward.

    prompts [[5, 6], [7]], completions [[8, 1], [9, 1]], completion_mask [[1, 1], [1, 0]] ->
        input_ids      [[5, 6, 8, 1], [0, 7, 9, 1]]
        attention_mask [[1, 1, 1, 1], [0, 1, 1, 0]]
    and prompt width P = 2: the hidden state at column P - 1 + t predicts completion token t.
    """
    P = max(len(p) for p in prompts)
    B, T = completions.shape
    device = completions.device
    prompt_ids = torch.zeros(B, P, dtype=torch.long, device=device)  # (B, P)
    prompt_mask = torch.zeros(B, P, dtype=torch.bool, device=device)  # (B, P)
    for row, prompt in enumerate(prompts):
        prompt_ids[row, P - len(prompt) :] = torch.tensor(prompt, device=device)
        prompt_mask[row, P - len(prompt) :] = True
    input_ids = torch.cat([prompt_ids, completions], dim=1)  # (B, P + T)
    attention_mask = torch.cat([prompt_mask, completion_mask.bool()], dim=1)  # (B, P + T)
    return input_ids, attention_mask, P


def completion_logprobs(model, hidden, tokens, vocab_size=None, chunk_size=64):
    """log pi(y_t) and entropies (B, T), fp32, from the hidden states (B, T, H) that predict tokens (B, T).

    Logits are sliced to the tokenizer's vocab_size real ids, as in the sampler. The lm_head runs on chunks of positions. With grad, each chunk is recomputed in backward, so the
    (B, T, vocab) fp32 logits never exist at once (Qwen3: 151,936 columns).
    """
    logprobs, entropies = [], []
    for start in range(0, tokens.shape[1], chunk_size):
        h, y = hidden[:, start : start + chunk_size], tokens[:, start : start + chunk_size]  # (B, C, H), (B, C)
        h = h.to(model.lm_head.weight.dtype)  # an fp32 pass's states meet the head in its own dtype, no fp32 copy of it
        if torch.is_grad_enabled() and h.requires_grad:
            lp, ent = checkpoint(lambda h, y: token_logprobs(model.lm_head(h)[..., :vocab_size], y), h, y, use_reentrant=False)
        else:
            lp, ent = token_logprobs(model.lm_head(h)[..., :vocab_size], y)  # (B, C), (B, C)
        logprobs.append(lp)
        entropies.append(ent)
    return torch.cat(logprobs, dim=1), torch.cat(entropies, dim=1)  # (B, T), (B, T)


def completion_hidden(model, prompts, tokens, mask, compute_dtype=None):
    """Last hidden states (B, T, H) at the positions that score the completion tokens (B, T)."""
    input_ids, attention_mask, P = pack_sequences(prompts, tokens, mask)
    return model(input_ids[:, :-1], attention_mask[:, :-1], compute_dtype=compute_dtype)[:, P - 1 :]  # the last token predicts nothing


def completion_forward(model, prompts, tokens, mask, vocab_size=None, compute_dtype=None):
    """Log-probs, entropies (B, T) and last hidden states (B, T, H) at the completion positions."""
    hidden = completion_hidden(model, prompts, tokens, mask, compute_dtype)  # (B, T, H)
    logprobs, entropies = completion_logprobs(model, hidden, tokens, vocab_size)
    return logprobs, entropies, hidden


# ----------------------------------------------------------------------------------------------
# The loss (ARCA.md §2)


def policy_loss(logprobs, advantages, weights, num_completions, old_logprobs=None, clip_eps=0.2):
    """This micro-batch's share of -(1/N) sum_i A_i sum_t w_it log pi(y_it).

    logprobs (B, T) with grad, advantages (B,), weights (B, T) zero on padding, N = num_completions
    in the whole optimiser step. With old_logprobs (B, T), PPO's clipped surrogate: per token
    min(r A, clip(r, 1 - eps, 1 + eps) A), r = exp(logp - old_logp), in place of A log pi.
    """
    A = advantages[:, None]  # (B, 1)
    if old_logprobs is None:
        per_token = A * logprobs  # (B, T)
    else:
        ratio = (logprobs - old_logprobs).exp()  # (B, T)
        per_token = torch.minimum(ratio * A, ratio.clamp(1 - clip_eps, 1 + clip_eps) * A)  # (B, T)
    return -(weights * per_token).sum() / num_completions


def k3_kl(logprobs, ref_logprobs, mask, num_completions):
    """This micro-batch's share of (1/N) sum_i mean_t [exp(r) - r - 1], r = ref_logp - logp (>= 0)."""
    log_ratio = (ref_logprobs - logprobs) * mask  # (B, T)
    k3 = (log_ratio.exp() - log_ratio - 1) * mask  # (B, T)
    per_completion = k3.sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # (B,)
    return per_completion.sum() / num_completions


# ----------------------------------------------------------------------------------------------
# Rollouts


@dataclass
class Rollout:
    """K completions for each of P prompts, grouped by an explicit prompt index."""

    prompts: list  # N token-id lists: each prompt repeated K times
    prompt_index: torch.Tensor  # (N,) which prompt each completion answers
    tokens: torch.Tensor  # (N, T) completion ids
    mask: torch.Tensor  # (N, T) valid completion tokens (up to and including the first EOS)
    sampler_logprobs: torch.Tensor  # (N, T) log pi of each drawn token, from the sampler
    ends_with_eos: torch.Tensor  # (N,) the completion stopped on EOS (False: truncated at the length limit)


def eos_positions(tokens, mask, eos_token_id):
    """Which completions end with EOS, read at each row's last valid position (not by scanning ids).

    tokens [[5, 0, 0], [7, 8, 9]], mask [[1, 1, 0], [1, 1, 1]], eos 0 -> [True, False]
    """
    eos_ids = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=tokens.device)
    lengths = mask.sum(dim=1)  # (N,)
    last = tokens.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)  # (N,) each row's last valid token
    return (lengths > 0) & torch.isin(last, eos_ids)  # (N,)


def loss_mask(rollout, credit_eos):
    """The tokens that are trained, weighted, KL-penalised and diagnosed: every valid token, or with
    credit_eos False every valid token but a final EOS (the reference code's mask, ARCA.md §4).

    mask [[1, 1, 0], [1, 1, 1]], ends_with_eos [True, False], credit_eos False -> [[1, 0, 0], [1, 1, 1]]
    """
    if credit_eos:
        return rollout.mask
    last = rollout.mask.sum(dim=1, keepdim=True) - 1  # (N, 1) position of each row's last valid token
    columns = torch.arange(rollout.mask.shape[1], device=rollout.mask.device)  # (T,)
    return rollout.mask & ~((columns == last) & rollout.ends_with_eos[:, None])  # (N, T)


def prompt_generators(seeds, group_size, device):
    """One generator per completion row: a prompt's K rows share the generator of its seed, drawn in
    row order, so a prompt's completions depend on its seed alone, not on its batch or its rank."""
    generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]
    return [g for g in generators for _ in range(group_size)]


def sample_rollouts(model, prompts, config, eos_token_id, vocab_size, generator, prompt_seeds=None):
    """K = config.group_size completions per prompt, adapter on (unmerged, lora.sampling_copies), dropout off; random
    numbers from one seed per prompt when prompt_seeds is given, else from generator."""
    model.eval()
    repeated = [prompt for prompt in prompts for _ in range(config.group_size)]
    device = model.lm_head.weight.device
    row_generators = None if prompt_seeds is None else prompt_generators(prompt_seeds, config.group_size, device)
    with sampling_copies(model):  # the adapter's A and scaled B in the model dtype, taken after the last optimiser step
        tokens, mask, logprobs = generate(
            model, prompts, config.max_new_tokens, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
            eos_token_id=eos_token_id, generator=generator, vocab_size=vocab_size, return_logprobs=True, row_generators=row_generators,
            samples_per_prompt=config.group_size, compile=config.compile,
        )
    prompt_index = torch.arange(len(prompts), device=tokens.device).repeat_interleave(config.group_size)  # (N,)
    return Rollout(repeated, prompt_index, tokens, mask, logprobs, eos_positions(tokens, mask, eos_token_id))


# ----------------------------------------------------------------------------------------------
# One micro-batch: forward, credit, loss, backward


def needs_reference(config):
    return config.credit in ("divergence", "arca") or config.beta > 0


@torch.no_grad()
def exact_adapted_hidden(model, prompts, tokens, mask):
    """ARCA's h_adapted (B, T, H) for --arca-precision exact: adapter on, dropout off, fp32 activations
    (bf16 weights upcast one matmul at a time), so ||h_adapted - h_base|| is the adapter's change and
    not bf16 rounding (ARCA.md §5, Precision)."""
    was_training = model.training
    model.eval()
    try:
        return completion_hidden(model, prompts, tokens, mask, torch.float32)
    finally:
        model.train(was_training)


def pearson(x, y):
    """Pearson correlation of two 1-D tensors (0 when either is constant)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = (x.norm() * y.norm()).item()
    return (x @ y).item() / denominator if denominator > 0 else 0.0


def arca_fidelity(model, prompts, tokens, mask, hidden, h_adapted, h_base, exact):
    """How much of ARCA's score is the adapter: (Pearson per token between the ARCA scores that train
    and the exact ones, mean bf16-computed score / mean exact score), on this micro-batch.

    hidden: the training forward's states; h_adapted, h_base: the pair ARCA trains on (fp32 if exact).
    The missing pair is computed here: the exact one in bf16 mode, the bf16 one in exact mode.
    """
    with torch.no_grad():
        if exact:
            exact_scores = arca_scores(h_adapted, h_base)[mask]  # (valid,)
            with disable_adapter(model):
                bf16_scores = arca_scores(hidden, completion_hidden(model, prompts, tokens, mask))[mask]
            training_scores = exact_scores
        else:
            with disable_adapter(model):
                exact_base = completion_hidden(model, prompts, tokens, mask, torch.float32)
            exact_scores = arca_scores(exact_adapted_hidden(model, prompts, tokens, mask), exact_base)[mask]
            bf16_scores = training_scores = arca_scores(hidden, h_base)[mask]
    floor_ratio = bf16_scores.mean().item() / exact_scores.mean().item() if exact_scores.sum() > 0 else float("nan")
    return pearson(training_scores, exact_scores), floor_ratio


def train_micro_batch(model, prompts, tokens, mask, advantages, config, num_completions, vocab_size=None, old_logprobs=None,
                      diagnose_all=False, fidelity=False):
    """Forward, credit weights, loss and backward for one micro-batch; returns its statistics.

    Besides the training method's own diagnostics (weight_gini, ...), the statistics hold every
    method's on the same tokens (gini/<method>, ...) from the passes that ran: uniform, surprisal
    and entropy always, divergence and ARCA when the adapter-off pass ran (diagnose_all forces it).

    With config.arca_precision "exact" the adapter-off pass runs with fp32 activations (it then
    serves divergence and the KL too) and ARCA's h_adapted comes from one more no-grad fp32 pass
    with dropout off, instead of the training forward's. With fidelity (and credit arca), the
    statistics hold arca_exact_corr and arca_floor_ratio (see arca_fidelity).
    """
    mask = mask.bool()
    exact = config.arca_precision == "exact"
    logprobs, entropies, hidden = completion_forward(model, prompts, tokens, mask, vocab_size)  # (B, T), (B, T), (B, T, H)
    ref_logprobs = h_base = None
    if needs_reference(config) or diagnose_all:
        with torch.no_grad(), disable_adapter(model):
            ref_logprobs, _, h_base = completion_forward(model, prompts, tokens, mask, vocab_size, torch.float32 if exact else None)
    h_adapted = exact_adapted_hidden(model, prompts, tokens, mask) if exact and h_base is not None else hidden.detach()
    signals = dict(token_logprobs=logprobs.detach(), entropies=entropies.detach(), ref_token_logprobs=ref_logprobs,
                   h_adapted=h_adapted, h_base=h_base)
    weights = token_weights(credit_scores(config.credit, mask, **signals), mask, eps=config.credit_eps, power=config.power)  # (B, T)
    loss = policy_loss(logprobs, advantages, weights, num_completions, old_logprobs, config.clip_eps)
    policy_logprobs = logprobs if config.beta > 0 else logprobs.detach()  # beta 0: KL is only logged, kept off the graph
    kl = k3_kl(policy_logprobs, ref_logprobs, mask, num_completions) if ref_logprobs is not None else torch.zeros(())
    (loss + config.beta * kl).backward()

    valid = mask.float()  # (B, T)
    stats = {"loss": loss.item(), "kl": kl.item(), "entropy_sum": (entropies.detach() * valid).sum().item()}
    stats["rows"] = int(mask.any(dim=1).sum())
    if stats["rows"]:
        stats.update({k: v * stats["rows"] for k, v in credit_diagnostics(weights, mask).items()})
        for method in METHODS if h_base is not None else ("uniform", "surprisal", "entropy"):
            method_weights = weights if method == config.credit else token_weights(
                credit_scores(method, mask, **signals), mask, eps=config.credit_eps, power=config.power)  # (B, T)
            for key, value in credit_diagnostics(method_weights, mask).items():
                stats[f"{key.removeprefix('weight_')}/{method}"] = value * stats["rows"]  # gini/arca, top10_mass/arca, ...
            stats[f"rows/{method}"] = stats["rows"]
    if h_base is not None:
        residual = arca_scores(h_adapted, h_base)[mask]  # (valid tokens,) ||h_adapted - h_base||
        stats["arca_norm_sum"], stats["arca_norm_max"] = residual.sum().item(), residual.max().item() if residual.numel() else 0.0
        stats["arca_tokens"] = residual.numel()
        if fidelity and config.credit == "arca" and residual.numel():
            stats["arca_exact_corr"], stats["arca_floor_ratio"] = arca_fidelity(
                model, prompts, tokens, mask, hidden.detach(), h_adapted, h_base, exact)
    return stats, logprobs.detach()


# ----------------------------------------------------------------------------------------------
# The step


def peak_memory_gb(device):
    """Peak GPU memory allocated by torch, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def process_rank():
    return dist.get_rank() if world_size() > 1 else 0


def all_reduce_gradients(parameters):
    """Sum the gradients of `parameters` over the ranks, in one flat buffer (one collective per update)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.flatten() for g in grads])  # (trainable parameters,)
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(parameters, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g)
        offset += g.numel()


def gather(value):
    """[value of rank 0, value of rank 1, ...] (one process: [value])."""
    if world_size() == 1:
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def merge_totals(totals_by_rank):
    """Sum the ranks' micro-batch totals; maxima take the max."""
    merged = {}
    for totals in totals_by_rank:
        for key, value in totals.items():
            merged[key] = max(merged.get(key, value), value) if key == "arca_norm_max" else merged.get(key, 0) + value
    return merged


def grpo_step(model, optimizer, scheduler, prompts, golds, tokenizer, score_fn, config, generator, fidelity=False, prompt_seeds=None):
    """Rollout, reward, advantages, credit, loss, update. Returns (metrics dict, Rollout, rewards).

    fidelity: also measure, on the first micro-batch, how much of ARCA's score is the adapter
    (arca_exact_corr, arca_floor_ratio; credit arca only); train.py asks for it at evaluation steps.
    prompt_seeds: one random seed per prompt for its completions (else generator draws them all).

    prompts: P token-id lists; golds: P gold answers; score_fn(completion_texts, golds) returns
    (rewards list, number of timeouts). config: the training config (train.TrainConfig).

    Distributed (torch.distributed initialised, W ranks): prompts are this rank's share of the
    step's; a group's K completions stay on one rank, so advantages need no communication. The
    loss is normalised by the step's global N = W * local N, the LoRA gradients are summed over
    the ranks once per update (so clipping and the update see the single-process gradient, and
    every rank makes the same update), and the metrics are over every rank's completions. The
    adapter-off pass of --diagnose-all and the fidelity figure run on rank 0's first micro-batch.
    """
    device = model.lm_head.weight.device
    ranks, first_rank = world_size(), process_rank() == 0
    started = time.perf_counter()
    rollout = sample_rollouts(model, prompts, config, tokenizer.eos_token_id, tokenizer.vocab_size, generator, prompt_seeds)
    rollout_done = time.perf_counter()

    texts = [tokenizer.decode(row[valid].tolist()) for row, valid in zip(rollout.tokens.cpu(), rollout.mask.cpu())]
    rewards, timeouts = score_fn(texts, [golds[i] for i in rollout.prompt_index.tolist()])
    rewards = torch.tensor(rewards, dtype=torch.float32, device=device)  # (N,)
    advantages = group_advantages(rewards, rollout.prompt_index, config.advantage)  # (N,)
    reward_done = time.perf_counter()

    model.train()
    N = len(rollout.prompts) * ranks  # every rank holds the same number of completions
    trained = loss_mask(rollout, config.credit_eos)  # (local N, T)
    lr = scheduler.get_last_lr()[0]  # the lr of this step's update(s)
    per_micro_batch = config.prompts_per_micro_batch * config.group_size
    trainable = [p for p in model.parameters() if p.requires_grad]
    old_logprobs = {}  # first pass's log-probs per micro-batch, for the clipped ratio of later updates
    for update in range(config.updates_per_batch):
        optimizer.zero_grad(set_to_none=True)
        totals = {}
        for start in range(0, len(rollout.prompts), per_micro_batch):
            rows = slice(start, start + per_micro_batch)
            width = max(int(rollout.mask[rows].sum(dim=1).max()), 1)  # trim padding columns of this micro-batch
            tokens, mask = rollout.tokens[rows, :width], trained[rows, :width]
            stats, logprobs = train_micro_batch(
                model, rollout.prompts[rows], tokens, mask, advantages[rows], config, N, tokenizer.vocab_size, old_logprobs.get(start),
                diagnose_all=config.diagnose_all and update == 0 and start == 0 and first_rank,  # the adapter-off pass on one micro-batch
                fidelity=fidelity and update == 0 and start == 0 and first_rank,
            )
            if update == 0:
                old_logprobs[start] = logprobs if config.updates_per_batch > 1 else None
                gap = (logprobs - rollout.sampler_logprobs[rows, :width]).abs() * mask  # (B, T)
                stats["logprob_gap_sum"] = gap.sum().item()
            totals = merge_totals([totals, stats])
        if ranks > 1:
            all_reduce_gradients(trainable)
            totals = merge_totals(gather(totals))
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip).item()
        skipped = not (math.isfinite(grad_norm) and math.isfinite(totals["loss"]))
        if skipped:  # the schedule counts updates: a skipped step does not advance it
            optimizer.zero_grad(set_to_none=True)
        else:
            optimizer.step()
            scheduler.step()
        if update == 0:
            first_totals = totals
    train_done = time.perf_counter()

    # every rank's completions (one process: its own), in one collective: rewards, lengths, stops, counts, and the
    # slowest rank's times (rollout, reward, train seconds) and the largest peak memory
    local = dict(rewards=rewards.cpu(), lengths=rollout.mask.sum(dim=1).cpu(), ends_with_eos=rollout.ends_with_eos.cpu(),
                 trained_tokens=int(trained.sum()), timeouts=timeouts, peak_memory_gb=peak_memory_gb(device),
                 phases=[rollout_done - started, reward_done - rollout_done, train_done - reward_done])
    by_rank = gather(local)
    rewards, lengths, ends_with_eos = (torch.cat([r[key] for r in by_rank]) for key in ("rewards", "lengths", "ends_with_eos"))  # (N,) each
    trained_tokens = max(sum(r["trained_tokens"] for r in by_rank), 1)
    timeouts = sum(r["timeouts"] for r in by_rank)
    phases = [max(seconds) for seconds in zip(*(r["phases"] for r in by_rank))]
    tokens_in_step = int(lengths.sum())
    rows = max(first_totals["rows"], 1)
    group_rewards = rewards.view(-1, config.group_size)  # (P, K): completions are grouped in order
    metrics = {
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std().item() if N > 1 else 0.0,
        "zero_spread_groups": (group_rewards.max(dim=1).values == group_rewards.min(dim=1).values).float().mean().item(),
        "reward_timeouts": timeouts,
        "loss": first_totals["loss"],
        "kl": first_totals["kl"],
        "logprob_gap": first_totals["logprob_gap_sum"] / trained_tokens,
        "entropy": first_totals["entropy_sum"] / trained_tokens,
        "completion_len": tokens_in_step / N,
        "truncated": (~ends_with_eos).float().mean().item(),
        "weight_gini": first_totals.get("weight_gini", 0.0) / rows,
        "effective_token_ratio": first_totals.get("effective_token_ratio", 0.0) / rows,
        "top10_mass": first_totals.get("top10_mass", 0.0) / rows,
        "arca_norm_mean": first_totals["arca_norm_sum"] / max(first_totals["arca_tokens"], 1) if "arca_norm_sum" in first_totals else None,
        "arca_norm_max": first_totals.get("arca_norm_max"),
        "arca_exact_corr": first_totals.get("arca_exact_corr"),  # with fidelity and credit arca: on the first micro-batch
        "arca_floor_ratio": first_totals.get("arca_floor_ratio"),
        **{f"{key}/{method}": first_totals[f"{key}/{method}"] / first_totals[f"rows/{method}"]
           for method in METHODS if first_totals.get(f"rows/{method}") for key in ("gini", "effective_token_ratio", "top10_mass")},
        "grad_norm": grad_norm,
        "skipped_update": skipped,
        "lr": lr,
        "rollout_s": phases[0],
        "reward_s": phases[1],
        "train_s": phases[2],
        "tokens_per_s": tokens_in_step / sum(phases),
        "peak_memory_gb": max(r["peak_memory_gb"] for r in by_rank),
    }
    return metrics, rollout, rewards


# ----------------------------------------------------------------------------------------------
# All five methods on the same completions, for the credit viewer and the method comparison


@torch.no_grad()
def all_method_weights(model, prompts, tokens, mask, power, eps=1e-8, vocab_size=None):
    """{method: weights (B, T)} for every credit method on the same completions (eval mode, no grad)."""
    model.eval()
    mask = mask.bool()
    logprobs, entropies, h_adapted = completion_forward(model, prompts, tokens, mask, vocab_size)
    with disable_adapter(model):
        ref_logprobs, _, h_base = completion_forward(model, prompts, tokens, mask, vocab_size)
    inputs = dict(token_logprobs=logprobs, entropies=entropies, ref_token_logprobs=ref_logprobs, h_adapted=h_adapted, h_base=h_base)
    return {method: token_weights(credit_scores(method, mask, **inputs), mask, eps=eps, power=power) for method in METHODS}
