"""The fast path of sampling: a static-shape decode step under torch.compile (CUDA graphs on a GPU).

sampling.generate(..., compile=True) calls generate_compiled here; the contract is the eager
loop's (sampling.generate), which stays the readable reference. One compiled graph per (greedy or
sampling, batch bucket, cache-length bucket): batches are padded to a power of two and caches to a
multiple of CACHE_BUCKET slots, so a paper run compiles a handful of graphs (rollouts of 32,
evaluation batches of 64 and their tail) and reuses them every step. A step attends only to the
slots its sequence has reached, rounded up to a multiple of ATTEND_BUCKET, not to the whole cache:
the attended length is a dynamic dimension of the one graph (chosen on the host from P + step, no
sync), and on a GPU CUDA graphs record one replay per attended length (recording, not compiling).
Of the three designs (a graph per attended length, the length as a dynamic dimension, a block mask
over static shapes) this one compiles no more graphs than the full-cache step did and reads at most
ATTEND_BUCKET - 1 keys too many. Temperature and top-p are
tensor inputs, not constants: changing them recompiles nothing. The tensors the step writes in
place (each layer's K and V, the attention bias) and reads (the rotary table, the LoRA sampling
copies) stay at the same addresses between calls (DecodeBuffers, kept on the model), so a CUDA
graph is recorded once per bucket and then replayed.
"""

import torch

from model import rotary_cos_sin
from sampling import (UNIFORMS_PER_DRAW, KVCache, drawn_logprob, next_token_logits, pack_prompts, prefill,
                      sample_top_k_top_p, sample_top_p_sorted, trim)


# torch.compile features the fast path needs: static addresses, cudagraph step marks, a recompile limit
# that fails (cache_size_limit and fail_on_cache_limit_hit in 2.6; recompile_limit and
# fail_on_recompile_limit_hit from 2.7, the old names kept as aliases: recompile_limit_options)
COMPILE_MIN_TORCH = (2, 6)
CACHE_BUCKET = 256  # cache lengths are multiples of this
ATTEND_BUCKET = 256  # a step attends to the first multiple of this many slots that holds its sequence
# slots past each cache bucket, never written or attended: an attended view (the first slots) is then never
# the whole tensor, a contiguous special case torch.compile would compile a second graph for; 16 keeps the
# bias rows aligned as the fused attention kernels need
SPARE_SLOTS = 16
# compiled graphs of the decode step before torch.compile refuses (an error, never a silent eager fallback)
MAX_GRAPHS = 64


class StaticKVCache(KVCache):
    """The compiled step's cache: its tensors keep their full length S, and a forward writes its one new
    token's keys and values at `slot`, a (1,) device tensor the decode loop sets, so no Python number
    read from a tensor changes the graph. Unwritten slots are masked by the attention bias."""

    slot = None  # (1,) long, on the device

    def update(self, layer, k, v):
        """Write the new keys and values (B, KV, 1, D) at `slot` in place; return the layer's (B, KV, S,
        D)."""
        self.keys[layer].index_copy_(2, self.slot, k)  # in place: this layer's tensor, at a static address
        self.values[layer].index_copy_(2, self.slot, v)
        return self.keys[layer], self.values[layer]

    def advance(self, num_tokens):
        """Nothing: the decode loop sets the next slot."""

    def first_slots(self, length):
        """This cache cut to its first `length` slots, the ones attention reads: views, so the writes of
        update reach the full tensors. The rotary table and the slot are shared."""
        cut = StaticKVCache([k[:, :, :length] for k in self.keys], [v[:, :, :length] for v in self.values],
                            self.cos, self.sin)
        cut.slot = self.slot
        return cut


def batch_bucket(rows):
    """The compiled step's batch size for `rows` rows: the next power of two. 3 -> 4, 32 -> 32, 33 -> 64."""
    return 1 << (rows - 1).bit_length()


def cache_length(tokens):
    """The compiled step's cache length for prompt + completion `tokens`: the next multiple of
    CACHE_BUCKET. 300 -> 512 (CACHE_BUCKET 256)."""
    return -(-tokens // CACHE_BUCKET) * CACHE_BUCKET


class DecodeBuffers:
    """The compiled decode step's state, kept on the model so that every call of a bucket reads and
    writes the same addresses: per layer one K and one V arena, one attention-bias arena and the
    rotary table, each as large as the largest bucket used so far. A bucket's cache is made of views
    of the arenas' first elements, built once and reused. Growing the arenas (a larger bucket) moves
    them, so each graph is recorded again once. The arenas start at zero and unwritten slots are
    masked, so values left by an earlier call are never read."""

    def __init__(self, config, device, dtype):
        self.config, self.device, self.dtype = config, device, dtype
        self.capacity = self.length = 0  # elements per K/V arena; rotary table length
        self.caches = {}  # (batch, length) -> (StaticKVCache, key_bias (batch, 1, 1, length))
        self.attended = {}  # (batch, length, attend) -> key_bias[..., :attend]

    def get(self, batch, length):
        config = self.config
        slots = length + SPARE_SLOTS  # a multiple of 16, as attention_bias pads the key axis
        per_layer = batch * config.num_key_value_heads * slots * config.head_dim
        if per_layer > self.capacity or length > self.length:
            self.capacity, self.length = max(per_layer, self.capacity), max(length, self.length)
            arena = dict(device=self.device, dtype=self.dtype)
            self.keys = [torch.zeros(self.capacity, **arena) for _ in range(config.num_hidden_layers)]
            self.values = [torch.zeros(self.capacity, **arena) for _ in range(config.num_hidden_layers)]
            self.bias = torch.zeros(self.capacity, **arena)  # >= batch * slots, as head_dim >= 16
            positions = torch.arange(self.length, device=self.device)[None]  # (1, S)
            cos, sin = rotary_cos_sin(positions, config.head_dim, config.rope_theta, self.dtype)  # (1, S, D)
            self.cos, self.sin = cos[0], sin[0]  # (S, D)
            self.caches, self.attended = {}, {}
        if (batch, length) not in self.caches:
            shape = (batch, config.num_key_value_heads, slots, config.head_dim)
            keys = [k[:per_layer].view(shape) for k in self.keys]  # L x (B, KV, S + spare, D)
            values = [v[:per_layer].view(shape) for v in self.values]
            cache = StaticKVCache(keys, values, self.cos[:length], self.sin[:length])
            key_bias = self.bias[: batch * slots].view(batch, 1, 1, slots)  # (B, 1, 1, S + spare)
            for tensor in (*cache.keys, *cache.values, cache.cos, cache.sin, key_bias):
                torch._dynamo.mark_static_address(tensor)  # a CUDA graph may write them in place
            self.caches[batch, length] = cache, key_bias
        return self.caches[batch, length]

    def attended_bias(self, batch, length, attend):
        """The first `attend` slots of the (batch, length) bucket's key bias (B, 1, 1, attend): one view
        per attend length, built once, at a static address, its length a dynamic dimension of the
        compiled step (one graph for every attend length; CUDA graphs record one per length)."""
        if (batch, length, attend) not in self.attended:
            view = self.get(batch, length)[1][..., :attend]  # (B, 1, 1, attend)
            torch._dynamo.mark_static_address(view)
            torch._dynamo.maybe_mark_dynamic(view, 3)
            self.attended[batch, length, attend] = view
        return self.attended[batch, length, attend]


def reserve_decode_buffers(model, rows, tokens):
    """The decode buffers of a run's largest generate call (`rows` sequences of up to `tokens` prompt
    + completion tokens: memory.largest_decode_call), allocated once before any call: no later call
    grows them, so the arenas never move (no graph is recorded again, and an old and a new arena never
    live side by side). train.py calls it with --compile; the eager path allocates none."""
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    model.decode_buffers = DecodeBuffers(model.config, device, dtype)
    model.decode_buffers.get(batch_bucket(rows), cache_length(tokens))


def decode_step(model, hidden, finished, uniforms, position, cache, key_bias, eos_ids, fill_id, temperature,
                top_p, top_k, vocab_size, greedy):
    """generate's loop body with static shapes, for torch.compile: one token per row from `hidden`
    (B, H), then the forward of that token with its K/V written at cache.slot (a device tensor).

    No Python number is read from a tensor; key_bias (B, 1, 1, A) covers the A slots this step
    attends to (unwritten ones are -inf), A a dynamic dimension, and the cache is cut to the same A
    slots (views: its writes reach the full tensors); the random numbers are pre-drawn (uniforms
    (B, UNIFORMS_PER_DRAW)), temperature and top_p are 0-d tensors, and top-p draws from the top-k
    candidates (or sorts, without top-k): no rejection loop. Returns (token (B,), its log-prob (B,),
    finished (B,), the next hidden (B, H)).
    """
    logits = next_token_logits(model, hidden, vocab_size)  # (B, V)
    if greedy:
        token = logits.argmax(dim=-1)  # (B,)
    elif 0 < top_k < logits.shape[-1]:
        token = sample_top_k_top_p(logits / temperature, top_k, top_p, uniforms=uniforms[:, 0])  # (B,)
    else:
        probs = (logits / temperature).softmax(dim=-1)  # (B, V)
        token = sample_top_p_sorted(probs, top_p, uniforms=uniforms[:, 0])  # (B,)
    token = token.masked_fill(finished, fill_id)  # (B,)
    logprob = drawn_logprob(logits, token)  # (B,)
    finished = finished | torch.isin(token, eos_ids)  # (B,)
    key_bias.index_fill_(-1, cache.slot, 0.0)  # open the slot this token is written to
    cache = cache.first_slots(key_bias.shape[-1])  # attend to the slots key_bias covers, no more
    hidden = model(token[:, None], key_bias, kv_cache=cache, position_ids=position)[:, -1]  # (B, H)
    return token, logprob, finished, hidden


# torch.compile(decode_step), built on first use and kept: its compilations are reused
_compiled_decode_step = None


def recompile_limit_options():
    """torch._dynamo.config settings for "at most MAX_GRAPHS graphs, then an error, never a silent eager
    fallback", under the names this torch has (renamed in 2.7)."""
    if hasattr(torch._dynamo.config, "recompile_limit"):
        return dict(recompile_limit=MAX_GRAPHS, fail_on_recompile_limit_hit=True)
    return dict(cache_size_limit=MAX_GRAPHS, fail_on_cache_limit_hit=True)


def compiled_decode_step(device):
    global _compiled_decode_step
    if tuple(int(part) for part in torch.__version__.split(".")[:2]) < COMPILE_MIN_TORCH:
        raise RuntimeError(f"--compile needs torch >= {'.'.join(map(str, COMPILE_MIN_TORCH))}, this is "
                           f"{torch.__version__}; upgrade torch or run without --compile (the eager path "
                           "computes the same completions)")
    if _compiled_decode_step is None:
        # CUDA graphs on a GPU, inductor's default on a CPU
        mode = "reduce-overhead" if device.type == "cuda" else None
        _compiled_decode_step = torch.compile(decode_step, fullgraph=True, dynamic=False, mode=mode)
    return _compiled_decode_step


@torch.no_grad()
def generate_compiled(model, prompts, max_new_tokens, *, temperature, top_p, eos_token_id, generator=None,
                      vocab_size=None, return_logprobs=False, check_every=8, top_k=0, row_generators=None,
                      samples_per_prompt=1):
    """generate(..., compile=True): the same contract as generate, through the compiled decode_step.

    The B rows are padded to batch_bucket(B) (the padding rows repeat row 0 and start finished) and
    the cache to a multiple of CACHE_BUCKET slots, in DecodeBuffers' tensors. Greedy tokens equal
    the eager path's; sampled tokens are sample_top_p_sorted's (or sample_top_k_top_p's, the same)
    for pre-drawn uniforms, which the eager CPU path, drawing by rejection, spends differently.
    """
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    step_fn = compiled_decode_step(device)
    eos_list = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    eos_ids, fill_id = torch.tensor(eos_list, device=device), eos_list[0] if eos_list else 0
    K, P = samples_per_prompt, max(len(p) for p in prompts)
    B = len(prompts) * K
    rows, length = batch_bucket(B), cache_length(P + max_new_tokens)
    if getattr(model, "decode_buffers", None) is None or model.decode_buffers.dtype != dtype:
        model.decode_buffers = DecodeBuffers(model.config, device, dtype)
    cache, key_bias = model.decode_buffers.get(rows, length)
    with torch.inference_mode():
        real_rows = KVCache([k[:B] for k in cache.keys], [v[:B] for v in cache.values], cache.cos, cache.sin)
        hidden = prefill(model, prompts, K, real_rows)  # (B, H)
        for keys, values in zip(cache.keys, cache.values):  # padding rows: row 0's prompt
            keys[B:], values[B:] = keys[:1], values[:1]
    hidden = torch.cat([hidden, hidden[:1].expand(rows - B, -1)]).contiguous()  # (rows, H)
    row_prompt_mask = pack_prompts(prompts, device)[1].repeat_interleave(K, dim=0)  # (B, P)
    row_prompt_mask = torch.cat([row_prompt_mask, row_prompt_mask[:1].expand(rows - B, -1)])  # (rows, P)
    key_bias.fill_(float("-inf"))
    key_bias[:, 0, 0, :P].masked_fill_(row_prompt_mask, 0.0)
    first_position = row_prompt_mask.sum(dim=1, keepdim=True)  # (rows, 1)
    finished = torch.arange(rows, device=device) >= B  # (rows,) the padding rows never sample
    # (N, rows, U): a step's (rows, U) has fixed strides
    uniforms = torch.zeros(max_new_tokens, rows, UNIFORMS_PER_DRAW, device=device)
    if temperature > 0 and row_generators is not None:
        shape = (max_new_tokens, UNIFORMS_PER_DRAW)
        per_row = [torch.rand(shape, generator=g, device=g.device) for g in row_generators]  # B x (N, U)
        uniforms[:, :B] = torch.stack(per_row, dim=1).to(device)
    elif temperature > 0:
        drawn = torch.rand(B, max_new_tokens, UNIFORMS_PER_DRAW, generator=generator, device=device)
        uniforms[:, :B] = drawn.transpose(0, 1)  # (N, B, U)
    # temperature and top-p as tensor inputs: changing them recompiles nothing
    settings = dict(eos_ids=eos_ids, fill_id=fill_id, top_k=top_k, vocab_size=vocab_size,
                    greedy=temperature == 0,
                    temperature=torch.tensor(float(temperature or 1.0), device=device),
                    top_p=torch.tensor(float(min(top_p, 1.0)), device=device))
    tokens, logprobs, valid = [], [], []
    for step in range(max_new_tokens):
        cache.slot = torch.full((1,), P + step, dtype=torch.long, device=device)
        valid.append(~finished)
        # a CUDA graph's replay overwrites its last outputs: keep copies
        torch.compiler.cudagraph_mark_step_begin()
        with torch._dynamo.config.patch(**recompile_limit_options()):
            position = first_position + step  # (rows, 1)
            # the slots up to this token's, rounded up to a multiple of ATTEND_BUCKET: Python numbers, no sync
            attend = min(-(-(P + step + 1) // ATTEND_BUCKET) * ATTEND_BUCKET, length)
            bias = model.decode_buffers.attended_bias(rows, length, attend)  # (rows, 1, 1, attend)
            outputs = step_fn(model, hidden, finished, uniforms[step], position, cache, bias, **settings)
        token, logprob, finished, hidden = (t.clone() for t in outputs)
        tokens.append(token)
        logprobs.append(logprob)
        if (step + 1) % check_every == 0 and bool(finished.all()):
            break
    cache.slot = None
    tokens, mask, logprobs = (torch.stack(t, dim=1)[:B] for t in (tokens, valid, logprobs))  # (B, N) each
    return trim(tokens, mask, logprobs, return_logprobs)