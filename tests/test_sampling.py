"""sampling.py: the KV cache, the prefill, the decode loop and the token samplers, against transformers'
generate and warpers and against hand-computed nuclei.
"""


import pytest
import torch

import grpo
from conftest import left_padded, save_tiny_checkpoint
from model import Qwen3
from sampling import (generate, sample_next_token, sample_top_k_top_p, sample_top_p_by_rejection,
                      sample_top_p_sorted, top_k_filter)


def test_kv_cache_decoding_equals_full_forward(tiny_checkpoint):
    directory, hf_model = tiny_checkpoint
    model = Qwen3.from_pretrained(directory, dtype=torch.float32)
    prompts = [[5, 9, 2, 7], [4, 11]]
    tokens, mask = generate(model, prompts, 12, temperature=0, top_p=1.0, eos_token_id=1)
    for row, prompt in enumerate(prompts):
        completion = tokens[row][mask[row]].tolist()
        full = torch.tensor([prompt + completion])
        with torch.no_grad():
            greedy = model.lm_head(model(full)).argmax(-1)[0]  # (T,)
        # each generated token is the argmax of the full forward at the position before it
        assert greedy[len(prompt) - 1 : len(prompt) - 1 + len(completion)].tolist() == completion


def test_batch_equals_each_prompt_alone(tiny_checkpoint):
    model = Qwen3.from_pretrained(tiny_checkpoint[0], dtype=torch.float32)
    prompts = [[5, 9, 2, 7, 3], [4, 11], [13, 14, 15]]
    tokens, mask = generate(model, prompts, 16, temperature=0, top_p=1.0, eos_token_id=1)
    for row, prompt in enumerate(prompts):
        alone, alone_mask = generate(model, [prompt], 16, temperature=0, top_p=1.0, eos_token_id=1)
        assert tokens[row][mask[row]].tolist() == alone[0][alone_mask[0]].tolist()


def test_greedy_generate_matches_transformers(tmp_path):
    directory, hf_model = save_tiny_checkpoint(tmp_path, seed=3, vocab_size=64)
    model = Qwen3.from_pretrained(directory, dtype=torch.float32)
    prompts = [[5, 9, 2, 7, 3, 8], [4, 11, 6]]
    tokens, mask = generate(model, prompts, 40, temperature=0, top_p=1.0, eos_token_id=1)
    ids, attention = left_padded(prompts, pad=1)
    reference = hf_model.generate(
        input_ids=ids, attention_mask=attention, max_new_tokens=40, do_sample=False, eos_token_id=1,
        pad_token_id=1
    )[:, ids.shape[1] :]
    assert mask.sum() >= 32 or (tokens == 1).any()  # long enough to mean something
    for row in range(len(prompts)):
        ours = tokens[row][mask[row]].tolist()
        assert ours == reference[row, : len(ours)].tolist()
        assert len(ours) == 40 or ours[-1] == 1


def test_sampling_is_seeded_and_respects_max_tokens(tiny_checkpoint):
    model = Qwen3.from_pretrained(tiny_checkpoint[0], dtype=torch.float32)
    prompts = [[5, 9, 2]] * 8

    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        return generate(model, prompts, 10, temperature=1.0, top_p=0.95, eos_token_id=[], generator=g)

    (a, mask_a), (b, _), (c, _) = sample(0), sample(0), sample(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (8, 10) and mask_a.all()  # no EOS: exactly max_new_tokens
    assert len(set(a[:, 0].tolist())) > 1  # the samples of one prompt do not share their first token


def test_mask_stops_at_first_eos(tiny_checkpoint):
    model = Qwen3.from_pretrained(tiny_checkpoint[0], dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    tokens, mask, logprobs = generate(model, [[5, 9]] * 16, 20, temperature=2.0, top_p=1.0,
                                      eos_token_id=[1, 2, 3, 4, 5, 6], generator=g, return_logprobs=True)
    eos = torch.isin(tokens, torch.tensor([1, 2, 3, 4, 5, 6]))
    assert eos.any()
    for row in range(16):
        length = int(mask[row].sum())
        assert mask[row, :length].all() and not mask[row, length:].any()  # a prefix
        first_eos = eos[row].nonzero()
        if len(first_eos):
            assert length == first_eos[0].item() + 1  # up to and including the first EOS
    assert (logprobs[mask] < 0).all() and (logprobs[~mask] == 0).all()
    # drawn at T = 2, scored under the untempered model: what the training forward recomputes
    forward_logprobs, _, _ = grpo.completion_forward(model, [[5, 9]] * 16, tokens, mask)
    torch.testing.assert_close(logprobs[mask], forward_logprobs[mask], atol=1e-5, rtol=0)


def test_shared_prefill_equals_repeating_the_prompt(tiny_checkpoint):
    model = Qwen3.from_pretrained(tiny_checkpoint[0], dtype=torch.float32)
    prompts, K = [[5, 9, 2, 7], [4, 11], [3]], 4

    def sample(shared):
        seeded = (torch.Generator().manual_seed(seed) for seed in (1, 2, 3))
        generators = [g for g in seeded for _ in range(K)]  # a prompt's rows share one
        kwargs = dict(temperature=1.0, top_p=0.9, top_k=20, eos_token_id=[1], row_generators=generators,
                      return_logprobs=True)
        if shared:
            return generate(model, prompts, 12, samples_per_prompt=K, **kwargs)
        return generate(model, [p for p in prompts for _ in range(K)], 12, **kwargs)
    (tokens, mask, logprobs), (tokens_repeated, mask_repeated,
                               logprobs_repeated) = sample(True), sample(False)
    assert torch.equal(tokens, tokens_repeated) and torch.equal(mask, mask_repeated)
    torch.testing.assert_close(logprobs, logprobs_repeated, atol=1e-5, rtol=0)
    assert len({tuple(row) for row in tokens[:K].tolist()}) > 1  # a prompt's K samples differ
    greedy = generate(model, prompts, 8, temperature=0, top_p=1.0, eos_token_id=[], samples_per_prompt=2)[0]
    one_each = generate(model, prompts, 8, temperature=0, top_p=1.0, eos_token_id=[])[0]
    assert torch.equal(greedy[0::2], greedy[1::2]) and torch.equal(greedy[0::2], one_each)


def test_top_p_keeps_exactly_the_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    for top_p, nucleus in [(0.4, {1}), (0.6, {1, 3}), (0.9, {1, 3, 2}), (1.0, {0, 1, 2, 3})]:
        drawn = set(sample_next_token(logits, 1.0, top_p, g).tolist())
        assert drawn == nucleus, (top_p, drawn)
    assert sample_next_token(logits, 0, 0.5).unique().tolist() == [1]


def test_rows_past_the_real_vocabulary_are_never_drawn(tiny_checkpoint):
    model = Qwen3.from_pretrained(tiny_checkpoint[0], dtype=torch.float32)
    with torch.no_grad():  # make the padding rows the most likely tokens by far
        model.lm_head.weight[80:] = model.model.norm.weight * 50
    g = torch.Generator().manual_seed(0)
    unmasked, _ = generate(model, [[5, 9]] * 4, 8, temperature=1.0, top_p=1.0, eos_token_id=[], generator=g)
    assert (unmasked >= 80).any()  # the test can fail
    tokens, _ = generate(model, [[5, 9]] * 4, 8, temperature=1.0, top_p=1.0, eos_token_id=[], generator=g,
                         vocab_size=80)
    assert (tokens < 80).all()


def test_temperature_divides_the_logits():
    logits = torch.tensor([2.0, 1.0, 0.0]).expand(20000, 3)
    g = torch.Generator().manual_seed(0)
    for top_p in (1.0, 0.999):  # the plain draw and the CPU top-p sampler
        drawn = sample_next_token(logits, 2.0, top_p, g)
        frequencies = torch.bincount(drawn, minlength=3).float() / len(drawn)
        # [0.506, 0.307, 0.186]; T * logits: [0.867, ...]
        expected = torch.softmax(torch.tensor([2.0, 1.0, 0.0]) / 2.0, dim=0)
        torch.testing.assert_close(frequencies, expected, atol=0.015, rtol=0)


def test_top_k_then_top_p_keeps_the_hand_computed_set():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    cases = [  # (top_k, top_p, kept)
        (2, 1.0, {1, 3}), (3, 1.0, {1, 3, 2}), (0, 1.0, {0, 1, 2, 3}), (9, 1.0, {0, 1, 2, 3}),
        (2, 0.6, {1}),  # top-k first: renormalised [0.625, 0.375], so 0.5's token alone reaches 0.6 ...
        (0, 0.6, {1, 3}),  # ... which without top-k needs two tokens
        (3, 0.8, {1, 3}), (1, 0.95, {1}),
    ]
    for top_k, top_p, kept in cases:
        drawn = set(sample_next_token(logits, 1.0, top_p, g, top_k=top_k).tolist())
        assert drawn == kept, (top_k, top_p, drawn)
    kept = top_k_filter(torch.tensor([[1.0, 3.0, 2.0, 0.5]]), 2)
    assert kept.tolist() == [[float("-inf"), 3.0, 2.0, float("-inf")]]


def test_seeded_draws_stay_in_transformers_warpers_kept_set():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper, TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 300, generator=g) * 3  # (B, V)
    for temperature, top_k, top_p in [(1.0, 50, 0.95), (0.7, 10, 0.5), (1.3, 50, 1.0), (1.0, 0, 0.9)]:
        warped = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            warped = TopKLogitsWarper(top_k)(None, warped)
        if top_p < 1:
            warped = TopPLogitsWarper(top_p)(None, warped)
        # (B, V) transformers' kept set, in its order: temperature, top-k, top-p
        kept = torch.isfinite(warped)
        for _ in range(50):
            drawn = sample_next_token(logits, temperature, top_p, g, top_k=top_k)  # (B,)
            assert kept.gather(1, drawn[:, None]).all(), (temperature, top_k, top_p)
        if top_k:
            assert (kept.sum(dim=1) <= top_k).all()  # the test can fail: far fewer than 300 kept


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_top_k_keeps_every_token_tied_with_the_kth_logit(compiled):
    """logits [3, 1, 2, 2], top-k 2: ids 2 and 3 tie at the 2nd value and both stay drawable, as
    transformers' TopKLogitsWarper keeps every logit at or above the k-th (bf16 logits tie often). For the
    same uniforms sample_top_k_top_p (the GPU's and the compiled step's sampler) draws what the sorted
    sampler draws from top_k_filter's probabilities, each kept token about as often as its probability."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    n = 6000
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0]]).expand(n, 4).contiguous()  # (n, V)
    uniforms = torch.rand(n, generator=torch.Generator().manual_seed(0))  # (n,)
    sampler = torch.compile(sample_top_k_top_p, fullgraph=True) if compiled else sample_top_k_top_p
    for top_p in (1.0, 0.9):
        drawn = sampler(logits, 2, torch.tensor(top_p), uniforms=uniforms)  # (n,)
        filtered = top_k_filter(logits, 2).softmax(dim=-1)  # (n, V)
        assert torch.equal(drawn, sample_top_p_sorted(filtered, top_p, uniforms=uniforms)), top_p
        warped = TopKLogitsWarper(2)(None, logits[:1].clone())
        if top_p < 1:
            warped = TopPLogitsWarper(top_p)(None, warped)
        kept = torch.isfinite(warped[0]).nonzero().flatten().tolist()
        assert kept == [0, 2, 3] and sorted(set(drawn.tolist())) == kept, top_p
        frequency = torch.bincount(drawn, minlength=4).float() / n
        torch.testing.assert_close(frequency, filtered[0], atol=0.02, rtol=0)


def test_sampler_never_loops_forever():
    probs = torch.softmax(torch.randn(4, 50), dim=-1)
    assert torch.equal(sample_top_p_by_rejection(probs, 0.0), probs.argmax(dim=-1))  # p = 0: the top token
    probs[0, 3] = float("nan")  # garbage in: an answer, not a hang
    assert sample_top_p_by_rejection(probs, 0.5).shape == (4,)


def in_nucleus(probs, top_p):
    """Brute force, (..., V) -> (..., V) bool: token i is kept iff the mass of strictly likelier tokens is
    below p."""
    # (..., V, V): [i, j] = p_j if p_j > p_i
    likelier = (probs[..., None, :] > probs[..., :, None]) * probs[..., None, :]
    return likelier.sum(dim=-1) < top_p


def nucleus(probs, top_p):
    return set(in_nucleus(probs, top_p).nonzero().flatten().tolist())


@pytest.mark.parametrize("sampler", [sample_top_p_sorted, sample_top_p_by_rejection])
def test_top_p_samplers_draw_the_nucleus_with_its_probabilities(sampler):
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    generator = torch.Generator().manual_seed(0)
    n = 40000
    for top_p in (0.4, 0.6, 0.9, 0.97):
        kept = sorted(nucleus(probs, top_p))
        drawn = sampler(probs.expand(n, 4).contiguous(), top_p, generator)  # (n,)
        assert set(drawn.tolist()) == set(kept), top_p
        frequency = torch.bincount(drawn, minlength=4).float() / n  # (4,)
        expected = torch.zeros(4)
        expected[kept] = probs[kept] / probs[kept].sum()
        torch.testing.assert_close(frequency, expected, atol=0.01, rtol=0)  # 4 sigma at n = 40000


@pytest.mark.parametrize("sampler", [sample_top_p_sorted, sample_top_p_by_rejection])
def test_top_p_samplers_stay_in_the_nucleus_of_random_distributions(sampler):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 300, generator=generator) * 3  # (B, V), a few nats wide
    probs = logits.softmax(dim=-1)
    for top_p in (0.5, 0.95):
        kept = in_nucleus(probs, top_p)  # (B, V)
        # the test can fail
        assert (kept.sum(dim=-1) > 1).float().mean() > 0.5 and (kept.sum(dim=-1) < 300).all()
        for _ in range(20):
            drawn = sampler(probs, top_p, generator)  # (B,)
            assert kept.gather(-1, drawn[:, None]).all()


def test_rejection_sampler_ends_on_a_one_hot_distribution_and_tiny_p():
    probs = torch.zeros(3, 50)
    probs[:, 7] = 1.0
    assert sample_top_p_by_rejection(probs, 0.5).tolist() == [7, 7, 7]
    spread = torch.full((2, 50), 1 / 50)
    spread[:, 3] += 0.01
    spread /= spread.sum(dim=-1, keepdim=True)
    assert sample_top_p_by_rejection(spread, 1e-6).tolist() == [3, 3]  # only the top token is kept


def test_generate_returns_ordinary_tensors(gqa_model):
    tokens, mask, logprobs = generate(gqa_model, [[5, 9, 2], [4]], 6, temperature=1.0, top_p=0.9,
                                      eos_token_id=[],
                                      generator=torch.Generator().manual_seed(0), return_logprobs=True)
    assert not any(torch.is_inference(t) for t in (tokens, mask, logprobs))
    weight = torch.ones(mask.shape, requires_grad=True)
    (weight * mask * logprobs).sum().backward()  # an inference tensor could not be saved for backward
    assert torch.equal(weight.grad, logprobs * mask)
