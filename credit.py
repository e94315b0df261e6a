"""Token credit for outcome-reward RL: ARCA, four baselines, concentration diagnostics.

Follows the paper (Lafuente-Mercado, "ARCA: Adapter-Residual Credit Assignment
When Token Signals Degenerate", arXiv 2606.00257, 2026) as the README's "The
method" states it. A completion's scalar advantage is spread over its T tokens
with weights w_t >= 0 that sum to 1 (README, The method (2)).
Each method gives a raw salience alpha_t >= 0 per token:

    uniform     alpha_t = 1                                  (the per-sequence mean of log-probs)
    surprisal   alpha_t = -log pi(y_t)                       (the current policy)
    entropy     alpha_t = max(0, H_t - H_{t+1}), 0 when no token follows y_t
    divergence  alpha_t = |log pi(y_t) - log pi_ref(y_t)|    (pi_ref: adapter off)
    ARCA        alpha_t = ||h_adapted_t - h_base_t||_2       (last hidden state after the final
                                                             norm, adapter on vs off)

and `token_weights` turns them into w_t = (alpha_t + eps)^p / sum_k (alpha_k + eps)^p.
`gini`, `effective_token_ratio` and `top_mass` measure how concentrated the
weights are (README, The method (4)); `credit_html` shows where they land in one
completion. Four more methods, this project's controls and the field's entropy rule
(`credit_weights`; README, The method (3)):

    arca-shuffled   ARCA's weights on random tokens (the same values, permuted)
    entropy-top20   1/k on the highest-entropy fifth of each completion
    entropy-gate    1/T on the tokens at or above the micro-batch's (1 - rho) entropy quantile (TRL's)
    arca-recent     ARCA's formula on ||h_now - h_recent||: the adapter now against itself k
                    updates ago, instead of against no adapter

Every (B, T) tensor is aligned with the completion tokens: column t is about
token y_t, and a model quantity in it (log-prob, entropy, hidden state) is read
at the position whose logits scored y_t. `mask` (B, T) is 1 on valid completion
tokens, 0 on padding and after the first EOS. Inputs are plain tensors and this
file imports nothing else from the project, so it can be copied into any loop.
ARCA weights for a PEFT model, prompts left-padded to P tokens so that y_t is
scored at position P - 1 + t (HF's last `hidden_states` entry is after the final norm):

    kw = dict(attention_mask=attention_mask, output_hidden_states=True)
    with torch.no_grad():
        h_adapted = model(input_ids, **kw).hidden_states[-1][:, P - 1 : -1]  # (B, T, D)
        with model.disable_adapter():
            h_base = model(input_ids, **kw).hidden_states[-1][:, P - 1 : -1]  # (B, T, D)
    weights = token_weights(arca_scores(h_adapted, h_base), mask, power=2.0)  # (B, T)

(In a training loop h_adapted is the training forward's own hidden state,
detached, and the one adapter-off forward also gives pi_ref; README, The method (3).)
The weights are constants for the gradient: every function here returns
detached float32 tensors.
"""

import html
import math

import torch

SCORED = ("uniform", "surprisal", "entropy", "divergence", "arca")  # the paper's: a score, then token_weights
CONTROLS = ("arca-shuffled", "entropy-top20", "entropy-gate", "arca-recent")  # credit_weights makes them
METHODS = SCORED + CONTROLS


# ----------------------------------------------------------------------------
# Raw scores alpha_t, one per method (README, The method (3))

def uniform_scores(mask):
    """alpha_t = 1 on every valid token."""
    return mask.float()  # (B, T)


def surprisal_scores(token_logprobs):
    """alpha_t = -log pi_theta(y_t) under the current policy."""
    return -token_logprobs.detach().float()  # (B, T)


def entropy_reduction_scores(entropies, mask, valid=None):
    """alpha_t = max(0, H_t - H_{t+1}) on the trained tokens (`mask`) followed by a generated token
    (`valid`: every token the sampler drew, EOS included; default `mask`), 0 elsewhere.

    entropies[b, t] is the entropy of the distribution y_t was sampled from, so H_t - H_{t+1} is
    the uncertainty that choosing y_t removed. Position t + 1 counts when a token was drawn there,
    trained or not: with EOS left out of the loss (the paper's setting), the last trained token
    still gets H_T - H_EOS, as in the reference code. EOS (when trained) and a truncated
    completion's last token have no next token: 0. Padding entropies are never read:

        entropies = [[2.0, 1.5, 1.7, 0.9, 0.2]]
        mask      = [[1,   1,   1,   1,   0  ]]    valid [[1, 1, 1, 1, 1]]: y_4 is an EOS, not trained
        ->          [[0.5, 0.0, 0.8, 0.7, 0.0]]    (1.5 - 1.7 < 0; valid = mask would give y_3 0)
    """
    mask = mask.bool()  # (B, T)
    valid = mask if valid is None else valid.bool()  # (B, T)
    h = entropies.detach().float()  # (B, T)
    h_next = torch.cat([h[:, 1:], torch.zeros_like(h[:, :1])], dim=1)  # (B, T) H_{t+1}
    next_valid = torch.cat([valid[:, 1:], torch.zeros_like(valid[:, :1])], dim=1)  # (B, T)
    # README, The method (3): alpha_t = max(0, H_t - H_{t+1}), 0 when no token follows
    return torch.where(mask & next_valid, (h - h_next).clamp(min=0.0), 0.0)  # (B, T)


def divergence_scores(token_logprobs, ref_token_logprobs):
    """alpha_t = |log pi_theta(y_t) - log pi_ref(y_t)|, pi_ref = the adapter switched off."""
    return (token_logprobs.detach().float() - ref_token_logprobs.detach().float()).abs()  # (B, T)


def arca_scores(h_adapted, h_base):
    """alpha_t = ||h_adapted_t - h_base_t||_2 over the hidden dimension, in fp32.

    h_adapted, h_base: (B, T, D) last-layer hidden states after the final norm,
    with the LoRA adapter on and off. At step 0 (B = 0) they are equal and every
    score is 0, so the weights start uniform.
    """
    diff = h_adapted.detach().float() - h_base.detach().float()  # (B, T, D) fp32 even from bf16
    return torch.linalg.vector_norm(diff, dim=-1)  # (B, T)


def _require(method, **inputs):
    missing = [name for name, x in inputs.items() if x is None]
    if missing:
        raise ValueError(f"credit method {method!r} needs {', '.join(missing)}, got None")


def credit_scores(method, mask, *, token_logprobs=None, entropies=None, ref_token_logprobs=None,
                  h_adapted=None, h_base=None, valid=None, h_now=None, h_recent=None):
    """Raw scores (B, T) for `method`, one of SCORED or arca-recent; pass the inputs that method reads.
    valid: every generated token (entropy's next-token rule); h_now, h_recent: arca-recent's pair."""
    if method == "uniform":
        return uniform_scores(mask)
    if method == "surprisal":
        _require(method, token_logprobs=token_logprobs)
        return surprisal_scores(token_logprobs)
    if method == "entropy":
        _require(method, entropies=entropies)
        return entropy_reduction_scores(entropies, mask, valid)
    if method == "divergence":
        _require(method, token_logprobs=token_logprobs, ref_token_logprobs=ref_token_logprobs)
        return divergence_scores(token_logprobs, ref_token_logprobs)
    if method == "arca":
        _require(method, h_adapted=h_adapted, h_base=h_base)
        return arca_scores(h_adapted, h_base)
    if method == "arca-recent":  # README, The method (3): this project's control, not the paper's
        _require(method, h_now=h_now, h_recent=h_recent)
        return arca_scores(h_now, h_recent)
    raise ValueError(f"unknown credit method {method!r}; expected one of {', '.join(SCORED)} "
                     f"(or, for weights, {', '.join(CONTROLS)})")


# ----------------------------------------------------------------------------
# Scores -> weights (README, The method (2))

def token_weights(scores, mask, eps=1e-8, power=1.0):
    """w_t = (alpha_t + eps)^p / sum_k (alpha_k + eps)^p over each row's valid tokens.

    Exact zeros on padding, whatever the scores hold there. A row whose valid
    scores are all 0 ("vanish") gets uniform weights 1/T: with eps > 0 the formula
    gives that by itself, and with eps = 0 it is set explicitly. A row with no
    valid token gets zeros. Scores are divided by the row max before the power,
    which leaves w unchanged and keeps (1e30)^2 from overflowing. Saliences are
    >= 0 (a negative score, only ever rounding, counts as 0) and an infinite
    one counts as the largest float32.

        scores = [[1.0, 3.0, 9.9], [0.0, 0.0, 0.0]]
        mask   = [[1,   1,   0  ], [1,   1,   1  ]]
        power=1 -> [[0.25, 0.75, 0.0], [1/3, 1/3, 1/3]]
    """
    mask = mask.bool()  # (B, T)
    alpha = scores.detach().float().clamp(0.0, torch.finfo(torch.float32).max)  # (B, T)
    a = torch.where(mask, alpha + eps, 0.0)  # (B, T) alpha_t + eps, 0 on padding
    row_max = a.amax(dim=1, keepdim=True)  # (B, 1)
    vanished = row_max == 0  # (B, 1) all valid scores 0 with eps = 0, or no valid token
    a = torch.where(vanished, mask.float(), a / torch.where(vanished, 1.0, row_max))  # (B, T) in [0, 1]
    a = a ** power  # (B, T)
    # README, The method (2): w_t = (alpha_t + eps)^p / sum_k (alpha_k + eps)^p, each term over the row max.
    # The sum is >= 1 on a row with a valid token (its largest term is 1) and 0 on
    # an empty row, whose weights then stay 0.
    return a / a.sum(dim=1, keepdim=True).clamp(min=1.0)  # (B, T)


# ----------------------------------------------------------------------------
# The two controls, and every method's weights (README, The method (3))

def shuffle_within_rows(weights, mask, seeds):
    """Each row's valid weights moved to a uniformly random permutation of its valid positions;
    padding keeps 0. One permutation per row, drawn on the host from that row's seed, so it
    depends on the seed and the row's valid length alone (not on the batch or its padding).

    The valid positions in order get the weights of the valid positions in a random order (each
    position's key is a uniform number; padding's key is infinite, so it sorts last):

        weights [[0.1, 0.6, 0.3, 0.0]], mask [[1, 1, 1, 0]] -> e.g. [[0.6, 0.3, 0.1, 0.0]]
    """
    mask = mask.bool()  # (B, T)
    B, T = mask.shape
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]  # on the host: one per row
    keys = torch.stack([torch.rand(T, generator=g) for g in generators]).to(mask.device)  # (B, T)
    keys = torch.where(mask, keys, float("inf"))  # (B, T) padding last
    positions = torch.where(mask, torch.arange(T, device=mask.device).float(), float("inf"))  # (B, T)
    in_order = positions.argsort(dim=1, stable=True)  # (B, T) the valid positions in order, then padding
    shuffled = keys.argsort(dim=1, stable=True)  # (B, T) the valid positions in a random order, then padding
    return torch.zeros_like(weights).scatter_(1, in_order, weights.gather(1, shuffled))  # (B, T)


def top_fraction_weights(entropies, mask, fraction=0.2):
    """1/k on the k = ceil(fraction * T) highest-entropy valid tokens of each row (at least 1; a tie
    goes to the earlier position), exact zeros elsewhere: the high-entropy minority of a completion.

        entropies [[0.5, 2.0, 1.0, 2.0, 0.1, 0.0]], mask [[1, 1, 1, 1, 1, 0]], 0.2 ->
        T = 5, k = 1: [[0, 1, 0, 0, 0, 0]]   (the two 2.0s tie: the earlier one)
    """
    mask = mask.bool()  # (B, T)
    n = mask.sum(dim=1, keepdim=True)  # (B, 1)
    k = torch.ceil(n.double() * fraction - 1e-9).long().clamp(min=1)  # (B, 1), as top_mass counts
    scores = torch.where(mask, entropies.detach().float(), float("-inf"))  # (B, T)
    order = scores.argsort(dim=1, descending=True, stable=True)  # (B, T) ties keep position order
    places = torch.arange(mask.shape[1], device=mask.device).expand_as(order)  # (B, T)
    rank = torch.empty_like(order).scatter_(1, order, places)  # (B, T) each token's place in the order
    return torch.where((rank < k) & mask, 1.0 / k.float(), 0.0)  # (B, T)


def entropy_gate_weights(entropies, mask, kept_fraction=0.2, threshold=None):
    """TRL's high-entropy gate (GRPOConfig.top_entropy_quantile = kept_fraction): 1/T on each valid token
    whose entropy is at or above `threshold`, 0 on the others, T counting every valid token of the row
    (so a row's weights sum to its kept share). threshold defaults to the (1 - kept_fraction) quantile
    of this batch's valid entropies; a training step passes one taken over every process's micro-batch.

        entropies [[0.1, 0.9, 0.5, 0.7], [0.2, 0.8, 0.0, 0.0]], mask [[1, 1, 1, 1], [1, 1, 0, 0]], 0.5 ->
        threshold 0.6 (the median of 0.1, 0.9, 0.5, 0.7, 0.2, 0.8): [[0, 1/4, 0, 1/4], [0, 1/2, 0, 0]]
    """
    mask = mask.bool()  # (B, T)
    h = entropies.detach().float()  # (B, T)
    if threshold is None:  # nanquantile over the valid entries: no read of how many there are
        threshold = torch.nanquantile(torch.where(mask, h, float("nan")).flatten(), 1 - kept_fraction)
    lengths = mask.sum(dim=1, keepdim=True).clamp(min=1)  # (B, 1) T of each row
    return torch.where(mask & (h >= threshold), 1.0 / lengths, 0.0)  # (B, T)


def credit_weights(method, mask, eps=1e-8, power=1.0, shuffle_seeds=None, gate_fraction=0.2,
                   gate_threshold=None, **signals):
    """The weights (B, T) of any of METHODS from the signals credit_scores takes:

        the five scored methods   token_weights(credit_scores(method, ...), eps, power)
        arca-shuffled             ARCA's weights, shuffled within each completion (shuffle_within_rows,
                                  one seed per row; default 0, 1, 2, ...): the same values on random tokens
        entropy-top20             top_fraction_weights(entropies, 0.2): 1/k on the top 20% by entropy
        entropy-gate              entropy_gate_weights(entropies, gate_fraction, gate_threshold)
        arca-recent               token_weights(arca_scores(h_now, h_recent), eps, power)
    """
    if method == "arca-shuffled":
        arca = token_weights(credit_scores("arca", mask, **signals), mask, eps=eps, power=power)  # (B, T)
        seeds = range(mask.shape[0]) if shuffle_seeds is None else shuffle_seeds
        return shuffle_within_rows(arca, mask, seeds)
    if method == "entropy-top20":
        _require(method, entropies=signals.get("entropies"))
        return top_fraction_weights(signals["entropies"], mask, 0.2)
    if method == "entropy-gate":
        _require(method, entropies=signals.get("entropies"))
        return entropy_gate_weights(signals["entropies"], mask, gate_fraction, gate_threshold)
    return token_weights(credit_scores(method, mask, **signals), mask, eps=eps, power=power)


# ----------------------------------------------------------------------------
# Concentration diagnostics per row, over its valid tokens (README, The method (4))

def gini(weights, mask):
    """Gini coefficient of each row's valid weights: 0 uniform, (T-1)/T all on one token.

    Padding is set to 0 and sorted to the front; zeros add nothing to the sum,
    so ranking valid tokens from n_pad + 1 gives the formula over valid tokens only.
    """
    mask = mask.bool()  # (B, T)
    w = torch.where(mask, weights.detach().float(), 0.0)  # (B, T)
    v, _ = w.sort(dim=1)  # (B, T) ascending, padding first
    n = mask.sum(dim=1, keepdim=True).float()  # (B, 1) valid tokens T
    n_pad = mask.shape[1] - n  # (B, 1)
    i = torch.arange(1, mask.shape[1] + 1, device=w.device) - n_pad  # (B, T) rank among valid
    total = v.sum(dim=1)  # (B,)
    # README, The method (4): G = sum_i (2i - T - 1) v_i / (T * sum_i v_i)
    g = ((2 * i - n - 1) * v).sum(dim=1) / (n.squeeze(1) * total)  # (B,)
    return torch.where(total > 0, g.clamp(min=0.0), 0.0)  # (B,) >= 0; rounding made -1e-8 at uniform


def effective_token_ratio(weights, mask):
    """EffN/T = 1 / (T sum_t w_t^2): 1 uniform, 1/T all on one token.

    Written as (sum w)^2 / (T sum w^2), the same for weights that sum to 1 and
    invariant to scale otherwise.
    """
    mask = mask.bool()  # (B, T)
    w = torch.where(mask, weights.detach().float(), 0.0)  # (B, T)
    n = mask.sum(dim=1).float()  # (B,)
    sq = (w ** 2).sum(dim=1)  # (B,)
    # README, The method (4): EffN/T = 1 / (T * sum_t w_t^2)
    ratio = w.sum(dim=1) ** 2 / (n * sq)  # (B,)
    return torch.where(sq > 0, ratio, 0.0)  # (B,) 0 on a row without weight


def top_mass(weights, mask, fraction=0.1):
    """Share of each row's weight on its ceil(fraction * T) largest weights (at least 1 token)."""
    mask = mask.bool()  # (B, T)
    w = torch.where(mask, weights.detach().float(), 0.0)  # (B, T)
    v, _ = w.sort(dim=1, descending=True)  # (B, T) padding last
    n = mask.sum(dim=1, keepdim=True)  # (B, 1)
    # float64 less 1e-9, so that 0.07 * 100 = 7.000000000000001 still keeps 7 tokens
    k = torch.ceil(n.double() * fraction - 1e-9).long().clamp(min=1)  # (B, 1)
    places = torch.arange(v.shape[1], device=v.device)  # (T,)
    top = torch.where(places < k, v, 0.0).sum(dim=1)  # (B,) a sum, not a cumsum: deterministic on a GPU
    total = v.sum(dim=1)  # (B,)
    return torch.where(total > 0, top / total, 0.0)  # (B,) 0 on a row without weight


def diagnostic_sums(weights, mask):
    """(4,) float32: the sums of Gini, EffN/T and top-10% mass over the rows with a valid token, and
    the number of those rows. Sums add up over micro-batches on the device and are read once;
    their means are credit_diagnostics'."""
    rows = mask.bool().any(dim=1)  # (B,)
    diagnostics = [gini(weights, mask), effective_token_ratio(weights, mask), top_mass(weights, mask, 0.1)]
    per_row = torch.stack(diagnostics, dim=1)  # (B, 3)
    return torch.cat([(per_row * rows[:, None]).sum(dim=0), rows.sum(dim=0, keepdim=True).float()])  # (4,)


def credit_diagnostics(weights, mask):
    """Batch means for logging, over rows with a valid token (NaN if there is none)."""
    gini_sum, effective_sum, top_sum, rows = diagnostic_sums(weights, mask).tolist()
    means = [value / rows if rows else float("nan") for value in (gini_sum, effective_sum, top_sum)]
    return dict(zip(("weight_gini", "effective_token_ratio", "top10_mass"), means))


# ----------------------------------------------------------------------------
# Viewer

def _shade(w, n):
    """Background for weight w among n tokens: none at uniform 1/n, red above, blue below.

    The strength is |log(n w)| / log(n), capped at 1: full red at w = 1, full blue at 1/n^2.
    """
    if n < 2:
        return "transparent"
    s = max(-1.0, min(1.0, math.log(max(n * w, 1e-30)) / math.log(n)))
    rgb = "220, 50, 40" if s > 0 else "40, 100, 220"
    return f"rgba({rgb}, {abs(s):.3f})"


def _top_tokens(tokens, w, k=5):
    """The k largest weights of a row as text: \u201ctok\u201d 0.310, \u201ctok\u201d 0.220, ..."""
    top = torch.topk(w, min(k, w.numel()))
    pairs = zip(top.values.tolist(), top.indices.tolist())
    return ", ".join(f"\u201c{html.escape(tokens[i])}\u201d {x:.3f}" for x, i in pairs)


def credit_section(tokens, weights_by_method, facts=None):
    """HTML for one completion: its facts (e.g. problem, gold, reward, advantage), then per method
    its Gini, EffN/T and top tokens as text, and the tokens shaded by weight, each in its own box.

    tokens: list of str, the T valid tokens. weights_by_method: {method: 1-D weights of length T}.
    facts: {label: text}, shown above the rows.
    """
    n = len(tokens)
    parts = [f'<p><b>{html.escape(str(k))}</b>: <span class="fact">{html.escape(str(v))}</span></p>'
             for k, v in (facts or {}).items()]
    for method, weights in weights_by_method.items():
        w = torch.as_tensor(weights).detach().float().flatten().cpu()  # (T,)
        if w.numel() != n:
            raise ValueError(f"credit_html: {method!r} has {w.numel()} weights for {n} tokens")
        w_row, m_row = w[None], torch.ones(1, n, dtype=torch.bool)  # (1, T), (1, T)
        spans = "".join(
            f'<span class="tok" style="background:{_shade(x, n)}" title="w = {x:.4g} ({n * x:.2f}x uniform)">'
            f"{html.escape(tok)}</span>"
            for tok, x in zip(tokens, w.tolist())
        )
        parts.append(f"<h3>{html.escape(str(method))} &middot; Gini {gini(w_row, m_row).item():.3f} &middot; "
                     f"EffN/T {effective_token_ratio(w_row, m_row).item():.3f}</h3>\n"
                     f'<p class="top">top: {_top_tokens(tokens, w)}</p>\n<div class="row">{spans}</div>')
    return "\n".join(parts)


def _legend(n):
    """A colour scale for a completion of n tokens: blue (1/n^2) - white (uniform 1/n) - red (1)."""
    stops = [("1/T\u00b2", 1 / n**2), ("", 1 / n**1.5), ("1/T (uniform)", 1 / n), ("", n**-0.5), ("1", 1.0)]
    cells = "".join(f'<span class="tok" style="background:{_shade(w, n)}">'
                    f'{html.escape(label) or "&nbsp;&nbsp;&nbsp;"}</span>' for label, w in stops)
    return f'<p>weight scale (T = {n} tokens): {cells}</p>'


def credit_page(title, sections, legend_tokens):
    """A self-contained HTML page: a title, a colour legend, then the sections (from credit_section)."""
    return (
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>" + html.escape(title) + "</title>\n"
        "<style>body{font-family:sans-serif;max-width:64em;margin:2em auto}"
        ".row{font-family:monospace;white-space:pre-wrap;line-height:1.9}"
        ".tok{border:1px solid #bbb;border-radius:2px;margin:0 1px;padding:0 1px;font-family:monospace}"
        ".top{font-family:monospace;font-size:.9em;color:#333;margin:.2em 0}"
        ".fact{font-family:monospace;white-space:pre-wrap}"
        "h3{font-size:1em;margin:1.2em 0 .2em}</style></head><body>\n"
        f"<h1>{html.escape(title)}</h1>\n"
        "<p>Each method's weights w_t over the completion's tokens (they sum to 1). Unshaded: the uniform "
        "1/T; red: more; blue: less; each box is one token. Hover a token for its weight.</p>\n"
        + _legend(max(legend_tokens, 2)) + "\n<hr>\n" + "\n<hr>\n".join(sections) + "\n</body></html>\n"
    )


def credit_html(tokens, weights_by_method, facts=None, title="token credit"):
    """One completion's page: credit_page around credit_section."""
    return credit_page(title, [credit_section(tokens, weights_by_method, facts)], len(tokens))
