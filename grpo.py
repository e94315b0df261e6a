"""One GRPO step with token-level credit (ARCA and its baselines) on a LoRA-adapted Qwen3.

A step samples K completions for each of P prompts (adapter on, unmerged, no dropout), scores them,
turns the rewards into one advantage per completion, weights each completion's tokens with a credit
method, and takes one optimiser step on (README, The method (1)-(2); the paper's Methods section)

    L = -(1/N) sum_i A_i sum_t w_it log pi(y_it | y_i<t, x_i)   +   beta (1/N) sum_i mean_t k3_it

- N = P * K, the completions of the whole optimiser step (on every rank). Each micro-batch adds
  its share of the sum divided by this N, so gradient accumulation gives exactly the full-batch
  gradient, and W processes make the one-process update. The paper's per-sequence normaliser;
  --loss-type token (DAPO's, TRL's default) weights each completion by its trained tokens T_i and
  divides by sum_i T_i, dr_grpo divides that sum by N * max_new_tokens (loss_normaliser).
- A_i: GRPO's group-normalised advantage (sample std, n - 1, floored at eps; --scale-rewards none:
  R_i - mean alone); RLOO as an option.
- w_it: credit weights from credit.py, summing to 1 over each completion's trained tokens, detached.
  Uniform weights make the inner sum the per-sequence mean log-prob.
- One update per batch (the paper's setting) is exactly on-policy, so the plain log-prob objective
  is used. With several updates per batch, PPO's clipped ratio to the first pass's log-probs
  replaces log pi. With one update per batch the loss value itself is about 0 (the advantages of a
  group sum to 0): its gradient, not its value, carries the signal.
- k3 KL to the reference policy, the base model (adapter off): exp(r) - r - 1 with r = ref - logp,
  a per-completion mean over tokens (normalised as the policy term is); beta = 0, as in the paper.

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
the diagnostics (loss_mask), as in the reference code; with --mask-truncated, so is every token of a
completion that hit the length limit.

Reading order: advantages, rollouts, the forward over prompt + completion, the loss, the credit of a
micro-batch, the micro-batch, the step. What a step reports (its statistics, phase times, the
passes that only measure) is step_log.py's: grpo_step hands its tensors to a StepLog at the
rollout, the reward, each micro-batch and each update, and reads nothing itself.

Left out: a value model, reward models, entropy bonuses, filtering of zero-spread groups (they get
A = 0 and add nothing to the policy gradient).
"""

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from credit import credit_weights
from lora import disable_adapter, sampling_copies
from ranks import all_reduce_gradients, completions_on_every_rank, quantile_on_every_rank, sum_on_every_rank
from sampling import (completion_seeds, eos_positions, generate, pack_sequences, prompt_generators,
                      read_completions, sampling_options, token_logprobs)


# ----------------------------------------------------------------------------------------------
# Advantages (README, The method (1))


def group_advantages(rewards, prompt_index, estimator="grpo", eps=1e-4, scale="group"):
    """One advantage per completion, from the rewards of the completions of the same prompt.

    rewards (N,) float, prompt_index (N,) long -> advantages (N,).
    grpo: (R_i - mean_group) / max(std_group, eps), sample std; with scale "none", R_i - mean_group
    (TRL's scale_rewards none, Dr. GRPO's).  rloo: R_i - mean of the others.
    Example, one group of rewards [1, 0, 0, 1]: grpo [0.866, -0.866, -0.866, 0.866], scale none
    [0.5, -0.5, -0.5, 0.5], rloo [0.667, -0.667, -0.667, 0.667]; a group [1, 1, 1, 1] gives zeros.
    """
    num_groups = int(prompt_index.max()) + 1
    # (G,) completions per group; index_add_, as bincount reads its input's maximum back on a GPU
    counts = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device)
    counts = counts.index_add_(0, prompt_index, torch.ones_like(rewards))  # (G,)
    if (counts < 2).any():
        raise ValueError("every prompt needs at least 2 completions for a group baseline, "
                         f"got group sizes {counts.tolist()}")
    sums = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device)  # (G,)
    sums = sums.index_add_(0, prompt_index, rewards)  # (G,)
    if estimator == "rloo":
        others_mean = (sums[prompt_index] - rewards) / (counts[prompt_index] - 1)  # (N,)
        return rewards - others_mean
    if estimator != "grpo":
        raise ValueError(f"unknown advantage estimator {estimator!r}; expected 'grpo' or 'rloo'")
    mean = (sums / counts)[prompt_index]  # (N,)
    if scale == "none":
        return rewards - mean
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


def loss_mask(rollout, credit_eos, mask_truncated=False):
    """The tokens that are trained, weighted, KL-penalised and diagnosed: every valid token, or with
    credit_eos False every valid token but a final EOS (the reference code's mask, README's table);
    with mask_truncated, none of a completion that hit the length limit without EOS.

    mask [[1, 1, 0], [1, 1, 1]], ends_with_eos [True, False], credit_eos False -> [[1, 0, 0], [1, 1, 1]]
    (mask_truncated as well: [[1, 0, 0], [0, 0, 0]])
    """
    mask = rollout.mask & rollout.ends_with_eos[:, None] if mask_truncated else rollout.mask  # (N, T)
    if credit_eos:
        return mask
    last = rollout.mask.sum(dim=1, keepdim=True) - 1  # (N, 1) position of each row's last valid token
    columns = torch.arange(rollout.mask.shape[1], device=rollout.mask.device)  # (T,)
    return mask & ~((columns == last) & rollout.ends_with_eos[:, None])  # (N, T)


def sample_rollouts(model, prompts, config, tokenizer, generator, prompt_seeds=None):
    """K = config.group_size completions per prompt, adapter on (unmerged, lora.sampling_copies), dropout off;
    random numbers from one seed per prompt when prompt_seeds is given, else from generator."""
    model.eval()
    K = config.group_size
    device = model.lm_head.weight.device
    row_generators = None if prompt_seeds is None else prompt_generators(prompt_seeds, K, device)
    with sampling_copies(model):  # the adapter's A and scaled B in the model dtype, after the last update
        tokens, mask, logprobs = generate(model, prompts, temperature=config.temperature, generator=generator,
                                          row_generators=row_generators, samples_per_prompt=K,
                                          return_logprobs=True, **sampling_options(config, tokenizer))
    prompt_index = torch.arange(len(prompts), device=tokens.device).repeat_interleave(K)  # (N,)
    seeds = completion_seeds(prompt_seeds, K) or list(range(len(prompts) * K))
    stopped = eos_positions(tokens, mask, tokenizer.eos_token_id)  # (N,)
    repeated = [prompt for prompt in prompts for _ in range(K)]
    return Rollout(repeated, prompt_index, tokens, mask, logprobs, stopped, seeds)


# ----------------------------------------------------------------------------------------------
# The forward over prompt + completion


def completion_logprobs(model, hidden, tokens, vocab_size=None, chunk_size=64):
    """log pi(y_t) and entropies (B, T), fp32, from the hidden states (B, T, H) that predict tokens (B, T).

    Logits are sliced to the tokenizer's vocab_size real ids, as in the sampler. The lm_head runs on
    chunks of positions. With grad, each chunk is recomputed in backward, so the (B, T, vocab) fp32
    logits never exist at once (Qwen3: 151,936 columns).
    """

    def chunk_logprobs(h, y):  # (B, C, H), (B, C) -> log-probs and entropies (B, C)
        return token_logprobs(model.lm_head(h)[..., :vocab_size], y)

    logprobs, entropies = [], []
    for start in range(0, tokens.shape[1], chunk_size):
        columns = slice(start, start + chunk_size)
        h, y = hidden[:, columns], tokens[:, columns]  # (B, C, H), (B, C)
        h = h.to(model.lm_head.weight.dtype)  # an fp32 pass meets the head in its dtype: no fp32 copy of it
        if torch.is_grad_enabled() and h.requires_grad:
            lp, ent = checkpoint(chunk_logprobs, h, y, use_reentrant=False)
        else:
            lp, ent = chunk_logprobs(h, y)  # (B, C), (B, C)
        logprobs.append(lp)
        entropies.append(ent)
    return torch.cat(logprobs, dim=1), torch.cat(entropies, dim=1)  # (B, T), (B, T)


def completion_hidden(model, prompts, tokens, mask, compute_dtype=None, adapter=None):
    """Last hidden states (B, T, H) at the positions that score the completion tokens (B, T); with
    `adapter` ({parameter name: tensor}, lora.RecentAdapters') those LoRA weights stand in for the live
    ones for this one call (torch.func.functional_call: no live parameter is touched)."""
    input_ids, attention_mask, P = pack_sequences(prompts, tokens, mask)
    # the last token predicts nothing: the forward runs to the one before it
    inputs, options = (input_ids[:, :-1], attention_mask[:, :-1]), {"compute_dtype": compute_dtype}
    if adapter is None:
        hidden = model(*inputs, **options)  # (B, P+T-1, H)
    else:
        hidden = torch.func.functional_call(model, adapter, inputs, options)  # (B, P+T-1, H)
    return hidden[:, P - 1 :]  # (B, T, H)


def completion_forward(model, prompts, tokens, mask, vocab_size=None, compute_dtype=None):
    """Log-probs, entropies (B, T) and last hidden states (B, T, H) at the completion positions."""
    hidden = completion_hidden(model, prompts, tokens, mask, compute_dtype)  # (B, T, H)
    logprobs, entropies = completion_logprobs(model, hidden, tokens, vocab_size)
    return logprobs, entropies, hidden


# ----------------------------------------------------------------------------------------------
# The loss (README, The method (2))


def loss_normaliser(loss_tokens, config):
    """The loss's N, over the whole optimiser step on every rank: its completions (--loss-type sequence,
    the paper's), its trained tokens sum_i T_i, at least 1 (token: DAPO's token mean), or its completions
    times the length limit (dr_grpo: Dr. GRPO's constant). loss_tokens (N, T): this rank's."""
    if config.loss_type == "token":
        return sum_on_every_rank(loss_tokens.sum()).clamp(min=1)  # a device scalar: no read
    completions = completions_on_every_rank(loss_tokens.shape[0])
    return completions * config.max_new_tokens if config.loss_type == "dr_grpo" else completions


def policy_loss(logprobs, advantages, weights, num_completions, old_logprobs=None, clip_eps=0.2):
    """This micro-batch's share of -(1/N) sum_i A_i sum_t w_it log pi(y_it).

    logprobs (B, T) with grad, advantages (B,), weights (B, T) zero on padding (times T_i under the
    token and dr_grpo losses), N = num_completions, the whole optimiser step's normaliser
    (loss_normaliser). With old_logprobs (B, T), PPO's clipped surrogate: per token
    min(r A, clip(r, 1 - eps, 1 + eps) A), r = exp(logp - old_logp), in place of A log pi.
    """
    A = advantages[:, None]  # (B, 1)
    if old_logprobs is None:
        per_token = A * logprobs  # (B, T)
    else:
        ratio = (logprobs - old_logprobs).exp()  # (B, T)
        per_token = torch.minimum(ratio * A, ratio.clamp(1 - clip_eps, 1 + clip_eps) * A)  # (B, T)
    return -(weights * per_token).sum() / num_completions


def k3_kl(logprobs, ref_logprobs, mask, num_completions, scale=1.0):
    """This micro-batch's share of (1/N) sum_i s_i mean_t [exp(r) - r - 1], r = ref_logp - logp (>= 0):
    normalised as the policy term is (scale s (B, 1): T_i under the token and dr_grpo losses, so a sum
    over tokens; 1 for the paper's per-completion mean)."""
    log_ratio = (ref_logprobs - logprobs) * mask  # (B, T)
    k3 = (log_ratio.exp() - log_ratio - 1) * mask  # (B, T)
    per_completion = k3.sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1)  # (B, 1)
    return (per_completion * scale).sum() / num_completions


# ----------------------------------------------------------------------------------------------
# The credit of a micro-batch (README, The method (3))

REFERENCE_METHODS = ("divergence", "arca", "arca-shuffled")  # read the adapter-off pass (so does the KL)


@torch.no_grad()
def exact_adapted_hidden(model, prompts, tokens, mask, adapter=None):
    """h (B, T, H) with the adapter on (the live one, or `adapter`'s weights), dropout off, fp32
    activations (bf16 weights upcast one matmul at a time): ARCA's h_adapted for --arca-precision exact,
    so that ||h_adapted - h_base|| is the adapter's change and not bf16 rounding (README, ARCA's
    precision), and both of arca-recent's states."""
    was_training = model.training
    model.eval()
    try:
        return completion_hidden(model, prompts, tokens, mask, torch.float32, adapter)
    finally:
        model.train(was_training)


@torch.no_grad()
def reference_pass(model, prompts, tokens, mask, config, vocab_size=None):
    """The adapter-off pass: log pi_ref and h_base (B, T, H), shared by the divergence signal, ARCA and
    the KL. With --arca-precision exact, ARCA's pair (h_adapted, h_base) comes instead from two passes
    with fp32 activations, while log pi_ref stays the bf16 pass's: the KL and divergence compare like
    with like."""
    with disable_adapter(model):
        ref_logprobs, _, h_base = completion_forward(model, prompts, tokens, mask, vocab_size)
        if config.arca_precision != "exact":
            return dict(ref_token_logprobs=ref_logprobs, h_base=h_base)
        h_base = completion_hidden(model, prompts, tokens, mask, torch.float32)
    h_adapted = exact_adapted_hidden(model, prompts, tokens, mask)
    return dict(ref_token_logprobs=ref_logprobs, h_base=h_base, h_adapted=h_adapted)


def credit_inputs(model, prompts, tokens, mask, logprobs, entropies, hidden, config, vocab_size=None,
                  valid=None):
    """The inputs of every credit method on this micro-batch (credit_weights' keyword arguments), detached.

    From the training forward: log pi, the entropies and h_adapted. valid (B, T): every generated
    token (the entropy signal's next-token rule; default mask). When entropy-gate trains, its
    threshold: the (1 - rho) quantile of this micro-batch's entropies on every rank (one collective;
    otherwise the diagnostics' gate takes this rank's micro-batch). The adapter-off pass when the
    method or the KL needs it (reference_pass). For arca-recent, h_now and h_recent: the adapter now
    and k updates ago (model.recent_adapters, lora.RecentAdapters), both exact and without dropout.
    """
    inputs = dict(token_logprobs=logprobs.detach(), entropies=entropies.detach(), h_adapted=hidden.detach(),
                  valid=valid, ref_token_logprobs=None, h_base=None, h_now=None, h_recent=None,
                  gate_threshold=None)
    if config.credit == "entropy-gate":
        level = 1 - config.entropy_quantile  # the top rho of the tokens sit at or above this quantile
        inputs["gate_threshold"] = quantile_on_every_rank(entropies.detach(), mask, level,
                                                          capacity=len(prompts) * config.max_new_tokens)
    if config.credit in REFERENCE_METHODS or config.beta > 0:
        inputs.update(reference_pass(model, prompts, tokens, mask, config, vocab_size))
    if config.credit == "arca-recent":
        older = model.recent_adapters.oldest()
        inputs.update(h_now=exact_adapted_hidden(model, prompts, tokens, mask),
                      h_recent=exact_adapted_hidden(model, prompts, tokens, mask, older))
    return inputs


# ----------------------------------------------------------------------------------------------
# One micro-batch: forward, credit, loss, backward


def train_micro_batch(model, prompts, tokens, mask, advantages, config, num_completions, vocab_size=None,
                      old_logprobs=None, seeds=None, valid=None):
    """Forward, credit weights, loss and backward of one micro-batch; the gradients accumulate in .grad.

    prompts: B token-id lists; tokens, mask (B, T); advantages (B,); num_completions: the step's N;
    old_logprobs (B, T): PPO's, for a second or later update on the same rollouts; seeds: one per
    completion, for arca-shuffled's permutations; valid (B, T): every generated token, EOS included.
    Returns (inputs, weights, loss, kl): the credit inputs (credit_inputs), the weights (B, T) that
    trained, and this micro-batch's share of the loss and of the KL, as detached device scalars.
    """
    mask = mask.bool()
    # log pi (B, T), entropies (B, T) and the adapted last hidden states (B, T, H), with grad
    logprobs, entropies, hidden = completion_forward(model, prompts, tokens, mask, vocab_size)
    inputs = credit_inputs(model, prompts, tokens, mask, logprobs, entropies, hidden, config, vocab_size,
                           valid)
    weights = credit_weights(config.credit, mask, config.credit_eps, config.power, seeds, **inputs)  # (B, T)
    # README, The method (2): under the token and dr_grpo losses a completion's weights count T_i times
    scale = mask.sum(dim=1, keepdim=True).float() if config.loss_type != "sequence" else 1.0  # (B, 1) or 1
    loss = policy_loss(logprobs, advantages, weights * scale, num_completions, old_logprobs, config.clip_eps)
    kl = torch.zeros((), device=logprobs.device)
    if inputs["ref_token_logprobs"] is not None:  # beta 0: the KL is only logged, kept off the graph
        policy = logprobs if config.beta > 0 else logprobs.detach()
        kl = k3_kl(policy, inputs["ref_token_logprobs"], mask, num_completions, scale)
    (loss + config.beta * kl).backward()
    return inputs, weights, loss.detach(), kl.detach()


def micro_batches(lengths, config):
    """(rows, width) of each micro-batch: a slice of config.prompts_per_micro_batch * K completions, and
    its longest completion's length (at least 1), to which its padding columns are trimmed.

    lengths [3, 1, 2, 2], 1 prompt x K 2 per micro-batch -> (slice(0, 2), 3), (slice(2, 4), 2)
    """
    size = config.prompts_per_micro_batch * config.group_size
    for start in range(0, len(lengths), size):
        yield slice(start, start + size), max(max(lengths[start : start + size]), 1)


# ----------------------------------------------------------------------------------------------
# The step


def grpo_step(model, optimizer, scheduler, prompts, golds, tokenizer, score_fn, config, generator, log,
              prompt_seeds=None):
    """Rollout, reward, advantages, then per micro-batch forward, credit, loss and backward, then clip
    and step. Returns (Rollout, rewards (N,)); what the step measured is in `log`.

    prompts: P token-id lists; golds: P gold answers; score_fn(completion texts, golds) returns
    (rewards list, number of timeouts). config: the training config (train.TrainConfig).
    prompt_seeds: one random seed per prompt for its completions (else generator draws them all).
    log: a step_log.StepLog (or anything with its four methods), handed the step's tensors at the
    rollout, the reward, each micro-batch and each update; its update call reads the update's
    statistics and grad norm to the host in one copy and says whether both are finite.

    Distributed (torch.distributed initialised, W ranks): prompts are this rank's share of the
    step's; a group's K completions stay on one rank, so advantages need no communication. The loss
    is normalised by the step's global N and the LoRA gradients are summed over the ranks once per
    update, so clipping and the update see the single-process gradient on every rank.
    """
    rollout = sample_rollouts(model, prompts, config, tokenizer, generator, prompt_seeds)
    log.sampled(rollout)
    completions = read_completions(rollout, tokenizer)
    golds = [gold for gold in golds for _ in range(config.group_size)]  # one per completion
    scores, timeouts = score_fn(completions.texts, golds)
    rewards = torch.tensor(scores, dtype=torch.float32, device=rollout.tokens.device)  # (N,)
    advantages = group_advantages(rewards, rollout.prompt_index, config.advantage,
                                  scale=config.scale_rewards)  # (N,)
    log.scored(completions, scores, timeouts)
    model.train()
    loss_tokens = loss_mask(rollout, config.credit_eos, config.mask_truncated)  # (N, T)
    N = loss_normaliser(loss_tokens, config)  # the step's completions (the paper's), or tokens
    trainable = [p for p in model.parameters() if p.requires_grad]
    old_logprobs = {}  # PPO's: each micro-batch's log-probs in the first update
    for _ in range(config.updates_per_batch):
        optimizer.zero_grad(set_to_none=True)
        for rows, width in micro_batches(completions.lengths, config):
            tokens, mask = rollout.tokens[rows, :width], loss_tokens[rows, :width]  # (B, T)
            inputs, weights, loss, kl = train_micro_batch(
                model, rollout.prompts[rows], tokens, mask, advantages[rows], config, N,
                tokenizer.vocab_size, old_logprobs.get(rows.start), rollout.seeds[rows],
                valid=rollout.mask[rows, :width])
            old_logprobs.setdefault(rows.start, inputs["token_logprobs"])
            log.micro_batch(rows, mask, inputs, weights, loss, kl)
        all_reduce_gradients(trainable)  # several processes: summed over the ranks
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
        if log.update(grad_norm):  # finite: step (the schedule counts the updates made)
            optimizer.step()
            scheduler.step()
    return rollout, rewards
