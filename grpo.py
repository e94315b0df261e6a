"""One GRPO step with token-level credit (ARCA and its baselines) on a LoRA-adapted Qwen3.

A step samples K completions for each of P prompts (adapter on, unmerged, no dropout), scores them,
turns the rewards into one advantage per completion, weights each completion's tokens with a credit
method, and takes one optimiser step on (README, The method (1)-(2); the paper's Methods section)

    L = -(1/N) sum_i A_i sum_t w_it log pi(y_it | y_i<t, x_i)   +   beta (1/N) sum_i mean_t k3_it

- N = P * K, the completions of the whole optimiser step. Each micro-batch adds its share of the
  sum divided by this N, so gradient accumulation gives exactly the full-batch gradient.
- A_i: GRPO's group-normalised advantage (sample std, n - 1, floored at eps); RLOO as an option.
- w_it: credit weights from credit.py, summing to 1 over each completion's trained tokens, detached.
  Uniform weights make the inner sum the per-sequence mean log-prob.
- One update per batch (the paper's setting) is exactly on-policy, so the plain log-prob objective
  is used. With several updates per batch, PPO's clipped ratio to the first pass's log-probs
  replaces log pi. With one update per batch the loss value itself is about 0 (the advantages of a
  group sum to 0): its gradient, not its value, carries the signal.
- k3 KL to the reference policy, the base model (adapter off): exp(r) - r - 1 with r = ref - logp,
  a per-completion mean over tokens; beta = 0 by default, as in the paper.

Passes per micro-batch: one training forward, adapter on, with grad, gives the log-probs, entropies
and the adapted last hidden states (taken detached for ARCA). One no-grad forward with the adapter
switched off gives the reference log-probs and the base hidden states, shared by ARCA, the
divergence method and the KL term; it is skipped when none of them is needed. (The reference code
runs two extra forwards for ARCA; this runs at most one.) In training mode the adapted forward
includes LoRA dropout, so ARCA's h_adapted carries it too. With --arca-precision exact, ARCA's two
hidden states come from two more no-grad passes with fp32 activations and dropout off, so the score
is the adapter's and not bf16 rounding; the KL and the divergence signal keep the bf16 pair of the
training forward and its adapter-off pass, which differ by the adapter alone (at B = 0 they are
equal). With --no-credit-eos a completion's final EOS is out of the loss, the weights, the KL and
the diagnostics (loss_mask), as in the reference code.

Reading order: the algorithm first (advantages, rollouts, the forward, the loss, the credit of a
micro-batch, the micro-batch, the step), then what a step reports (statistics read to the host once
per update, the gathering over ranks, phase times) and the passes that only measure (fidelity, all
methods on the same completions).

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

from credit import METHODS, arca_scores, credit_weights, diagnostic_sums
from lora import disable_adapter, sampling_copies
from model import generate, pack_prompts, token_logprobs


# ----------------------------------------------------------------------------------------------
# Advantages (README, The method (1))


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
    seeds: list  # N seeds, one per completion: arca-shuffled's permutation of it


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
    credit_eos False every valid token but a final EOS (the reference code's mask, README's table).

    mask [[1, 1, 0], [1, 1, 1]], ends_with_eos [True, False], credit_eos False -> [[1, 0, 0], [1, 1, 1]]
    """
    if credit_eos:
        return rollout.mask
    last = rollout.mask.sum(dim=1, keepdim=True) - 1  # (N, 1) position of each row's last valid token
    columns = torch.arange(rollout.mask.shape[1], device=rollout.mask.device)  # (T,)
    return rollout.mask & ~((columns == last) & rollout.ends_with_eos[:, None])  # (N, T)


def completion_seeds(prompt_seeds, group_size):
    """One seed per completion from its prompt's seed and its place k in the group: like the prompt seeds, the same
    whatever the batch, the micro-batch or the rank. Without prompt seeds: 0, 1, 2, ..."""
    if prompt_seeds is None:
        return None
    return [(seed * 1_000_003 + k) % 2**63 for seed in prompt_seeds for k in range(group_size)]


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
    seeds = completion_seeds(prompt_seeds, config.group_size) or list(range(len(repeated)))
    return Rollout(repeated, prompt_index, tokens, mask, logprobs, eos_positions(tokens, mask, eos_token_id), seeds)


def completion_texts(rollout, tokenizer):
    """(texts, lengths, stopped, ids): each completion as text (up to and including its EOS), its length,
    whether it stopped on EOS and its token ids, as Python values from one copy to the host."""
    on_host = torch.cat([rollout.tokens, rollout.mask.sum(dim=1, keepdim=True), rollout.ends_with_eos[:, None].long()], dim=1).cpu()  # (N, T + 2)
    lengths, stopped = on_host[:, -2].tolist(), on_host[:, -1].bool().tolist()
    ids = [row[:length].tolist() for row, length in zip(on_host[:, :-2], lengths)]
    return [tokenizer.decode(row) for row in ids], lengths, stopped, ids


# ----------------------------------------------------------------------------------------------
# The forward over prompt + completion


def pack_sequences(prompts, completions, completion_mask):
    """Left-pad the prompts and append the completions: the layout of every training forward.

    prompts [[5, 6], [7]], completions [[8, 1], [9, 1]], completion_mask [[1, 1], [1, 0]] ->
        input_ids      [[5, 6, 8, 1], [0, 7, 9, 1]]
        attention_mask [[1, 1, 1, 1], [0, 1, 1, 0]]
    and prompt width P = 2: the hidden state at column P - 1 + t predicts completion token t.
    The prompts are laid out as the sampler lays them out (model.pack_prompts, one copy to the device).
    """
    prompt_ids, prompt_mask = pack_prompts(prompts, completions.device)  # (B, P) each
    input_ids = torch.cat([prompt_ids, completions], dim=1)  # (B, P + T)
    attention_mask = torch.cat([prompt_mask, completion_mask.bool()], dim=1)  # (B, P + T)
    return input_ids, attention_mask, prompt_ids.shape[1]


def completion_logprobs(model, hidden, tokens, vocab_size=None, chunk_size=64):
    """log pi(y_t) and entropies (B, T), fp32, from the hidden states (B, T, H) that predict tokens (B, T).

    Logits are sliced to the tokenizer's vocab_size real ids, as in the sampler. The lm_head runs on
    chunks of positions. With grad, each chunk is recomputed in backward, so the (B, T, vocab) fp32
    logits never exist at once (Qwen3: 151,936 columns).
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
# The loss (README, The method (2))


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
# The credit of a micro-batch (README, The method (3))


def needs_reference(config):
    """Whether a step runs the adapter-off pass: for the divergence signal, ARCA's h_base (also arca-shuffled's) or the KL."""
    return config.credit in ("divergence", "arca", "arca-shuffled") or config.beta > 0


@torch.no_grad()
def exact_adapted_hidden(model, prompts, tokens, mask):
    """ARCA's h_adapted (B, T, H) for --arca-precision exact: adapter on, dropout off, fp32 activations
    (bf16 weights upcast one matmul at a time), so ||h_adapted - h_base|| is the adapter's change and
    not bf16 rounding (README, ARCA's precision)."""
    was_training = model.training
    model.eval()
    try:
        return completion_hidden(model, prompts, tokens, mask, torch.float32)
    finally:
        model.train(was_training)


def credit_signals(model, prompts, tokens, mask, logprobs, entropies, hidden, config, vocab_size=None, reference=False):
    """The inputs of every credit method on this micro-batch (credit_scores' keyword arguments), detached.

    From the training forward: log pi, the entropies and h_adapted. With the adapter-off pass (when
    the method or the KL needs it, or `reference`): log pi_ref and h_base. With --arca-precision
    exact, ARCA's pair (h_adapted, h_base) comes instead from two no-grad passes with fp32
    activations, while log pi_ref stays the bf16 pass's: the KL and divergence compare like with like.
    """
    signals = dict(token_logprobs=logprobs.detach(), entropies=entropies.detach(), h_adapted=hidden.detach(),
                   ref_token_logprobs=None, h_base=None)
    if not (needs_reference(config) or reference):
        return signals
    with torch.no_grad(), disable_adapter(model):
        signals["ref_token_logprobs"], _, signals["h_base"] = completion_forward(model, prompts, tokens, mask, vocab_size)
        if config.arca_precision == "exact":
            signals["h_base"] = completion_hidden(model, prompts, tokens, mask, torch.float32)
    if config.arca_precision == "exact":
        signals["h_adapted"] = exact_adapted_hidden(model, prompts, tokens, mask)
    return signals


# ----------------------------------------------------------------------------------------------
# One micro-batch: forward, credit, loss, backward


def train_micro_batch(model, prompts, tokens, mask, advantages, config, num_completions, vocab_size=None, old_logprobs=None,
                      seeds=None):
    """Forward, credit weights, loss and backward of one micro-batch; the gradients accumulate in .grad.

    prompts: B token-id lists; tokens, mask (B, T); advantages (B,); num_completions: the step's N;
    seeds: one per completion, for arca-shuffled's permutations.
    Returns (signals, weights, loss, kl): the credit inputs (credit_signals), the weights (B, T) that
    trained, and this micro-batch's share of the loss and of the KL, as detached device scalars.
    """
    mask = mask.bool()
    logprobs, entropies, hidden = completion_forward(model, prompts, tokens, mask, vocab_size)  # (B, T), (B, T), (B, T, H)
    signals = credit_signals(model, prompts, tokens, mask, logprobs, entropies, hidden, config, vocab_size)
    weights = credit_weights(config.credit, mask, config.credit_eps, config.power, seeds, **signals)  # (B, T), detached
    loss = policy_loss(logprobs, advantages, weights, num_completions, old_logprobs, config.clip_eps)
    kl = torch.zeros((), device=logprobs.device)
    if signals["ref_token_logprobs"] is not None:  # beta 0: the KL is only logged, kept off the graph
        kl = k3_kl(logprobs if config.beta > 0 else logprobs.detach(), signals["ref_token_logprobs"], mask, num_completions)
    (loss + config.beta * kl).backward()
    return signals, weights, loss.detach(), kl.detach()


# ----------------------------------------------------------------------------------------------
# The step


def grpo_step(model, optimizer, scheduler, prompts, golds, tokenizer, score_fn, config, generator, fidelity=False, prompt_seeds=None,
              roles_fn=None):
    """Rollout, reward, advantages, then per micro-batch forward, credit, loss and backward, then clip
    and step. Returns (metrics dict, Rollout, rewards).

    prompts: P token-id lists; golds: P gold answers; score_fn(completion_texts, golds) returns
    (rewards list, number of timeouts). config: the training config (train.TrainConfig).
    prompt_seeds: one random seed per prompt for its completions (else generator draws them all).
    fidelity: also measure, on the first micro-batch, how much of ARCA's score is the adapter
    (arca_exact_corr, arca_floor_ratio; credit arca only); train.py asks for it at evaluation steps.
    roles_fn(problem text, completion token texts): which tokens compute the answer (a list of bools,
    or None when the completion cannot be parsed), for a task that knows (the demo): the step then
    logs computed_mass/<method>, each method's share of weight on those tokens.

    Distributed (torch.distributed initialised, W ranks): prompts are this rank's share of the
    step's; a group's K completions stay on one rank, so advantages need no communication. The loss
    is normalised by the step's global N = W * local N and the LoRA gradients are summed over the
    ranks once per update, so clipping and the update see the single-process gradient and every
    rank makes the same update. The metrics are over every rank's completions.
    """
    clock = PhaseClock(model.lm_head.weight.device)
    rollout = sample_rollouts(model, prompts, config, tokenizer.eos_token_id, tokenizer.vocab_size, generator, prompt_seeds)
    clock.lap("rollout")
    texts, lengths, stopped, ids = completion_texts(rollout, tokenizer)
    scores, timeouts = score_fn(texts, [gold for gold in golds for _ in range(config.group_size)])
    rewards = torch.tensor(scores, dtype=torch.float32, device=rollout.tokens.device)  # (N,)
    advantages = group_advantages(rewards, rollout.prompt_index, config.advantage)  # (N,)
    clock.lap("reward")

    model.train()
    trained = loss_mask(rollout, config.credit_eos)  # (N, T) the tokens that are trained and diagnosed
    N = len(rollout.prompts) * world_size()  # the loss's normaliser: the step's completions on every rank
    trainable = [p for p in model.parameters() if p.requires_grad]
    roles = token_roles(rollout, ids, tokenizer, roles_fn) if roles_fn else None  # the task's computed tokens, to measure credit
    lr, first_pass, reports = scheduler.get_last_lr()[0], {}, []
    for update in range(config.updates_per_batch):
        optimizer.zero_grad(set_to_none=True)
        totals = {}
        for rows, width in micro_batches(lengths, config):
            tokens, mask = rollout.tokens[rows, :width], trained[rows, :width]  # (B, T) padding columns trimmed
            signals, weights, loss, kl = train_micro_batch(model, rollout.prompts[rows], tokens, mask, advantages[rows], config, N,
                                                           tokenizer.vocab_size, first_pass.get(rows.start), rollout.seeds[rows])
            if update == 0 and config.updates_per_batch > 1:
                first_pass[rows.start] = signals["token_logprobs"]  # PPO's old log-probs for the later updates
            measure = update == 0 and rows.start == 0 and process_rank() == 0  # the measuring passes: once, on rank 0
            stats = micro_batch_statistics(model, rollout.prompts[rows], tokens, mask, rollout.sampler_logprobs[rows, :width], signals,
                                           weights, loss, kl, config, measure and config.diagnose_all, measure and fidelity, rollout.seeds[rows],
                                           None if roles is None else (roles[0][rows, :width], roles[1][rows]))
            totals = add_statistics(totals, stats)
        if world_size() > 1:
            all_reduce_gradients(trainable)  # the distributed path: the gradients summed over the ranks
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
        reports.append(read_statistics(totals, grad_norm))  # the update's one read to the host
        if math.isfinite(reports[-1]["grad_norm"]) and math.isfinite(reports[-1]["loss"]):
            optimizer.step()
            scheduler.step()  # the schedule counts updates: a skipped one does not advance it
        else:
            optimizer.zero_grad(set_to_none=True)
    clock.lap("train")
    return step_metrics(reports, scores, lengths, stopped, timeouts, lr, clock, rollout.tokens.device, config), rollout, rewards


def micro_batches(lengths, config):
    """(rows, width) of each micro-batch: a slice of config.prompts_per_micro_batch * K completions, and
    its longest completion's length (at least 1), to which its padding columns are trimmed.

    lengths [3, 1, 2, 2], 1 prompt x K 2 per micro-batch -> (slice(0, 2), 3), (slice(2, 4), 2)
    """
    size = config.prompts_per_micro_batch * config.group_size
    for start in range(0, len(lengths), size):
        yield slice(start, start + size), max(max(lengths[start : start + size]), 1)


# ----------------------------------------------------------------------------------------------
# What a step reports: statistics summed on the device, read to the host once per update


def token_roles(rollout, ids, tokenizer, roles_fn):
    """(computed (N, T) bool, parsed (N,) bool) on the device, from roles_fn(problem, completion token texts) for each
    completion (ids: their token ids); a completion roles_fn cannot parse has no computed token and parsed False."""
    computed = torch.zeros(rollout.tokens.shape, dtype=torch.bool)  # (N, T) on the host
    parsed = torch.zeros(len(ids), dtype=torch.bool)  # (N,)
    for row, (prompt, completion) in enumerate(zip(rollout.prompts, ids)):
        flags = roles_fn(tokenizer.decode(prompt), [tokenizer.decode([token]) for token in completion])
        if flags is not None:
            computed[row, : len(flags)], parsed[row] = torch.tensor(flags, dtype=torch.bool), True
    return computed.to(rollout.tokens.device), parsed.to(rollout.tokens.device)


def micro_batch_statistics(model, prompts, tokens, mask, sampler_logprobs, signals, weights, loss, kl, config, diagnose_all=False,
                           fidelity=False, seeds=None, roles=None):
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
    stats = {"loss": loss, "kl": kl, "trained_tokens": mask.sum(), "entropy_sum": (signals["entropies"] * mask).sum(),
             "logprob_gap_sum": ((signals["token_logprobs"] - sampler_logprobs).abs() * mask).sum()}
    if diagnose_all and signals["h_base"] is None:
        signals = credit_signals(model, prompts, tokens, mask, signals["token_logprobs"], signals["entropies"], signals["h_adapted"],
                                 config, reference=True)
    for method in METHODS if signals["h_base"] is not None else ("uniform", "surprisal", "entropy", "entropy-top20"):
        method_weights = weights if method == config.credit else credit_weights(method, mask, config.credit_eps, config.power, seeds,
                                                                                 **signals)  # (B, T)
        for key, value in zip(("gini", "effective_token_ratio", "top10_mass", "rows"), diagnostic_sums(method_weights, mask)):
            stats[f"{key}/{method}"] = value  # gini/arca, rows/arca, ...
        if roles is not None:
            computed, parsed = roles[0] & mask, roles[1] & mask.any(dim=1)  # (B, T), (B,)
            stats[f"computed_mass/{method}"] = ((method_weights * computed).sum(dim=1) * parsed).sum()
            stats[f"parsed/{method}"] = parsed.sum()
    stats.update(rows=stats[f"rows/{config.credit}"], weight_gini=stats[f"gini/{config.credit}"],
                 effective_token_ratio=stats[f"effective_token_ratio/{config.credit}"], top10_mass=stats[f"top10_mass/{config.credit}"])
    if roles is not None:
        stats["unparsed_completions"] = (~roles[1]).sum()
    if signals["h_base"] is not None:
        residual = arca_scores(signals["h_adapted"], signals["h_base"]) * mask  # (B, T) ||h_adapted - h_base||
        stats.update(arca_norm_sum=residual.sum(), arca_norm_max=residual.max(), arca_tokens=mask.sum())
        if fidelity and config.credit == "arca":
            stats["arca_exact_corr"], stats["arca_floor_ratio"] = arca_fidelity(
                model, prompts, tokens, mask, signals["h_adapted"], signals["h_base"], config.arca_precision == "exact")
    return stats


def add_statistics(totals, stats):
    """Micro-batch statistics added up: sums add, *_max take the larger (the fidelity figures come from
    the first micro-batch alone, so they are never added)."""
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
    values = torch.stack([torch.as_tensor(totals[name], dtype=torch.float32, device=grad_norm.device) for name in totals] +
                         [grad_norm.float()]).tolist()
    local = dict(zip(names, values))
    return {**merge_totals(gather(local)), "grad_norm": local["grad_norm"]}  # the grad norm is the same on every rank


def merge_totals(totals_by_rank):
    """Sum the ranks' statistics; maxima take the max."""
    merged = {}
    for totals in totals_by_rank:
        for key, value in totals.items():
            merged[key] = max(merged.get(key, value), value) if key.endswith("_max") else merged.get(key, 0) + value
    return merged


def step_metrics(reports, rewards, lengths, stopped, timeouts, lr, clock, device, config):
    """The metrics line of a step (metrics.jsonl): the first update's statistics, the last update's grad
    norm, and the step's rewards, lengths, stops and times over every rank (one collective)."""
    first, last = reports[0], reports[-1]
    by_rank = gather(dict(rewards=rewards, lengths=lengths, stopped=stopped, timeouts=timeouts, phases=clock.seconds(),
                          peak_memory_gb=peak_memory_gb(device)))
    rewards = [r for rank in by_rank for r in rank["rewards"]]  # every rank's, in order: Python numbers, no device read
    lengths, stopped = [n for rank in by_rank for n in rank["lengths"]], [s for rank in by_rank for s in rank["stopped"]]
    phases = {name: max(rank["phases"][name] for rank in by_rank) for name in ("rollout", "reward", "train")}  # the slowest rank
    groups = [rewards[start : start + config.group_size] for start in range(0, len(rewards), config.group_size)]  # in order
    rows, trained_tokens = max(first["rows"], 1), max(first["trained_tokens"], 1)
    mean = sum(rewards) / len(rewards)  # (a NaN reward makes a NaN mean and std, as it should)
    return {
        "reward_mean": mean,
        "reward_std": math.sqrt(sum((r - mean) ** 2 for r in rewards) / (len(rewards) - 1)) if len(rewards) > 1 else 0.0,
        "zero_spread_groups": sum(max(group) == min(group) for group in groups) / len(groups),
        "reward_timeouts": sum(rank["timeouts"] for rank in by_rank),
        "loss": first["loss"],
        "kl": first["kl"],
        "logprob_gap": first["logprob_gap_sum"] / trained_tokens,
        "entropy": first["entropy_sum"] / trained_tokens,
        "completion_len": sum(lengths) / len(lengths),
        "truncated": 1 - sum(stopped) / len(stopped),
        "weight_gini": first["weight_gini"] / rows,
        "effective_token_ratio": first["effective_token_ratio"] / rows,
        "top10_mass": first["top10_mass"] / rows,
        "arca_norm_mean": first["arca_norm_sum"] / max(first["arca_tokens"], 1) if "arca_norm_sum" in first else None,
        "arca_norm_max": first.get("arca_norm_max"),
        "arca_exact_corr": first.get("arca_exact_corr"),  # with fidelity and credit arca: on the first micro-batch
        "arca_floor_ratio": first.get("arca_floor_ratio"),
        **{f"{key}/{method}": first[f"{key}/{method}"] / first[f"rows/{method}"]
           for method in METHODS if first.get(f"rows/{method}") for key in ("gini", "effective_token_ratio", "top10_mass")},
        **{f"computed_mass/{method}": first[f"computed_mass/{method}"] / first[f"parsed/{method}"]
           for method in METHODS if first.get(f"parsed/{method}")},  # a task with roles_fn (the demo)
        **({"unparsed_completions": first["unparsed_completions"]} if "unparsed_completions" in first else {}),
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
    """Seconds spent in each phase of a step (the device synchronised at each lap, so a GPU's queued work counts)."""

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
# Ranks (torch.distributed: NCCL on GPUs, gloo on CPUs)


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
    floor_ratio = bf16_scores.mean().item() / exact_scores.mean().item() if exact_scores.sum() > 0 else float("nan")
    return pearson(training_scores, exact_scores), floor_ratio


@torch.no_grad()
def all_method_weights(model, prompts, tokens, mask, power, eps=1e-8, vocab_size=None):
    """{method: weights (B, T)} for every credit method on the same completions (eval mode, no grad)."""
    model.eval()
    mask = mask.bool()
    logprobs, entropies, h_adapted = completion_forward(model, prompts, tokens, mask, vocab_size)
    with disable_adapter(model):
        ref_logprobs, _, h_base = completion_forward(model, prompts, tokens, mask, vocab_size)
    inputs = dict(token_logprobs=logprobs, entropies=entropies, ref_token_logprobs=ref_logprobs, h_adapted=h_adapted, h_base=h_base)
    return {method: credit_weights(method, mask, eps, power, **inputs) for method in METHODS}
