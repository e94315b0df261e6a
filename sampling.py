"""Sampling from a Qwen3: the KV cache, the token samplers, the prefill and the eager decode loop.

`generate` pre-fills left-padded prompts into a KV cache allocated once per call, then decodes one
token per step with the cache written in place. Finished rows are checked every few steps, not
every step, so the loop does not wait on the GPU for each token. Each distinct prompt is prefilled
once and its keys and values copied to its K rows (GRPO's groups, pass@k). Top-p sorts only the
top-k candidates on a GPU (no host sync) and draws by exact rejection on the CPU, where a sort costs
more than the whole step of a small model (`sample_next_token`). Log-probs come from one helper,
`token_logprobs`, for the sampler and the training forward alike (grpo.completion_logprobs).

`generate(..., compile=True)` runs the same contract through compiled_decode.py's static-shape
decode step under torch.compile (CUDA graphs on a GPU): one call, two loops, and the eager one here
is the readable reference.
"""

from dataclasses import dataclass

import torch

from model import rotary_cos_sin


# ----------------------------------------------------------------------------------------------
# The KV cache


class KVCache:
    """Key/value buffers written in place: one K and one V tensor per layer, (B, KV, S, D) each.

    Rows are left-padded, so all rows write the same slots: `length` (a Python int, no device sync)
    counts the slots filled so far. `cos`, `sin` (S, D) are the rotary table of every position a
    slot can hold, computed once instead of at each decode step.
    """

    def __init__(self, keys, values, cos, sin):
        self.keys, self.values = keys, values  # L tensors (B, KV, S, D) each
        self.cos, self.sin = cos, sin  # (S, D)
        self.length = 0

    @classmethod
    def allocate(cls, config, batch_size, max_length, device, dtype):
        shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
        keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        positions = torch.arange(max_length, device=device)[None]  # (1, S): a position never exceeds its slot
        cos, sin = rotary_cos_sin(positions, config.head_dim, config.rope_theta, dtype)  # (1, S, D)
        return cls(keys, values, cos[0], sin[0])

    def rotary(self, position_ids):
        """cos and sin (B, T, D) of the positions (B, T), looked up in the table."""
        return self.cos[position_ids], self.sin[position_ids]

    def update(self, layer, k, v):
        """Write a layer's new keys and values (B, KV, T, D) at the next T slots; return that layer's
        keys and values (B, KV, S, D) over every slot filled, S = length + T."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, num_tokens):
        """After a forward's last layer: its num_tokens slots are filled."""
        self.length += num_tokens


# ----------------------------------------------------------------------------------------------
# Drawing a token


UNIFORMS_PER_DRAW = 4  # pre-drawn uniforms per row and token: 3 rejection rounds, then the sorting sampler
SCAN_BLOCK = 512  # cumulative_sum's block under --deterministic


def cumulative_sum(x):
    """x.cumsum(dim=-1) for x (..., V). Under torch.use_deterministic_algorithms (train.py's
    --deterministic), where a GPU's float cumsum is refused (its order of sums may vary from run to
    run), the same sums in an order the shapes alone fix: each block of SCAN_BLOCK entries times an
    upper-triangular matrix of ones (its running sums), plus the totals of the blocks before it (the
    same product over the block totals). Rounding differs from cumsum's in the last bits, so the
    flag changes which token a boundary uniform draws, never the distribution."""
    if not torch.are_deterministic_algorithms_enabled():
        return x.cumsum(dim=-1)
    V = x.shape[-1]
    blocks = torch.nn.functional.pad(x, (0, -V % SCAN_BLOCK)).unflatten(-1, (-1, SCAN_BLOCK))  # (..., n, b)
    ones = torch.ones(SCAN_BLOCK, SCAN_BLOCK, device=x.device, dtype=x.dtype)
    within = blocks @ ones.triu()  # (..., n, b) running sums inside each block: [i, j] = 1 for i <= j
    n = blocks.shape[-2]
    earlier = torch.ones(n, n, device=x.device, dtype=x.dtype).triu(diagonal=1)  # [i, j] = 1 for i < j
    before = within[..., -1] @ earlier  # (..., n) the sum of every earlier block
    return (within + before[..., None]).flatten(-2)[..., :V].contiguous()  # (..., V)


def draw_from_cumulative(cumulative, total, generator=None, uniforms=None):
    """Inverse-CDF draw: the first index whose cumulative mass exceeds u, u uniform in [0, total).

    cumulative (B, V) nondecreasing, total (B, 1) -> (B, 1). Index i is drawn with probability
    (cumulative[i] - cumulative[i - 1]) / total when total <= cumulative[-1]; one uniform number
    per row (uniforms (B,) when given, else drawn from generator) and a binary search.
    """
    if uniforms is None:
        u = torch.rand(total.shape, device=total.device, generator=generator)  # (B, 1)
    else:
        u = uniforms[:, None]  # (B, 1)
    return torch.searchsorted(cumulative, u * total, right=True)  # (B, 1)


def sample_top_p_sorted(probs, top_p, generator=None, uniforms=None):
    """Top-p by sorting the vocabulary (any device, no host sync): the reference.

    probs (B, V) -> tokens (B,); top_p a float or a 0-d tensor. Kept: the tokens whose strictly
    likelier mass, cumulative[i - 1], is below p, i.e. the count of cumulative < p plus the token
    that crosses p. The sort is stable: tokens of equal probability stay in id order.
    """
    probs, ids = probs.sort(dim=-1, descending=True, stable=True)  # (B, V)
    cumulative = cumulative_sum(probs)  # (B, V) nondecreasing
    kept = (cumulative < top_p).sum(dim=-1, keepdim=True) + 1  # (B, 1) tokens kept
    kept = kept.clamp(max=probs.shape[-1])  # (B, 1)
    choice = draw_from_cumulative(cumulative, cumulative.gather(-1, kept - 1), generator, uniforms)  # (B, 1)
    return ids.gather(-1, choice.clamp(max=kept - 1)).squeeze(-1)  # (B,)


def sample_top_k_top_p(logits, top_k, top_p, generator=None, uniforms=None):
    """Top-k then top-p without sorting the vocabulary: the same tokens, for the same uniforms, as
    sample_top_p_sorted(top_k_filter(logits, top_k).softmax(-1), top_p), which sorts all of it.

    logits (B, V), already divided by the temperature -> tokens (B,); top_p a float or a 0-d tensor.
    Only the k candidates of `topk` are sorted. Every token tied with the k-th largest logit is kept,
    as top_k_filter keeps it, and such tokens come last, in id order, as the stable sort puts them:
    the draw runs over [the candidates above the k-th value, by probability; the tied ones, by id].
    Example, logits [[3, 1, 2, 2]], top_k 2: kept 3 (id 0) then the tie 2, 2 (ids 2, 3).
    """
    values, ids = logits.topk(top_k, dim=-1)  # (B, k), descending
    kth = values[:, -1:]  # (B, 1) the k-th largest logit
    probs = torch.where(logits >= kth, logits, float("-inf")).softmax(dim=-1)  # (B, V) top_k_filter's
    ids, order = ids.sort(dim=-1)  # by id, then a stable sort by value: ties in id order
    values, order = values.gather(-1, order).sort(dim=-1, descending=True, stable=True)  # (B, k)
    ids = ids.gather(-1, order)  # (B, k)
    head = torch.where(values > kth, probs.gather(-1, ids), 0.0)  # (B, k) the candidates above the k-th value
    tied = torch.where(logits == kth, probs, 0.0)  # (B, V) the k-th value's tokens, in id order
    cumulative = cumulative_sum(torch.cat([head, tied], dim=-1))  # (B, k + V): sorted, zeros between
    kept = ((cumulative < top_p).sum(dim=-1, keepdim=True) + 1).clamp(max=cumulative.shape[-1])  # (B, 1)
    choice = draw_from_cumulative(cumulative, cumulative.gather(-1, kept - 1), generator, uniforms)  # (B, 1)
    choice = choice.clamp(max=kept - 1)  # (B, 1)
    head_token = ids.gather(-1, choice.clamp(max=top_k - 1))  # (B, 1)
    return torch.where(choice < top_k, head_token, choice - top_k).squeeze(-1)  # (B,) a tied one: its id


def sample_top_p_by_rejection(probs, top_p, generator=None, max_rounds=64, uniforms=None):
    """Top-p without sorting the vocabulary, exact: the path used on the CPU, where a sort is slow.

    probs (B, V) -> tokens (B,). Draw a token from probs restricted to the tokens above a floor
    (at first 0). It is in the nucleus iff the mass of strictly likelier tokens is below p; if it
    is not, no token as unlikely is either, so the floor rises to its probability and the row
    draws again. The nucleus is always above the floor, so an accepted draw has exactly the
    distribution of probs restricted to the nucleus; the most likely token is always accepted.
    A round is three passes over the vocabulary (a sort costs ~50 on the CPU); at p = 0.95 a
    row is accepted in the first round with probability >= 0.95. Reading back which rows are
    still drawing syncs with the device, free on the CPU but not on a GPU. A drawn token with no
    likelier token is always accepted (so p = 0 keeps the top token), and rows still drawing after
    max_rounds (only NaN probabilities get there) go to the sorting sampler: it never loops forever.
    With pre-drawn uniforms (B, U), round r uses column r and the sorting sampler the last one
    (so max_rounds is U - 1): an accepted draw is a nucleus draw in every round, so it stays exact.
    """
    tokens = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)  # (B,)
    rows = torch.arange(probs.shape[0], device=probs.device)  # (R,) rows still drawing
    floor = torch.zeros(probs.shape[0], 1, device=probs.device)  # (R, 1)
    max_rounds = max_rounds if uniforms is None else uniforms.shape[1] - 1
    for round_index in range(max_rounds):
        if not len(rows):
            return tokens
        cumulative = cumulative_sum(torch.where(probs > floor, probs, 0.0))  # (R, V)
        u = None if uniforms is None else uniforms[rows, round_index]  # (R,)
        draw = draw_from_cumulative(cumulative, cumulative[:, -1:], generator, u)  # (R, 1)
        draw = draw.clamp(max=probs.shape[-1] - 1)  # (R, 1)
        drawn_prob = probs.gather(-1, draw)  # (R, 1)
        likelier = torch.where(probs > drawn_prob, probs, 0.0).sum(dim=-1)  # (R,) mass of the likelier
        accepted = (likelier < top_p) | (likelier == 0)  # (R,)
        tokens[rows[accepted]] = draw[accepted, 0]
        floor = torch.maximum(floor, drawn_prob)[~accepted]  # (R', 1)
        rows, probs = rows[~accepted], probs[~accepted]  # (R',), (R', V)
    if len(rows):
        last_uniforms = None if uniforms is None else uniforms[rows, -1]  # (R,)
        tokens[rows] = sample_top_p_sorted(probs, top_p, generator, last_uniforms)
    return tokens


def top_k_filter(logits, top_k):
    """Logits (B, V) with every token below the k-th largest of its row set to -inf (ties with the
    k-th kept, as transformers' TopKLogitsWarper does). top_k 0 or >= V: unchanged.

    logits [[1.0, 3.0, 2.0, 0.5]], top_k 2 -> [[-inf, 3.0, 2.0, -inf]]
    """
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth_largest = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))  # (B, V)


def sample_next_token(logits, temperature, top_p, generator=None, top_k=0, uniforms=None):
    """One token per row from fp32 logits (B, V): greedy at temperature 0, else temperature, then
    top-k, then top-p, in the order of transformers' sampling warpers.

    Top-k keeps the k most likely tokens (0: all; ties with the k-th kept). Top-p then keeps the
    smallest set of the most likely remaining tokens whose mass reaches p, including the token that
    crosses p (and any token tied with it, on the CPU). Example, probs [0.5, 0.3, 0.2], p = 0.6:
    keeps 0.5 and 0.3. With p >= 1 every token top-k left is kept and nothing is sorted. On the CPU
    top-p draws by rejection (no sort); elsewhere from the top-k candidates (sample_top_k_top_p), or
    by sorting when top-k is off. uniforms (B, UNIFORMS_PER_DRAW): pre-drawn random numbers for this
    token instead of the generator (see generate).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,)
    logits = logits / temperature
    u = None if uniforms is None else uniforms[:, 0]
    if top_p >= 1:
        cumulative = cumulative_sum(top_k_filter(logits, top_k).softmax(dim=-1))  # (B, V)
        draw = draw_from_cumulative(cumulative, cumulative[:, -1:], generator, u)  # (B, 1)
        return draw.clamp(max=logits.shape[-1] - 1).squeeze(-1)  # (B,)
    if logits.device.type == "cpu":
        probs = top_k_filter(logits, top_k).softmax(dim=-1)  # (B, V)
        return sample_top_p_by_rejection(probs, top_p, generator, uniforms=uniforms)
    if 0 < top_k < logits.shape[-1]:
        return sample_top_k_top_p(logits, top_k, top_p, generator, u)
    return sample_top_p_sorted(logits.softmax(dim=-1), top_p, generator, u)


# ----------------------------------------------------------------------------------------------
# Log-probabilities: the one helper for the sampler and the training forward; the decode step's logits


def token_logprobs(logits, tokens):
    """log pi(token) and the entropy of pi, in fp32.

    logits (..., V), tokens (...) -> logprobs (...), entropies (...).
    """
    logits = logits.float()
    log_normaliser = logits.logsumexp(dim=-1)  # (...)
    logprobs = logits.gather(-1, tokens[..., None]).squeeze(-1) - log_normaliser  # (...)
    entropies = log_normaliser - (logits.softmax(dim=-1) * logits).sum(dim=-1)  # (...) H = logZ - E[logit]
    return logprobs, entropies


def next_token_logits(model, hidden, vocab_size):
    """fp32 logits (B, V) from the last hidden states (B, H); rows past the tokenizer's vocab_size real ids at
    -inf."""
    logits = model.lm_head(hidden).float()  # (B, V)
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits[:, vocab_size:] = float("-inf")
    return logits


def drawn_logprob(logits, token):
    """log pi(token) (B,) under the untempered logits (B, V): token_logprobs' formula without its entropy
    pass."""
    return logits.gather(-1, token[:, None]).squeeze(-1) - logits.logsumexp(dim=-1)


# ----------------------------------------------------------------------------------------------
# Random streams per prompt, and the options a training run fixes


def completion_seeds(prompt_seeds, group_size):
    """One seed per completion from its prompt's seed and its place k in the group: like the prompt
    seeds, the same whatever the batch, the micro-batch or the rank. Without prompt seeds: None."""
    if prompt_seeds is None:
        return None
    return [(seed * 1_000_003 + k) % 2**63 for seed in prompt_seeds for k in range(group_size)]


def prompt_generators(seeds, group_size, device):
    """One generator per completion row: a prompt's K rows share the generator of its seed, drawn in
    row order, so a prompt's completions depend on its seed alone, not on its batch or its rank."""
    generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]
    return [g for g in generators for _ in range(group_size)]


def sampling_options(config, tokenizer):
    """The generate options a run fixes: the length limit, top-k, top-p, EOS, the real vocabulary and
    the fast path (the temperature and the random numbers are each call's)."""
    return dict(max_new_tokens=config.max_new_tokens, top_p=config.top_p, top_k=config.top_k,
                eos_token_id=tokenizer.eos_token_id, vocab_size=tokenizer.vocab_size, compile=config.compile)


# ----------------------------------------------------------------------------------------------
# Prompts in, completions out


def pack_prompts(prompts, device):
    """Left-padded prompt ids and their mask (B, P), laid out on the host and copied to the device once.
    [[5, 6], [7]] -> ids [[5, 6], [0, 7]], mask [[1, 1], [0, 1]]."""
    P = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), P, dtype=torch.long)  # (B, P)
    mask = torch.zeros(len(prompts), P, dtype=torch.bool)  # (B, P)
    for row, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {row} is empty; every prompt needs at least one token")
        ids[row, P - len(prompt) :] = torch.tensor(prompt)
        mask[row, P - len(prompt) :] = True
    return ids.to(device), mask.to(device)


def pack_sequences(prompts, completions, completion_mask):
    """Left-pad the prompts and append the completions: the layout of every training forward.

    prompts [[5, 6], [7]], completions [[8, 1], [9, 1]], completion_mask [[1, 1], [1, 0]] ->
        input_ids      [[5, 6, 8, 1], [0, 7, 9, 1]]
        attention_mask [[1, 1, 1, 1], [0, 1, 1, 0]]
    and prompt width P = 2: the hidden state at column P - 1 + t predicts completion token t.
    The prompts are laid out as the sampler lays them out (pack_prompts, one copy to the device).
    """
    prompt_ids, prompt_mask = pack_prompts(prompts, completions.device)  # (B, P) each
    input_ids = torch.cat([prompt_ids, completions], dim=1)  # (B, P + T)
    attention_mask = torch.cat([prompt_mask, completion_mask.bool()], dim=1)  # (B, P + T)
    return input_ids, attention_mask, prompt_ids.shape[1]


def prefill(model, prompts, samples_per_prompt, cache):
    """The prompts' keys and values into `cache` (B = prompts x K rows, row p * K + k is prompt p's), each
    distinct prompt computed once and copied to its K rows; returns the last hidden states (B, H)."""
    device, K = model.lm_head.weight.device, samples_per_prompt
    prompt_ids, prompt_mask = pack_prompts(prompts, device)  # (B / K, P)
    if K == 1:
        return model(prompt_ids, prompt_mask, kv_cache=cache)[:, -1]  # (B, hidden): the last slot is real
    shared = KVCache.allocate(model.config, len(prompts), prompt_ids.shape[1], device, cache.keys[0].dtype)
    hidden = model(prompt_ids, prompt_mask, kv_cache=shared)[:, -1]  # (B / K, hidden)
    for layer in range(model.config.num_hidden_layers):
        filled = slice(0, shared.length)
        cache.keys[layer][:, :, filled] = shared.keys[layer].repeat_interleave(K, dim=0)  # (B, KV, P, D)
        cache.values[layer][:, :, filled] = shared.values[layer].repeat_interleave(K, dim=0)
    cache.length = shared.length
    return hidden.repeat_interleave(K, dim=0)  # (B, hidden)


def eos_positions(tokens, mask, eos_token_id):
    """Which completions end with EOS, read at each row's last valid position (not by scanning ids).

    tokens [[5, 0, 0], [7, 8, 9]], mask [[1, 1, 0], [1, 1, 1]], eos 0 -> [True, False]
    """
    eos_list = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    eos_ids = torch.tensor(eos_list, device=tokens.device)
    lengths = mask.sum(dim=1)  # (N,)
    last_index = (lengths - 1).clamp(min=0)  # (N,)
    last = tokens.gather(1, last_index[:, None]).squeeze(1)  # (N,) each row's last valid token
    return (lengths > 0) & torch.isin(last, eos_ids)  # (N,)


@dataclass
class Completions:
    """Completions on the host, from one copy of the device's tokens (read_completions)."""

    texts: list  # N strings, each up to and including its EOS
    lengths: list  # N valid token counts
    stopped: list  # N bools: ended on EOS
    ids: list  # N token-id lists


def read_completions(rollout, tokenizer):
    """A rollout's completions (its tokens, mask (N, T) and ends_with_eos (N,), as grpo.Rollout holds
    them) as text (up to and including the EOS), lengths, stops and token ids: Python values from one
    copy to the host."""
    lengths = rollout.mask.sum(dim=1, keepdim=True)  # (N, 1)
    stopped = rollout.ends_with_eos[:, None].long()  # (N, 1)
    on_host = torch.cat([rollout.tokens, lengths, stopped], dim=1).cpu()  # (N, T + 2): one copy
    lengths, stopped = on_host[:, -2].tolist(), on_host[:, -1].bool().tolist()
    ids = [row[:length].tolist() for row, length in zip(on_host[:, :-2], lengths)]
    return Completions([tokenizer.decode(row) for row in ids], lengths, stopped, ids)


@torch.no_grad()
def generate(model, prompts, max_new_tokens, *, temperature, top_p, eos_token_id, generator=None,
             vocab_size=None, return_logprobs=False, check_every=8, top_k=0, row_generators=None,
             samples_per_prompt=1, compile=False):
    """Sample completions for a batch of prompts of different lengths.

    prompts: list of token-id lists. eos_token_id: an id or a list of ids that end a completion (an empty
    list: none does).
    vocab_size: the tokenizer's number of real ids; embedding rows past it are never sampled.
    temperature, top_k, top_p: see sample_next_token (temperature 0: greedy).
    row_generators: one torch.Generator per row instead of `generator`; each row's random numbers are
    drawn from its own up front (max_new_tokens x UNIFORMS_PER_DRAW), so a row's completion does not
    depend on which other rows share its batch (or its process, in a distributed run).
    samples_per_prompt: K completions of each prompt, rows p * K .. p * K + K - 1: each distinct
    prompt is prefilled once and its K/V copied to its K rows (as GRPO's groups and pass@k need).
    compile: the fast path, generate_compiled (a static-shape decode step under torch.compile, CUDA
    graphs on a GPU); greedy tokens equal this path's, sampled ones are the sorted sampler's draws.
    Returns tokens (B, N) and mask (B, N), N <= max_new_tokens: mask is True up to and including a
    row's first EOS, False after it (those slots hold the EOS id). With return_logprobs, also the
    fp32 log-probs (B, N) of the drawn tokens under the untempered model distribution (what the
    training forward recomputes).

    Example, eos 0, max_new_tokens 4: a row drawing 5, 0 then stops -> tokens [5, 0, 0, 0],
    mask [1, 1, 0, 0]; a row drawing 7, 8, 9, 6 -> mask [1, 1, 1, 1] (truncated, no EOS).

    Per decode step the loop does no work that does not depend on the step: the cache holds the
    rotary table, the attention bias is one buffer whose next slot is opened in place, positions
    are the prompt lengths plus the step. It reads the device once every check_every steps (have
    all rows stopped?). It runs under inference_mode (no autograd bookkeeping at all); every tensor
    it returns was allocated outside it, so they are ordinary tensors that a training forward may use.
    """
    if compile:  # the fast path; imported here, as compiled_decode builds on this file's cache and samplers
        from compiled_decode import generate_compiled

        return generate_compiled(model, prompts, max_new_tokens, temperature=temperature, top_p=top_p,
                                 eos_token_id=eos_token_id, generator=generator, vocab_size=vocab_size,
                                 return_logprobs=return_logprobs, check_every=check_every, top_k=top_k,
                                 row_generators=row_generators, samples_per_prompt=samples_per_prompt)
    device = model.lm_head.weight.device
    eos_list = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    eos_ids = torch.tensor(eos_list, device=device)
    fill_id = eos_list[0] if eos_list else 0  # what finished rows hold
    K, P = samples_per_prompt, max(len(p) for p in prompts)
    B = len(prompts) * K
    cache = KVCache.allocate(model.config, B, P + max_new_tokens, device, model.lm_head.weight.dtype)
    row_prompt_mask = pack_prompts(prompts, device)[1].repeat_interleave(K, dim=0)  # (B, P) real prompt slots
    # Decode-step attention bias (B, 1, 1, S): 0 on real slots, -inf on padding and on slots not yet
    # written. One query row broadcasts over the G folded heads; keys padded to 16 (see attention_bias).
    width = -(-(P + max_new_tokens) // 16) * 16
    key_bias = torch.full((B, 1, 1, width), float("-inf"), device=device, dtype=cache.keys[0].dtype)
    key_bias[:, 0, 0, :P].masked_fill_(row_prompt_mask, 0.0)
    first_position = row_prompt_mask.sum(dim=1, keepdim=True)  # (B, 1) position of each row's first new token
    tokens = torch.full((B, max_new_tokens), fill_id, dtype=torch.long, device=device)  # (B, N)
    mask = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=device)  # (B, N)
    logprobs = torch.zeros(B, max_new_tokens, device=device)  # (B, N)
    finished = torch.zeros(B, dtype=torch.bool, device=device)  # (B,)
    uniforms = None
    if row_generators is not None and temperature > 0:
        shape = (max_new_tokens, UNIFORMS_PER_DRAW)
        per_row = [torch.rand(shape, generator=g, device=g.device) for g in row_generators]  # B x (N, U)
        uniforms = torch.stack(per_row).to(device)  # (B, N, U)

    with torch.inference_mode():
        hidden = prefill(model, prompts, K, cache)  # (B, hidden)
        for step in range(max_new_tokens):
            logits = next_token_logits(model, hidden, vocab_size)  # (B, V)
            step_uniforms = None if uniforms is None else uniforms[:, step]  # (B, U)
            next_token = sample_next_token(logits, temperature, top_p, generator, top_k, step_uniforms)
            next_token = next_token.masked_fill(finished, fill_id)  # (B,)
            tokens[:, step] = next_token
            mask[:, step] = ~finished
            if return_logprobs:
                logprobs[:, step] = drawn_logprob(logits, next_token)
            if len(eos_ids):
                finished |= torch.isin(next_token, eos_ids)
            if step + 1 == max_new_tokens or ((step + 1) % check_every == 0 and bool(finished.all())):
                break
            key_bias[..., P + step] = 0.0  # the slot this token is written to
            hidden = model(next_token[:, None], key_bias[..., : P + step + 1], kv_cache=cache,
                           position_ids=first_position + step)[:, -1]  # (B, hidden)
    return trim(tokens, mask, logprobs, return_logprobs)


def trim(tokens, mask, logprobs, return_logprobs):
    """Drop trailing slots that no row used."""
    steps = int(mask.sum(dim=1).max())
    tokens, mask, logprobs = tokens[:, :steps], mask[:, :steps], logprobs[:, :steps] * mask[:, :steps]
    return (tokens, mask, logprobs) if return_logprobs else (tokens, mask)
