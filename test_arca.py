"""The tests of arca. CPU only, nothing downloaded: tiny random Qwen3 checkpoints are built with
transformers (the oracle) and saved as safetensors; tests that read ../shared skip without it.

Run: python -m pytest -q
"""

import json
from pathlib import Path

import pytest
import torch
import transformers

from model import (Qwen3, Qwen3Config, apply_rotary, generate, load_tokenizer, rotary_cos_sin, sample_next_token,
                   sample_top_p_by_rejection, sample_top_p_sorted, top_k_filter)
import os
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from lora import (LoRALinear, apply_lora, disable_adapter, load_adapter, lora_layers, merge_adapter,
                  sampling_copies, save_adapter, unmerge_adapter)
import math
import re
from credit import (arca_scores, credit_diagnostics, credit_html, credit_page, credit_scores, credit_section, diagnostic_sums,
                    divergence_scores, effective_token_ratio, entropy_reduction_scores, gini, surprisal_scores, token_weights,
                    top_mass, uniform_scores)

REPO = Path(__file__).resolve().parent
SHARED_DATA = REPO.parent / "shared" / "data"

# ================================================================================================
# Shared fixtures: tiny random Qwen3 checkpoints saved by transformers


def tiny_hf_config(**overrides):
    settings = dict(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, rope_theta=10000.0,
        tie_word_embeddings=True, eos_token_id=1, bos_token_id=1, pad_token_id=1,
        initializer_range=0.2,  # large enough that a wrong formula moves the logits well past 1e-4
    )
    settings.update(overrides)
    return transformers.Qwen3Config(**settings)


def save_tiny_checkpoint(directory, seed=0, max_shard_size=None, **overrides):
    """A random transformers Qwen3ForCausalLM saved as safetensors; returns (directory, hf_model)."""
    torch.manual_seed(seed)
    hf_model = transformers.Qwen3ForCausalLM(tiny_hf_config(**overrides)).eval()
    with torch.no_grad():  # norms start at 1: randomise them so a mixed-up norm cannot pass
        for name, param in hf_model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    hf_model.save_pretrained(directory, **kwargs)
    return Path(directory), hf_model


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def left_padded(prompts, pad=0):
    """input_ids and attention_mask (B, T) for a list of token lists, padded on the left."""
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


# ================================================================================================
# model.py: parity with transformers


@pytest.mark.parametrize(
    "name, overrides, shard",
    [
        ("tied", {}, None),
        ("untied", {"tie_word_embeddings": False}, None),
        ("wide-heads", {"num_attention_heads": 8, "head_dim": 16}, None),  # 8 * 16 = 128 != hidden 32
        ("tied-sharded", {}, "20KB"),
        ("untied-sharded", {"tie_word_embeddings": False}, "20KB"),
    ],
)
def test_logits_match_transformers(tmp_path, name, overrides, shard):
    directory, hf_model = save_tiny_checkpoint(tmp_path, max_shard_size=shard, **overrides)
    if shard:
        assert (directory / "model.safetensors.index.json").exists()
    model = Qwen3.from_pretrained(directory, dtype=torch.float32)
    prompts = [[5, 9, 2, 7, 3, 8], [4, 11, 6], [13]]
    ids, mask = left_padded(prompts)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model.lm_head(model(ids, attention_mask=mask))
        theirs = hf_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        unpadded = [model.lm_head(model(torch.tensor([p])))[0] for p in prompts]
    real = mask.bool()
    max_diff = (ours[real] - theirs[real]).abs().max().item()
    print(f"{name}: max |logit diff| vs transformers = {max_diff:.2e}")
    assert max_diff < 1e-4
    for row, prompt in enumerate(prompts):  # a padded row equals its unpadded sequence
        torch.testing.assert_close(ours[row, -len(prompt):], unpadded[row], atol=1e-5, rtol=1e-5)


def test_rope_matches_transformers():
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding, apply_rotary_pos_emb

    config = tiny_hf_config(head_dim=16)
    positions = torch.tensor([[0, 1, 2, 3, 40], [7, 8, 9, 10, 200]])
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
    cos_ref, sin_ref = Qwen3RotaryEmbedding(config)(q, positions)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos_ref, sin_ref)
    cos, sin = rotary_cos_sin(positions, 16, config.rope_parameters["rope_theta"], torch.float32)
    torch.testing.assert_close(apply_rotary(q, cos, sin), q_ref)
    torch.testing.assert_close(apply_rotary(k, cos, sin), k_ref)


def test_config_reads_head_dim_and_both_config_styles(tmp_path):
    official = {  # Qwen3-0.6B-Base's config.json (transformers 4 style): q is wider than hidden
        "model_type": "qwen3", "hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 128, "intermediate_size": 3072, "num_hidden_layers": 28, "rope_theta": 1000000,
        "rope_scaling": None, "torch_dtype": "bfloat16", "tie_word_embeddings": True, "vocab_size": 151936,
    }
    (tmp_path / "config.json").write_text(json.dumps(official))
    config = Qwen3Config.from_json(tmp_path / "config.json")
    assert (config.head_dim, config.hidden_size, config.rope_theta) == (128, 1024, 1000000)
    with torch.device("meta"):
        model = Qwen3(config)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (2048, 1024)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    new_style = dict(official, rope_parameters={"rope_type": "default", "rope_theta": 5.0}, dtype="float32")
    del new_style["rope_theta"], new_style["torch_dtype"]
    (tmp_path / "config.json").write_text(json.dumps(new_style))
    config = Qwen3Config.from_json(tmp_path / "config.json")
    assert (config.rope_theta, config.torch_dtype) == (5.0, "float32")


# ================================================================================================
# model.py: KV cache and sampling


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
        input_ids=ids, attention_mask=attention, max_new_tokens=40, do_sample=False, eos_token_id=1, pad_token_id=1
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
        generators = [g for g in (torch.Generator().manual_seed(seed) for seed in (1, 2, 3)) for _ in range(K)]  # a prompt's rows share one
        kwargs = dict(temperature=1.0, top_p=0.9, top_k=20, eos_token_id=[1], row_generators=generators, return_logprobs=True)
        if shared:
            return generate(model, prompts, 12, samples_per_prompt=K, **kwargs)
        return generate(model, [p for p in prompts for _ in range(K)], 12, **kwargs)
    (tokens, mask, logprobs), (tokens_repeated, mask_repeated, logprobs_repeated) = sample(True), sample(False)
    assert torch.equal(tokens, tokens_repeated) and torch.equal(mask, mask_repeated)
    torch.testing.assert_close(logprobs, logprobs_repeated, atol=1e-5, rtol=0)
    assert len({tuple(row) for row in tokens[:K].tolist()}) > 1  # a prompt's K samples differ
    greedy = generate(model, prompts, 8, temperature=0, top_p=1.0, eos_token_id=[], samples_per_prompt=2)[0]
    assert torch.equal(greedy[0::2], greedy[1::2]) and torch.equal(greedy[0::2], generate(model, prompts, 8, temperature=0, top_p=1.0, eos_token_id=[])[0])


def inductor_missing():
    """Why torch.compile cannot build here, or None (the compiled path's tests skip with the reason)."""
    try:
        torch.compile(lambda x: x * 2, fullgraph=True)(torch.ones(2))
        return None
    except Exception as err:  # no C++ compiler, an unsupported platform, ...
        return f"torch.compile (inductor) cannot build here: {type(err).__name__}: {str(err)[:200]}"


@pytest.mark.skipif(inductor_missing() is not None, reason=str(inductor_missing()))
def test_compiled_decode_step_matches_eager_and_compiles_once(tiny_checkpoint, monkeypatch):
    """Inductor's compiled step: each layer's K and V written in place (its generated code allocates no cache-sized
    buffer, which a copy of the cache would need), greedy tokens equal eager's, sampled ones equal the eager sorted
    sampler's on the same uniforms at three temperatures without recompiling, log-probs the trainer's, LoRA too."""
    import model as model_module
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setattr(model_module, "_compiled_decode_step", None)  # a fresh compilation, whose code is read below
    torch._dynamo.reset()
    model = Qwen3.from_pretrained(tiny_checkpoint[0], dtype=torch.float32)
    prompts = [[5, 9, 2, 7], [4, 11], [3]]
    greedy = dict(temperature=0, top_p=1.0, eos_token_id=[1, 2, 3])
    eager_tokens, eager_mask = generate(model, prompts, 24, **greedy)
    graphs = counters["stats"]["unique_graphs"]
    (tokens, mask), code = run_and_get_code(lambda: generate(model, prompts, 24, compile=True, **greedy))
    assert counters["stats"]["unique_graphs"] - graphs == 1  # one compilation for all 24 steps
    batch, kv_heads, slots, head_dim = model.decode_buffers.caches[4, 256][0].keys[0].shape  # 3 rows in the bucket of 4
    allocations = re.findall(r"empty_strided\w*\(\(([\d, ]+)\)", "\n".join(code))
    assert allocations and f"{batch}, {kv_heads}, {slots}, {head_dim}" not in allocations  # the cache is never copied
    assert torch.equal(tokens, eager_tokens) and torch.equal(mask, eager_mask) and not mask.all()  # EOS stopped some rows
    generate(model, [[7, 8], [9, 10], [11]], 24, compile=True, **greedy)
    generate(model, [[7, 8], [9, 10], [11]], 40, compile=True, **greedy)
    assert counters["stats"]["unique_graphs"] - graphs == 1  # the same batch and cache bucket, any length in it: reused

    def sorted_sampler(logits, temperature, top_p, generator=None, top_k=0, uniforms=None):  # the eager reference
        if temperature == 0:
            return logits.argmax(dim=-1)
        return sample_top_p_sorted(top_k_filter(logits / temperature, top_k).softmax(dim=-1), top_p, uniforms=uniforms[:, 0])

    graphs = None
    for temperature in (0.7, 1.0, 1.3):
        rows = lambda: [g for seed in (1, 2, 3) for g in [torch.Generator().manual_seed(seed)] * 4]  # a prompt's K rows share one
        sampling = dict(temperature=temperature, top_p=0.9, top_k=20, eos_token_id=[1], samples_per_prompt=4, return_logprobs=True)
        compiled = generate(model, prompts, 16, compile=True, row_generators=rows(), **sampling)
        with monkeypatch.context() as patched:
            patched.setattr(model_module, "sample_next_token", sorted_sampler)
            reference = generate(model, prompts, 16, row_generators=rows(), **sampling)
        assert torch.equal(compiled[0], reference[0]) and torch.equal(compiled[1], reference[1]), temperature
        graphs = graphs or counters["stats"]["unique_graphs"]
        trained, _, _ = grpo.completion_forward(model, [p for p in prompts for _ in range(4)], compiled[0], compiled[1])
        torch.testing.assert_close(compiled[2][compiled[1]], trained[compiled[1]], atol=1e-5, rtol=0)  # the trainer's log-probs
    assert counters["stats"]["unique_graphs"] == graphs  # temperature and top-p are inputs: no recompilation
    assert len({tuple(row) for row in compiled[0][:4].tolist()}) > 1  # a prompt's 4 samples differ
    randomise_adapter(apply_lora(model, rank=4, alpha=8))  # the rollout path: unmerged LoRA in sampling_copies
    with sampling_copies(model):
        eager_lora = generate(model, prompts, 24, **greedy)
        compiled_lora = generate(model, prompts, 24, compile=True, **greedy)
    assert all(torch.equal(a, b) for a, b in zip(eager_lora, compiled_lora)) and not torch.equal(eager_lora[0], eager_tokens)
    torch._dynamo.reset()


def test_a_paper_run_compiles_a_known_number_of_graphs(tiny_checkpoint, monkeypatch):
    """The calls of a paper run (rollouts of 8 prompts x K 4, evaluation batches of 64 and their tails, greedy and
    sampled), with temperature, top-p, max_new_tokens and the batch size changing: one graph per (greedy or sampled,
    batch bucket, cache bucket), counted by dynamo (eager backend: the graphs, not inductor's kernels, are counted),
    reused by every later call, its buffers at the same addresses."""
    import model as model_module
    from torch._dynamo.testing import CompileCounter

    counter, real_compile = CompileCounter(), torch.compile
    monkeypatch.setattr(model_module, "_compiled_decode_step", None)
    monkeypatch.setattr(model_module, "CACHE_BUCKET", 32)  # the tiny model's lengths, as 256 is the paper's
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, backend=counter, fullgraph=True, dynamic=False))
    torch._dynamo.reset()
    model = Qwen3.from_pretrained(tiny_checkpoint[0], dtype=torch.float32)
    prompt = lambda i: [5 + i % 7, 9, 2 + i % 5][: 1 + i % 3]
    rollout = dict(samples_per_prompt=4, top_k=20, eos_token_id=[1], generator=torch.Generator().manual_seed(0), compile=True)
    calls = [  # (what, prompts, max_new_tokens, sampling)
        ("rollout, a long one: cache bucket 64", 8, 40, dict(temperature=1.0, top_p=0.95, **rollout)),
        ("rollout", 8, 12, dict(temperature=1.0, top_p=0.95, **rollout)),
        ("rollout, other T, p and length", 8, 20, dict(temperature=0.7, top_p=0.9, **rollout)),
        ("greedy evaluation, batch 64", 64, 12, dict(temperature=0.0, top_p=1.0, eos_token_id=[1], compile=True)),
        ("greedy evaluation, the tail of 200", 8, 12, dict(temperature=0.0, top_p=1.0, eos_token_id=[1], compile=True)),
        ("pass@4, 16 prompts x 4", 16, 12, dict(temperature=1.0, top_p=0.95, **rollout)),
        ("pass@4, the tail: 8 x 4", 8, 12, dict(temperature=1.3, top_p=0.8, **rollout)),
        ("5 prompts x 4: padded to 32 rows", 5, 16, dict(temperature=1.0, top_p=0.95, **rollout)),
    ]
    graphs = []
    for what, count, new, sampling in calls:
        generate(model, [prompt(i) for i in range(count)], new, **sampling)
        graphs.append(counter.frame_count)
    assert graphs == [1, 2, 2, 3, 4, 5, 5, 5], graphs
    caches = dict(model.decode_buffers.caches)
    addresses = {key: cache.keys[0].data_ptr() for key, (cache, _) in caches.items()}
    for what, count, new, sampling in calls:  # a second paper step: no new graph, every bucket's buffers where they were
        generate(model, [prompt(i) for i in range(count)], new, **sampling)
    assert counter.frame_count == 5 and sorted(caches) == [(8, 32), (32, 32), (32, 64), (64, 32)]
    assert all(model.decode_buffers.caches[key][0] is caches[key][0] and caches[key][0].keys[0].data_ptr() == addresses[key]
               for key in caches)
    torch._dynamo.reset()


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
    tokens, _ = generate(model, [[5, 9]] * 4, 8, temperature=1.0, top_p=1.0, eos_token_id=[], generator=g, vocab_size=80)
    assert (tokens < 80).all()


# ----------------------------------------------------------------------------------------------
# Sampling details a bug would silently change: temperature, top-k, the entropy's sign, RMSNorm's eps


def test_temperature_divides_the_logits():
    logits = torch.tensor([2.0, 1.0, 0.0]).expand(20000, 3)
    g = torch.Generator().manual_seed(0)
    for top_p in (1.0, 0.999):  # the plain draw and the CPU top-p sampler
        drawn = sample_next_token(logits, 2.0, top_p, g)
        frequencies = torch.bincount(drawn, minlength=3).float() / len(drawn)
        expected = torch.softmax(torch.tensor([2.0, 1.0, 0.0]) / 2.0, dim=0)  # [0.506, 0.307, 0.186]; T * logits: [0.867, ...]
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
    assert top_k_filter(torch.tensor([[1.0, 3.0, 2.0, 0.5]]), 2).tolist() == [[float("-inf"), 3.0, 2.0, float("-inf")]]


def test_seeded_draws_stay_in_transformers_warpers_kept_set():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 300, generator=g) * 3  # (B, V)
    for temperature, top_k, top_p in [(1.0, 50, 0.95), (0.7, 10, 0.5), (1.3, 50, 1.0), (1.0, 0, 0.9)]:
        warped = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            warped = TopKLogitsWarper(top_k)(None, warped)
        if top_p < 1:
            warped = TopPLogitsWarper(top_p)(None, warped)
        kept = torch.isfinite(warped)  # (B, V) transformers' kept set, in its order: temperature, top-k, top-p
        for _ in range(50):
            drawn = sample_next_token(logits, temperature, top_p, g, top_k=top_k)  # (B,)
            assert kept.gather(1, drawn[:, None]).all(), (temperature, top_k, top_p)
        if top_k:
            assert (kept.sum(dim=1) <= top_k).all()  # the test can fail: far fewer than 300 kept


def test_sampler_never_loops_forever():
    probs = torch.softmax(torch.randn(4, 50), dim=-1)
    assert torch.equal(sample_top_p_by_rejection(probs, 0.0), probs.argmax(dim=-1))  # p = 0: the top token
    probs[0, 3] = float("nan")  # garbage in: an answer, not a hang
    assert sample_top_p_by_rejection(probs, 0.5).shape == (4,)


def test_entropy_is_positive_and_hand_computed():
    from model import token_logprobs

    logprobs, entropies = token_logprobs(torch.zeros(2, 4), torch.tensor([0, 3]))  # uniform over 4
    torch.testing.assert_close(entropies, torch.full((2,), math.log(4)))  # 1.386; a flipped sign gives -1.386
    torch.testing.assert_close(logprobs, torch.full((2,), -math.log(4)))
    p = torch.tensor([0.7, 0.2, 0.1])
    _, entropy = token_logprobs(p.log()[None], torch.tensor([0]))
    torch.testing.assert_close(entropy, -(p * p.log()).sum()[None])


def test_rms_norm_puts_eps_inside_the_root():
    from model import RMSNorm

    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(3, 8) * 1e-3  # mean(x^2) ~ 1e-6 ~ eps, where the placement matters
    expected = norm.weight * x / torch.sqrt((x ** 2).mean(dim=-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), expected)
    reference = transformers.models.qwen3.modeling_qwen3.Qwen3RMSNorm(8, eps=1e-6)
    reference.weight.data.copy_(norm.weight.data)
    torch.testing.assert_close(norm(x), reference(x))


# ================================================================================================
# model.py: loader errors


def test_loader_errors_name_the_problem(tmp_path, tiny_checkpoint):
    import shutil

    from safetensors.torch import load_file, save_file

    source = tiny_checkpoint[0]

    def copy(name):
        target = tmp_path / name
        shutil.copytree(source, target)
        return target

    with pytest.raises(FileNotFoundError, match="config.json"):
        (lambda d: (d.joinpath("config.json").unlink(), Qwen3.from_pretrained(d)))(copy("noconfig"))

    directory = copy("llama")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
    with pytest.raises(ValueError, match="'llama'"):
        Qwen3.from_pretrained(directory)

    def with_tensors(name, edit):
        directory = copy(name)
        tensors = load_file(directory / "model.safetensors")
        edit(tensors)
        save_file(tensors, directory / "model.safetensors")
        return directory

    with pytest.raises(ValueError, match=r"missing tensor.*model\.norm\.weight"):
        Qwen3.from_pretrained(with_tensors("missing", lambda t: t.pop("model.norm.weight")))
    extras = {f"model.extra{i}.weight": torch.zeros(2) for i in range(7)}
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) \['model\.extra0\.weight', .*\.\.\. \(7 in all\)"):
        Qwen3.from_pretrained(with_tensors("unexpected", lambda t: t.update(extras)))
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has dtype I32, expected floating point"):
        Qwen3.from_pretrained(with_tensors("int", lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)})))
    different_head = lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] + 1})
    with pytest.raises(ValueError, match=r"ties lm_head.*different lm_head\.weight"):
        Qwen3.from_pretrained(with_tensors("tied-with-head", different_head))
    same_head = lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()})
    Qwen3.from_pretrained(with_tensors("tied-with-same-head", same_head))  # a redundant copy is fine

    for name, content in (("empty", b""), ("html", b"<!DOCTYPE html><html>404</html>"), ("truncated", None)):
        directory = copy(name)
        weights = directory / "model.safetensors"
        weights.write_bytes(content if content is not None else weights.read_bytes()[:1000])
        with pytest.raises(ValueError, match=re.escape(str(weights)) + ": not a readable safetensors file"):
            Qwen3.from_pretrained(directory)
    bad_shape = lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(65, 32)})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*\(65, 32\).*\(64, 32\)"):
        Qwen3.from_pretrained(with_tensors("shape", bad_shape))

    directory = copy("lfs")
    (directory / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n")
    with pytest.raises(ValueError, match="git-lfs pointer"):
        Qwen3.from_pretrained(directory)

    directory = copy("shards")
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        Qwen3.from_pretrained(directory)
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="plain file name"):
        Qwen3.from_pretrained(directory)

    # two shards: a tensor in both, or an index that names the wrong shard for a tensor
    directory = copy("two-shards")
    tensors = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    first = {k: v for k, v in tensors.items() if k != "model.norm.weight"}
    save_file(first, directory / "a.safetensors")
    save_file({"model.norm.weight": tensors["model.norm.weight"], "model.embed_tokens.weight": tensors["model.embed_tokens.weight"]},
              directory / "b.safetensors")
    weight_map = {**{k: "a.safetensors" for k in first}, "model.norm.weight": "b.safetensors"}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=r"b\.safetensors: its tensors differ from what model\.safetensors\.index\.json assigns"):
        Qwen3.from_pretrained(directory)  # b also holds the embedding, which the index puts in a
    weight_map["model.embed_tokens.weight"] = "b.safetensors"
    save_file({k: v for k, v in first.items()}, directory / "a.safetensors")  # ... and a still holds it too
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=r"a\.safetensors: its tensors differ"):
        Qwen3.from_pretrained(directory)

    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        Qwen3.from_pretrained(tmp_path / "does-not-exist")


# ================================================================================================
# model.py: tokenizer


def test_config_without_tie_word_embeddings_is_untied_as_in_transformers(tmp_path):
    directory, reference = save_tiny_checkpoint(tmp_path / "untied", tie_word_embeddings=False)
    config = json.loads((directory / "config.json").read_text())
    del config["tie_word_embeddings"]
    (directory / "config.json").write_text(json.dumps(config))
    ours = Qwen3.from_pretrained(directory, dtype=torch.float32)
    assert not ours.config.tie_word_embeddings
    ids = torch.tensor([[3, 11, 4, 13]])
    with torch.no_grad():
        torch.testing.assert_close(ours.lm_head(ours(ids)), reference(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    # a tied checkpoint whose config lost the key: the missing head is named, with the reason
    tied, _ = save_tiny_checkpoint(tmp_path / "tied")
    config = json.loads((tied / "config.json").read_text())
    del config["tie_word_embeddings"]
    (tied / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"lm_head\.weight.*untied \(tie_word_embeddings is false or missing"):
        Qwen3.from_pretrained(tied)


def test_tokenizer_knows_eos_and_pad(tmp_path, tiny_checkpoint):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "a": 1, "b": 2, "[UNK]": 3}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)  # no config.json: <|endoftext|>
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.vocab_size) == (0, 0, 4)
    assert loaded.encode("a b a") == [1, 2, 1]
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert load_tokenizer(tmp_path).eos_token_id == 2


@pytest.mark.skipif(not (SHARED_DATA / "qwen3-tokenizer").exists(), reason="needs ../shared/data")
def test_real_qwen3_tokenizer_ids():
    tokenizer = load_tokenizer(SHARED_DATA / "qwen3-tokenizer")
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.vocab_size) == (151643, 151643, 151669)
    text = "Solve: \\boxed{\\frac{1}{2}}"
    ids = tokenizer.encode(text)
    assert ids == [50, 3948, 25, 1124, 79075, 35702, 37018, 90, 16, 15170, 17, 3417]
    assert tokenizer.decode(ids) == text


# ================================================================================================
# lora.py

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """A tiny random transformers Qwen3, saved as safetensors: the weights both models load."""
    torch.manual_seed(0)
    config = transformers.Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=64, tie_word_embeddings=True)
    directory = tmp_path_factory.mktemp("tiny-qwen3")
    transformers.Qwen3ForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    return directory


def tiny_model(checkpoint_dir):
    return Qwen3.from_pretrained(checkpoint_dir, dtype=torch.float32)


def hf_model(checkpoint_dir):
    return transformers.Qwen3ForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32).eval()


def input_ids(batch=2, length=7):
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    return model.lm_head(model(ids))  # (B, T, V)


def randomise_adapter(model, seed=0):
    """Give every B random values so the adapter changes the output (a fresh one does not)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(0.05 * torch.randn(layer.lora_B.shape, generator=generator))
    return model


# ----------------------------------------------------------------------------------------------
# The layer and apply_lora


def test_lora_linear_computes_the_formula():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, rank=3, alpha=6)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 4, 6)
    expected = x @ base.weight.T + base.bias + (x @ layer.lora_A.T @ layer.lora_B.T) * 6 / 3
    torch.testing.assert_close(layer(x), expected)
    assert not base.weight.requires_grad and layer.lora_A.requires_grad and layer.lora_B.requires_grad


def test_lora_dropout_drops_the_input_not_the_update():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LoRALinear(base, rank=4, alpha=8, dropout=0.5).train()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 16)
    torch.manual_seed(1)
    ours = layer(x)
    torch.manual_seed(1)  # the same mask, drawn by hand on the input (PEFT: lora_B(lora_A(dropout(x))) * scaling)
    expected = base(x) + F.linear(F.linear(F.dropout(x, 0.5, training=True), layer.lora_A), layer.lora_B) * 2.0
    torch.testing.assert_close(ours, expected)
    # and PEFT's own layer, same weights, same random numbers
    peft_model = get_peft_model(nn.Sequential(nn.Linear(16, 8)), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["0"]))
    peft_layer = peft_model.base_model.model[0]
    with torch.no_grad():
        peft_layer.base_layer.weight.copy_(base.weight)
        peft_layer.base_layer.bias.copy_(base.bias)
        peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
        peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
    peft_model.train()
    torch.manual_seed(1)
    torch.testing.assert_close(ours, peft_model(x))
    layer.eval()
    torch.testing.assert_close(layer(x), base(x) + F.linear(F.linear(x, layer.lora_A), layer.lora_B) * 2.0)  # eval: no dropout


def test_adapter_stays_fp32_on_a_bf16_base():
    layer = LoRALinear(nn.Linear(8, 4, bias=False).to(torch.bfloat16), rank=2, alpha=4)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    y = layer(torch.randn(3, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_B.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0


def test_a_bf16_adapter_keeps_no_fp32_copy_of_its_input():
    """compute_dtype bf16 on a bf16 layer: backward keeps x itself (no fp32 copy); fp32 (PEFT's way) keeps one. The
    gradients still reach fp32 A and B, and the output is the fp32 computation's to bf16 rounding."""
    from model import Linear  # the model's linear layer: computes in its input's dtype

    torch.manual_seed(0)
    base = Linear(64, 32, bias=False).to(torch.bfloat16)
    x = torch.randn(4, 10, 64).to(torch.bfloat16).requires_grad_()
    kept, outputs = {}, {}
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(1)  # the same A and B for both
        layer = LoRALinear(base, rank=8, alpha=16, compute_dtype=dtype)
        nn.init.normal_(layer.lora_B, std=0.1)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            outputs[dtype] = layer(x)
        kept[dtype] = [t for t in saved if t.numel() == x.numel() and t.dtype == torch.float32]  # an fp32 copy of the input
        outputs[dtype].float().sum().backward()
        assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_A.grad.abs().sum() > 0
    assert kept[torch.bfloat16] == [] and len(kept[torch.float32]) == 1
    torch.testing.assert_close(outputs[torch.bfloat16].float(), outputs[torch.float32].float(), atol=0.05, rtol=0.02)
    exact = LoRALinear(base, rank=8, alpha=16, compute_dtype=torch.bfloat16)  # an fp32 pass computes the update in fp32
    assert exact(x.detach().float()).dtype == torch.float32


def test_sampling_copies_compute_the_update_in_the_base_dtype():
    torch.manual_seed(0)
    for dtype, tolerance in [(torch.float32, 1e-6), (torch.bfloat16, 2**-7)]:
        layer = LoRALinear(nn.Linear(64, 32).to(dtype), rank=8, alpha=16).eval()
        nn.init.normal_(layer.lora_B, std=0.2)  # an update about as large as the base output
        x = torch.randn(3, 5, 64).to(dtype)
        w, b = layer.base.weight.float(), layer.base.bias.float()
        exact = x.float() @ w.T + b + (x.float() @ layer.lora_A.T @ layer.lora_B.T) * 2.0  # (3, 5, 32), fp32
        assert (exact - (x.float() @ w.T + b)).abs().mean() > 0.3 * exact.abs().mean()  # the update matters
        with torch.no_grad(), sampling_copies(nn.Sequential(layer)):
            assert layer.sampling_B.dtype == dtype and torch.equal(layer.sampling_B, (layer.lora_B * 2.0).to(dtype))
            assert "sampling_A" not in layer.state_dict()  # not saved with the model
            lean = layer(x)
        assert lean.dtype == dtype and lean.shape == exact.shape
        scale = exact.abs().max().item()
        torch.testing.assert_close(lean.float(), exact, atol=tolerance * scale, rtol=0)
        with torch.no_grad():
            torch.testing.assert_close(lean.float(), layer(x).float(), atol=tolerance * scale, rtol=0)  # the training path
    model = nn.Sequential(layer)
    with sampling_copies(model), pytest.raises(RuntimeError, match="torch.no_grad"):
        layer(x)  # gradients would not reach A and B
    assert not layer.sampling  # the training path again on exit, after an error too
    address = layer.sampling_B.data_ptr()
    with torch.no_grad():
        layer.lora_B.zero_()  # an optimiser step: the next block copies the new B
        with sampling_copies(model):
            torch.testing.assert_close(layer(x), layer.base(x))
    assert layer.sampling_B.data_ptr() == address  # refilled in place: a CUDA graph reads the same buffer
    with sampling_copies(model), pytest.raises(RuntimeError, match="already active"):
        with sampling_copies(model):
            pass


def test_sampling_copies_give_the_same_completions(checkpoint_dir):
    model = randomise_adapter(apply_lora(tiny_model(checkpoint_dir), rank=4, alpha=8))
    prompts = [[5, 9, 2, 7], [4, 11], [3]]
    sampling = dict(temperature=1.0, top_p=0.9, eos_token_id=[1], return_logprobs=True)
    plain = generate(model, prompts, 16, generator=torch.Generator().manual_seed(0), **sampling)
    with sampling_copies(model):
        lean = generate(model, prompts, 16, generator=torch.Generator().manual_seed(0), **sampling)
    assert torch.equal(plain[0], lean[0]) and torch.equal(plain[1], lean[1])
    torch.testing.assert_close(plain[2], lean[2], atol=1e-5, rtol=0)
    with disable_adapter(model):
        assert not torch.equal(generate(model, prompts, 16, generator=torch.Generator().manual_seed(0), **sampling)[0], plain[0])


def test_fresh_adapter_leaves_logits_unchanged(checkpoint_dir):
    model = tiny_model(checkpoint_dir)
    ids = input_ids()
    before = logits(model, ids)
    apply_lora(model, rank=4, alpha=8, dropout=0.05)
    assert len(lora_layers(model)) == 2 * len(TARGETS)
    assert not any(layer.training for layer in lora_layers(model).values())  # eval, as the model was
    assert torch.equal(logits(model, ids), before)


def test_unmatched_target_lists_the_linear_layers(checkpoint_dir):
    model = tiny_model(checkpoint_dir)
    with pytest.raises(ValueError, match="'qkv_proj' matches no linear layer") as error:
        apply_lora(model, rank=4, alpha=8, targets=("q_proj", "qkv_proj"))
    for name in TARGETS + ("lm_head",):
        assert repr(name) in str(error.value)


def test_apply_lora_on_meta_then_materialise(checkpoint_dir):
    with torch.device("meta"):
        model = Qwen3(Qwen3Config.from_json(checkpoint_dir / "config.json"))
    apply_lora(model, rank=4, alpha=8)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A.is_meta and layer.lora_A.shape == (4, 32) and layer.lora_B.shape == (32, 4)
    model.to_empty(device="cpu")
    for layer in lora_layers(model).values():
        layer.reset_parameters()
    assert layer.lora_A.abs().sum() > 0 and torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))


# Qwen3-1.7B-Base's config.json, the fields the model reads.
QWEN3_1_7B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)


def test_the_memory_plan_predicts_what_the_training_forward_keeps(monkeypatch):
    """memory.activation_profile's fit (1 and 2 layers, two lengths) predicts the bytes a 3-layer model keeps at a third
    length, with and without gradient checkpointing; the planned peak counts the model's own parameters; auto
    resolves to on exactly when the plan without checkpointing passes 90% of the device's memory."""
    import memory
    import train

    model_config = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    config, _, _ = train.parse_args(["--preset", "paper", "--rank", "8", "--max-prompt-tokens", "48", "--max-new-tokens", "40"])
    cpu = torch.device("cpu")
    profiles = {setting: memory.activation_profile(model_config, config, cpu, setting) for setting in (False, True)}
    for setting, profile in profiles.items():
        measured = memory.saved_activation_bytes(model_config, config, cpu, 3, setting, 2, 48, 40)
        predicted = profile["constant"] + profile["per_token"] * 2 * (48 + 40 - 1)
        assert predicted == pytest.approx(measured, rel=0.02), setting  # the shared attention bias grows as T x S: nearly linear
    assert profiles[True]["layer_per_token"] == pytest.approx(2 * 64, rel=0.05)  # checkpointed: each layer's bf16 input alone
    assert profiles[False]["layer_per_token"] > 10 * profiles[True]["layer_per_token"]
    with torch.device("meta"):
        model = apply_lora(Qwen3(model_config), rank=8, alpha=16)
    assert memory.lora_parameter_count(model_config, 8) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert memory.weight_count(model_config) == sum(p.numel() for p in model.parameters() if not p.requires_grad)
    without = memory.planned_peak(model_config, config, cpu, False, dict(profiles))
    assert without["weights"] == pytest.approx(2 * memory.weight_count(model_config) / 2**30)
    for available, expected in ((without["peak"] * 2**30 / 0.95, "on"), (without["peak"] * 2**30 / 0.8, "off")):
        monkeypatch.setattr(memory, "device_memory_bytes", lambda device: available)
        assert memory.resolve_gradient_checkpointing(model_config, config, cpu) == expected


@pytest.mark.parametrize("rank, expected", [(4, 4_358_144), (16, 17_432_576), (64, 69_730_304)])
def test_trainable_parameter_count_on_qwen3_1_7b(rank, expected):
    with torch.device("meta"):
        model = Qwen3(Qwen3Config(**QWEN3_1_7B))
    apply_lora(model, rank=rank, alpha=2 * rank)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert all(".lora_A" in name or ".lora_B" in name for name, _ in trainable)
    assert sum(p.numel() for _, p in trainable) == expected  # the paper's 4.36M / 17.4M / 69.7M


# ----------------------------------------------------------------------------------------------
# The switch


def test_disabled_adapter_gives_exact_base_logits(checkpoint_dir):
    model = tiny_model(checkpoint_dir)
    ids = input_ids()
    base = logits(model, ids)
    randomise_adapter(apply_lora(model, rank=4, alpha=8))
    adapted = logits(model, ids)
    assert (adapted - base).abs().max() > 1e-3
    with disable_adapter(model):
        assert torch.equal(logits(model, ids), base)
    assert torch.equal(logits(model, ids), adapted)


def test_disable_adapter_restores_after_an_exception(checkpoint_dir):
    model = randomise_adapter(apply_lora(tiny_model(checkpoint_dir), rank=4, alpha=8))
    ids = input_ids()
    adapted = logits(model, ids)
    with pytest.raises(KeyError):
        with disable_adapter(model):
            raise KeyError("boom")
    assert all(layer.enabled for layer in lora_layers(model).values())
    assert torch.equal(logits(model, ids), adapted)


def test_disable_adapter_nests(checkpoint_dir):
    model = tiny_model(checkpoint_dir)
    ids = input_ids()
    base = logits(model, ids)
    randomise_adapter(apply_lora(model, rank=4, alpha=8))
    adapted = logits(model, ids)
    with disable_adapter(model):
        with disable_adapter(model):
            assert torch.equal(logits(model, ids), base)
        assert torch.equal(logits(model, ids), base)  # the inner exit leaves the outer block disabled
    assert torch.equal(logits(model, ids), adapted)


# ----------------------------------------------------------------------------------------------
# Training, by its effect


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_one_step_moves_every_B_and_no_base_weight(checkpoint_dir, gradient_checkpointing):
    model = apply_lora(tiny_model(checkpoint_dir), rank=4, alpha=8).train()
    model.gradient_checkpointing = gradient_checkpointing
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-3)
    ids = input_ids()
    out = logits(model, ids[:, :-1])  # (B, T-1, V)
    F.cross_entropy(out.flatten(0, 1), ids[:, 1:].flatten()).backward()
    optimizer.step()
    for name, layer in lora_layers(model).items():
        assert (layer.lora_B != 0).all(), f"{name}.lora_B has entries still at zero"
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"{name} changed"
            assert p.grad is None, f"{name} got a gradient"
    assert len(trainable) == 2 * len(lora_layers(model))


# ----------------------------------------------------------------------------------------------
# Merging


def test_merge_matches_unmerged_and_unmerge_restores_the_base(checkpoint_dir):
    model = randomise_adapter(apply_lora(tiny_model(checkpoint_dir), rank=4, alpha=8))
    ids = input_ids()
    unmerged = logits(model, ids)
    weights = {name: layer.base.weight.detach().clone() for name, layer in lora_layers(model).items()}
    merge_adapter(model)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="unmerge_adapter"):
        with disable_adapter(model):
            pass
    with pytest.raises(RuntimeError, match="unmerge_adapter"):
        logits(model.train(), ids)
    with pytest.raises(RuntimeError, match="already merged"):
        merge_adapter(model)
    unmerge_adapter(model.eval())
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.base.weight, weights[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# PEFT's format, with PEFT as the oracle


def readme_snippet(heading):
    """The first ```python block after `heading` in README.md."""
    text = (REPO / "README.md").read_text()
    return text[text.index(heading):].split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_snippet_computes_arca_as_the_step_does(checkpoint_dir, tmp_path):
    """README's "ARCA in your own loop", read out of the file and run on transformers + PEFT: its weights and loss
    equal this project's (our Qwen3 and LoRA, the same adapter) and its gradient reaches the adapter."""
    code = readme_snippet("## ARCA in your own loop")
    assert len([line for line in code.splitlines() if line.strip()]) <= 15
    reference = get_peft_model(transformers.Qwen3ForCausalLM.from_pretrained(checkpoint_dir),
                               LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), lora_dropout=0.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3)  # a trained adapter: ARCA's weights are not uniform
    reference.save_pretrained(tmp_path / "adapter")
    prompts = [[5, 9, 2, 7], [4, 11, 6, 3]]
    completions, mask = torch.tensor([[7, 8, 9, 1], [3, 4, 1, 1]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]).bool()
    advantages = torch.tensor([1.0, -1.0])
    names = dict(model=reference, input_ids=torch.cat([torch.tensor(prompts), completions], dim=1), P=4, mask=mask,
                 attention_mask=torch.ones(2, 8, dtype=torch.long), advantages=advantages)
    exec(code, names)

    ours = apply_lora(tiny_model(checkpoint_dir), rank=4, alpha=8)
    load_adapter(ours, tmp_path / "adapter")
    with torch.no_grad():
        logprobs, _, h_adapted = grpo.completion_forward(ours, prompts, completions, mask)
        with disable_adapter(ours):
            h_base = grpo.completion_hidden(ours, prompts, completions, mask)
    weights = token_weights(arca_scores(h_adapted, h_base), mask, power=2.0)
    assert weights.max() > 0.4  # not uniform: the check below can fail
    torch.testing.assert_close(names["weights"], weights, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(names["loss"], grpo.policy_loss(logprobs, advantages, weights, 2), atol=1e-5, rtol=1e-4)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in reference.named_parameters() if "lora_B" in n)


def test_peft_loads_our_adapter(checkpoint_dir, tmp_path):
    model = randomise_adapter(apply_lora(tiny_model(checkpoint_dir), rank=4, alpha=8))
    ids = input_ids()
    ours = logits(model, ids)
    save_adapter(model, tmp_path, base_model_name_or_path=str(checkpoint_dir))
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in load_file(tmp_path / "adapter_model.safetensors")

    with disable_adapter(model):
        assert (ours - logits(model, ids)).abs().max() > 1e-2  # the adapter matters

    peft_model = PeftModel.from_pretrained(hf_model(checkpoint_dir), tmp_path).eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    print(f"PEFT loading our adapter: max |logit difference| = {(theirs - ours).abs().max():.3e}")
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)

    reloaded = load_adapter(apply_lora(tiny_model(checkpoint_dir), rank=4, alpha=8), tmp_path)
    assert torch.equal(logits(reloaded, ids), ours)


def test_we_load_a_peft_adapter(checkpoint_dir, tmp_path):
    peft_model = get_peft_model(hf_model(checkpoint_dir), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                   target_modules=list(TARGETS), task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    peft_model.save_pretrained(tmp_path)
    ids = input_ids()
    with torch.no_grad():
        theirs = peft_model.eval()(ids).logits
        with peft_model.disable_adapter():
            assert (theirs - peft_model(ids).logits).abs().max() > 1e-2  # the adapter matters

    model = load_adapter(apply_lora(tiny_model(checkpoint_dir), rank=4, alpha=8), tmp_path)
    ours = logits(model, ids)
    print(f"our load_adapter on PEFT's adapter: max |logit difference| = {(theirs - ours).abs().max():.3e}")
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_load_adapter_errors_name_what_differs(checkpoint_dir, tmp_path):
    save_adapter(apply_lora(tiny_model(checkpoint_dir), rank=4, alpha=8), tmp_path, "tiny")
    with pytest.raises(ValueError, match="r is 4 in the adapter, but the model has 8"):
        load_adapter(apply_lora(tiny_model(checkpoint_dir), rank=8, alpha=8), tmp_path)
    with pytest.raises(ValueError, match="target_modules is .* in the adapter, but the model has \\['q_proj', 'v_proj'\\]"):
        load_adapter(apply_lora(tiny_model(checkpoint_dir), rank=4, alpha=8, targets=("q_proj", "v_proj")), tmp_path)

    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors[key] = torch.zeros(4, 31)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=f"{key} has shape \\(4, 31\\), but the model expects \\(4, 32\\)"):
        load_adapter(apply_lora(tiny_model(checkpoint_dir), rank=4, alpha=8), tmp_path)

    del tensors[key]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=f"missing \\['{key}'\\]"):
        load_adapter(apply_lora(tiny_model(checkpoint_dir), rank=4, alpha=8), tmp_path)


# ================================================================================================
# credit.py

def full_mask(B, T):
    return torch.ones(B, T, dtype=torch.bool)


def lengths_mask(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)


# ----------------------------------------------------------------------------
# Diagnostics, hand-computed (README, The method (4))

def test_uniform_weights_have_gini_0_and_effn_1():
    w = torch.full((1, 7), 1 / 7)
    assert gini(w, full_mask(1, 7)).item() == pytest.approx(0.0, abs=1e-6)
    assert effective_token_ratio(w, full_mask(1, 7)).item() == pytest.approx(1.0, abs=1e-6)


def test_gini_never_negative_at_uniform():
    # in float32 the sum (2i - T - 1) / T over uniform weights rounds to about -1e-8 for many T
    lengths = list(range(1, 65))
    mask = lengths_mask(lengths, 64)
    w = mask / mask.sum(dim=1, keepdim=True)  # (64, 64) uniform on each row's valid tokens
    assert (gini(w, mask) >= 0).all()


def test_one_hot_weights_have_gini_t_minus_1_over_t_and_effn_1_over_t():
    T = 5
    w = torch.zeros(1, T)
    w[0, 2] = 1.0
    assert gini(w, full_mask(1, T)).item() == pytest.approx((T - 1) / T, abs=1e-6)
    assert effective_token_ratio(w, full_mask(1, T)).item() == pytest.approx(1 / T, abs=1e-6)
    assert top_mass(w, full_mask(1, T)).item() == pytest.approx(1.0, abs=1e-6)


def test_weights_proportional_to_1234():
    w = torch.tensor([[3.0, 1.0, 4.0, 2.0]]) / 10
    assert gini(w, full_mask(1, 4)).item() == pytest.approx(0.25, abs=1e-6)
    assert effective_token_ratio(w, full_mask(1, 4)).item() == pytest.approx(1 / (4 * 0.30), abs=1e-6)
    assert top_mass(w, full_mask(1, 4)).item() == pytest.approx(0.4, abs=1e-6)  # ceil(0.4) = 1 token


def test_top_mass_takes_ceil_of_ten_percent():
    assert top_mass(torch.full((1, 30), 1 / 30), full_mask(1, 30)).item() == pytest.approx(0.1, abs=1e-6)
    # 7% of 100 is 7 tokens even though 0.07 * 100 = 7.000000000000001 in float64
    uniform_100 = torch.full((1, 100), 1 / 100)
    assert top_mass(uniform_100, full_mask(1, 100), fraction=0.07).item() == pytest.approx(0.07, abs=1e-6)
    assert top_mass(torch.full((1, 15), 1 / 15), full_mask(1, 15)).item() == pytest.approx(2 / 15, abs=1e-6)
    assert top_mass(torch.full((1, 3), 1 / 3), full_mask(1, 3)).item() == pytest.approx(1 / 3, abs=1e-6)


def test_diagnostics_are_permutation_and_scale_invariant():
    g = torch.Generator().manual_seed(0)
    w = torch.rand(4, 12, generator=g) ** 3  # (4, 12) uneven weights
    mask = full_mask(4, 12)
    perm = torch.randperm(12, generator=g)
    for f in (gini, effective_token_ratio, top_mass):
        ref = f(w, mask)
        assert not torch.allclose(ref, ref[:1].expand(4))  # the rows differ: the check has teeth
        torch.testing.assert_close(f(w[:, perm], mask), ref)
        torch.testing.assert_close(f(7.3 * w, mask), ref)


def test_padding_changes_nothing():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(1, 6, generator=g)  # (1, 6)
    padded = torch.cat([scores, torch.tensor([[float("nan"), float("inf"), 1e30, -5.0]])], dim=1)  # (1, 10)
    mask = lengths_mask([6], 10)
    for power in (1.0, 2.0):
        w = token_weights(scores, full_mask(1, 6), power=power)
        w_padded = token_weights(padded, mask, power=power)
        torch.testing.assert_close(w_padded[:, :6], w)
        assert torch.equal(w_padded[:, 6:], torch.zeros(1, 4))
    # diagnostics ignore whatever sits on padding
    garbage = torch.cat([w, torch.tensor([[0.9, 0.0, 3.0, 0.5]])], dim=1)  # (1, 10)
    for f in (gini, effective_token_ratio, top_mass):
        torch.testing.assert_close(f(garbage, mask), f(w, full_mask(1, 6)))


# ----------------------------------------------------------------------------
# token_weights (README, The method (2))

def test_token_weights_hand_values():
    scores = torch.tensor([[1.0, 3.0, 9.9]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(token_weights(scores, mask, power=1.0), torch.tensor([[0.25, 0.75, 0.0]]))
    torch.testing.assert_close(token_weights(scores, mask, power=2.0), torch.tensor([[0.1, 0.9, 0.0]]))


def test_token_weights_add_eps_before_the_power():
    mask = full_mask(1, 2)
    # README, The method (2): (alpha + eps)^p; with eps 1, p 2: (0 + 1)^2 : (1 + 1)^2 = 1 : 4 (eps after the power: 1 : 2)
    torch.testing.assert_close(token_weights(torch.tensor([[0.0, 1.0]]), mask, eps=1.0, power=2.0), torch.tensor([[0.2, 0.8]]))
    torch.testing.assert_close(token_weights(torch.tensor([[1.0, 3.0]]), mask, eps=1.0, power=1.0), torch.tensor([[1 / 3, 2 / 3]]))


def test_token_weights_sum_to_one_on_every_valid_row():
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(5, 9, generator=g) * 10  # (5, 9)
    mask = lengths_mask([9, 4, 1, 0, 7], 9)
    for power in (1.0, 2.0):
        w = token_weights(scores, mask, power=power)
        assert w.dtype == torch.float32
        torch.testing.assert_close(w.sum(dim=1), torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0]))
        assert (w >= 0).all() and torch.equal(w[~mask], torch.zeros(int((~mask).sum())))


def test_token_weights_fall_back_to_uniform_when_scores_vanish():
    mask = lengths_mask([4, 2], 5)
    expected = torch.tensor([[0.25] * 4 + [0.0], [0.5, 0.5, 0.0, 0.0, 0.0]])
    for eps in (1e-8, 0.0):
        for power in (1.0, 2.0):
            torch.testing.assert_close(token_weights(torch.zeros(2, 5), mask, eps=eps, power=power), expected)


def test_token_weights_no_nan_or_inf_on_empty_rows_zero_and_huge_scores():
    scores = torch.tensor([
        [0.0, 0.0, 0.0],
        [1e30, 1e30, 0.0],  # (1e30)^2 overflows float32 without the row-max normalisation
        [float("inf"), 1.0, 2.0],  # a -log p of -inf
        [5.0, 5.0, 5.0],  # no valid token
    ])
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 1], [0, 0, 0]])
    for eps in (1e-8, 0.0):
        for power in (1.0, 2.0):
            w = token_weights(scores, mask, eps=eps, power=power)
            assert torch.isfinite(w).all()
            torch.testing.assert_close(w[1], torch.tensor([0.5, 0.5, 0.0]))
            torch.testing.assert_close(w[2], torch.tensor([1.0, 0.0, 0.0]))
            assert torch.equal(w[3], torch.zeros(3))


def test_token_weights_are_detached():
    scores = torch.rand(2, 3, requires_grad=True)
    assert not token_weights(scores * 2, full_mask(2, 3)).requires_grad


# ----------------------------------------------------------------------------
# Raw scores (README, The method (3))

def test_arca_scores_zero_for_equal_states_and_hand_norm():
    h = torch.randn(2, 3, 4)
    assert torch.equal(arca_scores(h, h.clone()), torch.zeros(2, 3))
    h_base = torch.zeros(1, 2, 2)
    h_adapted = torch.tensor([[[3.0, 4.0], [1.0, -1.0]]])
    torch.testing.assert_close(arca_scores(h_adapted, h_base), torch.tensor([[5.0, math.sqrt(2)]]))


def test_arca_scores_in_fp32_from_bf16():
    # both are exact in bf16, their difference 257.0078125 is not (bf16 keeps 8 significant bits)
    h_adapted = torch.tensor([[[1.0078125]]], dtype=torch.bfloat16)
    h_base = torch.tensor([[[-256.0]]], dtype=torch.bfloat16)
    scores = arca_scores(h_adapted, h_base)
    assert scores.dtype == torch.float32
    assert scores.item() == 257.0078125


def test_entropy_reduction_hand_values_last_valid_token_gets_zero():
    entropies = torch.tensor([
        [2.0, 1.5, 1.7, 0.2, 0.0],  # padding after the last valid token: 0.2 - 0.0 would be 0.2
        [1.0, 3.0, 0.5, 2.0, 0.25],  # no padding
        [9.0, float("nan"), 0.0, 0.0, 0.0],
    ])
    mask = lengths_mask([4, 5, 1], 5)
    expected = torch.tensor([
        [0.5, 0.0, 1.5, 0.0, 0.0],
        [0.0, 2.5, 0.0, 1.75, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0],
    ])
    assert torch.equal(entropy_reduction_scores(entropies, mask), expected)


def test_surprisal_and_divergence_hand_values():
    logp = torch.tensor([[-0.5, -2.0, 0.0]])
    ref = torch.tensor([[-1.0, -1.0, -3.0]])
    assert torch.equal(surprisal_scores(logp), torch.tensor([[0.5, 2.0, 0.0]]))
    assert torch.equal(divergence_scores(logp, ref), torch.tensor([[0.5, 1.0, 3.0]]))
    assert torch.equal(uniform_scores(torch.tensor([[1, 1, 0]])), torch.tensor([[1.0, 1.0, 0.0]]))


def test_credit_scores_dispatches_and_names_valid_methods():
    g = torch.Generator().manual_seed(3)
    mask = lengths_mask([3, 2], 3)
    logp, ref, ent = (-torch.rand(2, 3, generator=g) for _ in range(3))
    h_a, h_b = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    inputs = dict(token_logprobs=logp, entropies=ent, ref_token_logprobs=ref, h_adapted=h_a, h_base=h_b)
    assert torch.equal(credit_scores("uniform", mask, **inputs), uniform_scores(mask))
    assert torch.equal(credit_scores("surprisal", mask, **inputs), surprisal_scores(logp))
    assert torch.equal(credit_scores("entropy", mask, **inputs), entropy_reduction_scores(ent, mask))
    assert torch.equal(credit_scores("divergence", mask, **inputs), divergence_scores(logp, ref))
    assert torch.equal(credit_scores("arca", mask, **inputs), arca_scores(h_a, h_b))
    with pytest.raises(ValueError, match="uniform, surprisal, entropy, divergence, arca"):
        credit_scores("ARCA", mask, **inputs)
    with pytest.raises(ValueError, match="h_base"):
        credit_scores("arca", mask, h_adapted=h_a)


def test_arca_shuffled_moves_arcas_own_weights_to_random_tokens():
    """The control for "non-uniform by the right amount": each row's weights are exactly ARCA's, sorted alike, on
    a uniformly random permutation of its valid tokens; padding stays 0; a row's permutation depends on its seed and
    length alone, not on the batch's padding width; another seed, another permutation."""
    from credit import credit_weights, shuffle_within_rows

    torch.manual_seed(0)
    h_adapted, h_base = torch.randn(3, 9, 16), torch.randn(3, 9, 16)
    mask = lengths_mask([9, 5, 1], 9)
    arca = credit_weights("arca", mask, power=2.0, h_adapted=h_adapted, h_base=h_base)
    shuffled = credit_weights("arca-shuffled", mask, power=2.0, shuffle_seeds=[11, 12, 13], h_adapted=h_adapted, h_base=h_base)
    for row in range(3):
        assert torch.equal(shuffled[row].sort().values, arca[row].sort().values)  # the same numbers, bit for bit
    assert (shuffled[~mask] == 0).all() and not torch.equal(shuffled[0], arca[0])
    assert torch.equal(gini(shuffled, mask), gini(arca, mask)) and torch.equal(top_mass(shuffled, mask), top_mass(arca, mask))
    narrow = shuffle_within_rows(arca[1:2, :5], mask[1:2, :5], [12])  # the same row, trimmed to its length
    assert torch.equal(narrow[0], shuffled[1, :5])
    assert not torch.equal(shuffle_within_rows(arca[:1], mask[:1], [99]), shuffled[:1])
    counts = {}
    for seed in range(3000):  # 3 valid tokens: each of the 6 orders about 1/6 of the time
        order = tuple(shuffle_within_rows(torch.tensor([[1.0, 2.0, 3.0, 0.0]]), lengths_mask([3], 4), [seed])[0].tolist())
        counts[order] = counts.get(order, 0) + 1
    assert len(counts) == 6 and all(400 < n < 600 for n in counts.values()), counts


def test_entropy_top20_puts_equal_weight_on_the_highest_entropy_fifth():
    """1/k on the k = ceil(0.2 T) highest-entropy valid tokens, a tie to the earlier position, exact zeros elsewhere
    (the per-completion variant of the high-entropy-minority rule)."""
    from credit import credit_weights

    entropies = torch.tensor([[0.5, 2.0, 1.0, 2.0, 0.1, 9.0], [3.0, 1.0, 3.0, 3.0, 0.2, 0.1], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    mask = lengths_mask([5, 6, 0], 6)  # T 5 -> k 1; T 6 -> k 2; an empty row
    weights = credit_weights("entropy-top20", mask, entropies=entropies)
    assert weights.tolist() == [[0, 1, 0, 0, 0, 0], [0.5, 0, 0.5, 0, 0, 0], [0] * 6]  # padding's 9.0 is never chosen
    assert weights[:2].sum(dim=1).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="needs entropies"):
        credit_weights("entropy-top20", mask)


def test_credit_diagnostics_leaves_out_rows_without_tokens():
    w = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 0.0]])
    d = credit_diagnostics(w, lengths_mask([4, 0], 4))
    assert set(d) == {"weight_gini", "effective_token_ratio", "top10_mass"}
    assert d["weight_gini"] == pytest.approx(0.0, abs=1e-6)
    assert d["effective_token_ratio"] == pytest.approx(1.0, abs=1e-6)  # 0.5 if the empty row counted
    assert d["top10_mass"] == pytest.approx(0.25, abs=1e-6)


# ----------------------------------------------------------------------------
# Viewer

def test_credit_html_escapes_tokens_and_shades_uniform_neutral():
    tokens = ["The", " answer", "<script>alert(1)</script>", " is"]
    page = credit_html(tokens, {"uniform": torch.full((4,), 0.25), "one-hot": torch.tensor([0.0, 0.0, 1.0, 0.0])})
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    uniform_row, one_hot_row = page.split("<h3>")[1:]
    assert "Gini 0.000" in uniform_row and "EffN/T 1.000" in uniform_row
    assert "Gini 0.750" in one_hot_row and "EffN/T 0.250" in one_hot_row
    assert set(re.findall(r"rgba\([^)]*, ([0-9.]+)\)", uniform_row)) == {"0.000"}  # uniform: no shade
    assert 'rgba(220, 50, 40, 1.000)" title="w = 1' in one_hot_row  # all the weight: full red
    with pytest.raises(ValueError, match="3 weights for 4 tokens"):
        credit_html(tokens, {"short": torch.ones(3) / 3})


def test_credit_page_explains_itself():
    tokens = ["\\boxed{", "1", "7", "3", "}"]
    weights = {"uniform": torch.full((5,), 0.2), "arca": torch.tensor([0.05, 0.1, 0.6, 0.2, 0.05])}
    facts = {"problem": "82+91=", "gold answer": "173", "reward (symbolic)": "1", "advantage (grpo)": "+1.500"}
    page = credit_page("token credit: runs/x, step 20", [credit_section(tokens, weights, facts)], 5)
    assert "<h1>token credit: runs/x, step 20</h1>" in page
    for text in ("82+91=", "173", "reward (symbolic)", "+1.500", "weight scale (T = 5 tokens)", "1/T (uniform)"):
        assert text in page, text
    assert "top: \u201c7\u201d 0.600, \u201c3\u201d 0.200, \u201c1\u201d 0.100" in page  # the numbers as text, not only colour
    assert page.count('class="tok"') == 2 * 5 + 5  # every token in its own box (2 methods), plus the 5 legend cells


# ----------------------------------------------------------------------------
# With a real model and lora.py

def test_arca_weights_uniform_for_fresh_adapter_and_not_after_perturbing_b():
    from lora import apply_lora, disable_adapter
    from model import Qwen3, Qwen3Config

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = apply_lora(Qwen3(config), rank=4, alpha=8).eval()
    input_ids = torch.randint(0, config.vocab_size, (3, 12))  # (B, T)
    mask = lengths_mask([12, 9, 5], 12)  # (B, T)

    def arca_weights():
        with torch.no_grad():
            h_adapted = model(input_ids)  # (B, T, hidden)
            with disable_adapter(model):
                h_base = model(input_ids)  # (B, T, hidden)
        return token_weights(arca_scores(h_adapted, h_base), mask, power=2.0)  # (B, T)

    uniform = mask / mask.sum(dim=1, keepdim=True)  # (B, T)
    assert torch.equal(arca_weights(), uniform.float())  # B = 0: every score is exactly 0

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.05)
    w = arca_weights()
    torch.testing.assert_close(w.sum(dim=1), torch.ones(3))
    assert not torch.allclose(w, uniform.float(), atol=1e-3)
    g = gini(w, mask)  # (B,)
    assert ((g > 0.01) & (g < 0.99)).all(), g


# ================================================================================================
# grpo.py: advantages, loss, KL, one step

import grpo
from grpo import group_advantages, k3_kl, pack_sequences, policy_loss


def test_group_advantages_hand_values():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    index = torch.arange(3).repeat_interleave(4)
    grpo_adv = group_advantages(rewards, index, "grpo")
    s = 0.5 / (1 / 3) ** 0.5  # (1 - 0.5) / sample std of [1, 0, 0, 1]
    torch.testing.assert_close(grpo_adv[:4], torch.tensor([s, -s, -s, s]))
    assert grpo_adv[4:8].tolist() == [0.0] * 4  # zero spread: 0, not NaN
    # [0, 0, 0, 1]: mean 0.25, sample std 0.5 (population std 0.433 would give [-0.577, ..., 1.732])
    torch.testing.assert_close(grpo_adv[8:], torch.tensor([-0.5, -0.5, -0.5, 1.5]))
    rloo = group_advantages(rewards, index, "rloo")
    torch.testing.assert_close(rloo[:4], torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    torch.testing.assert_close(rloo[8:], torch.tensor([-1 / 3, -1 / 3, -1 / 3, 1.0]))
    for adv in (grpo_adv, rloo):
        assert torch.isfinite(adv).all()
        torch.testing.assert_close(adv.view(3, 4).sum(1), torch.zeros(3), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="at least 2 completions"):
        group_advantages(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1]))


def test_pack_sequences_layout():
    ids, mask, P = pack_sequences([[5, 6], [7]], torch.tensor([[8, 1], [9, 1]]), torch.tensor([[1, 1], [1, 0]]))
    assert ids.tolist() == [[5, 6, 8, 1], [0, 7, 9, 1]]
    assert mask.int().tolist() == [[1, 1, 1, 1], [0, 1, 1, 0]] and P == 2


def test_policy_loss_and_gradient_hand_values():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, 0.0]], requires_grad=True)
    weights = torch.tensor([[0.2, 0.3, 0.5], [0.5, 0.5, 0.0]])  # row 2 has 2 valid tokens
    advantages = torch.tensor([1.5, -0.5])
    N = 4  # completions in the whole optimiser step (two more live in other micro-batches)
    loss = policy_loss(logprobs, advantages, weights, N)
    # -(1/4) [1.5 (0.2*-1 + 0.3*-2 + 0.5*-3) + -0.5 (0.5*-0.5 + 0.5*-1.5)] = -(1/4) [-3.45 + 0.5] = 0.7375
    assert abs(loss.item() - 0.7375) < 1e-6
    loss.backward()
    expected = -advantages[:, None] * weights / N  # d loss / d logp_it = -A_i w_it / N
    torch.testing.assert_close(logprobs.grad, expected)


def test_clipped_loss_equals_plain_with_one_update():
    logprobs = torch.randn(3, 5, requires_grad=True)
    weights = torch.softmax(torch.randn(3, 5), -1)
    advantages = torch.tensor([1.0, -2.0, 0.5])
    plain_grad = torch.autograd.grad(policy_loss(logprobs, advantages, weights, 3), logprobs)[0]
    clipped = policy_loss(logprobs, advantages, weights, 3, old_logprobs=logprobs.detach())  # ratio 1
    clipped_grad = torch.autograd.grad(clipped, logprobs)[0]
    torch.testing.assert_close(clipped_grad, plain_grad)
    # the clip does bite once the ratio leaves [1 - eps, 1 + eps] in the direction of the advantage
    far = policy_loss(logprobs, advantages, weights, 3, old_logprobs=logprobs.detach() - 1.0)
    assert not torch.allclose(torch.autograd.grad(far, logprobs)[0], plain_grad)


def test_k3_kl_hand_value():
    mask = torch.ones(1, 1, dtype=torch.bool)
    # r = ref - logp = -2 - (-1) = -1: exp(-1) + 1 - 1 = 0.3679 (the reversed ratio gives e - 2 = 0.7183)
    assert k3_kl(torch.tensor([[-1.0]]), torch.tensor([[-2.0]]), mask, 1).item() == pytest.approx(math.exp(-1), abs=1e-6)
    two = torch.tensor([[-1.0, -3.0, 0.0]]), torch.tensor([[-2.0, -3.0, 5.0]]), torch.tensor([[1, 1, 0]]).bool()
    assert k3_kl(*two, 2).item() == pytest.approx(math.exp(-1) / 2 / 2, abs=1e-6)  # mean over 2 valid tokens, over N = 2


def test_clipped_surrogate_takes_the_minimum():
    weights = torch.ones(1, 1)
    logprobs, old = torch.tensor([[0.0]], requires_grad=True), torch.tensor([[-1.0]])  # ratio e
    # A = 1: min(e * 1, clip(e, 0.8, 1.2) * 1) = 1.2 (max would give e); loss = -1.2, no gradient through the clip
    loss = policy_loss(logprobs, torch.tensor([1.0]), weights, 1, old_logprobs=old, clip_eps=0.2)
    assert loss.item() == pytest.approx(-1.2)
    assert torch.autograd.grad(loss, logprobs)[0].item() == 0.0
    # A = -1: min(-e, -1.2) = -e, loss e, gradient -(-e) = e through the ratio
    loss = policy_loss(logprobs, torch.tensor([-1.0]), weights, 1, old_logprobs=old, clip_eps=0.2)
    assert loss.item() == pytest.approx(math.e)
    assert torch.autograd.grad(loss, logprobs)[0].item() == pytest.approx(math.e)


def test_k3_kl_nonnegative_and_zero_when_equal():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).bool()
    logprobs = torch.randn(2, 4)
    assert k3_kl(logprobs, logprobs, mask, 2).item() == 0.0
    for _ in range(5):
        assert k3_kl(logprobs, torch.randn(2, 4), mask, 2).item() > 0


def micro_batch_stats(model, prompts, tokens, mask, advantages, config, num_completions, diagnose_all=False, fidelity=False):
    """One micro-batch trained (grpo.train_micro_batch), and its statistics read to the host as grpo_step reads them."""
    signals, weights, loss, kl = grpo.train_micro_batch(model, prompts, tokens, mask, advantages, config, num_completions)
    stats = grpo.micro_batch_statistics(model, prompts, tokens, mask.bool(), signals["token_logprobs"], signals, weights, loss, kl, config,
                                        diagnose_all, fidelity)
    return grpo.read_statistics(stats, torch.zeros(())), signals["token_logprobs"]


class StepConfig:
    """The fields of train.TrainConfig that one GRPO step reads."""

    def __init__(self, **overrides):
        self.__dict__.update(dict(
            group_size=4, max_new_tokens=6, temperature=1.0, top_p=1.0, top_k=0, credit_eos=True, diagnose_all=False, arca_precision="bf16", compile=False, advantage="grpo", prompts_per_micro_batch=1,
            updates_per_batch=1, credit="arca", credit_eps=1e-8, power=2.0, clip_eps=0.2, beta=0.0, grad_clip=1.0,
        ), **overrides)


def lora_tiny_model(directory, rank=4, seed=0):
    model = Qwen3.from_pretrained(directory, dtype=torch.float32)
    torch.manual_seed(seed)
    return apply_lora(model, rank=rank, alpha=2 * rank)


def test_reference_pass_with_fresh_adapter_gives_uniform_arca_zero_kl(tiny_checkpoint):
    model = lora_tiny_model(tiny_checkpoint[0])
    prompts = [[5, 9, 2], [4, 11]]
    tokens, mask = torch.tensor([[7, 8, 9, 1], [3, 4, 1, 1]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]).bool()
    weights = grpo.all_method_weights(model, prompts, tokens, mask, power=2.0)
    torch.testing.assert_close(weights["arca"], mask / mask.sum(1, keepdim=True))  # step 0: uniform
    assert not torch.allclose(weights["surprisal"], weights["arca"])
    model.train()
    with torch.no_grad():
        logprobs, _, _ = grpo.completion_forward(model, prompts, tokens, mask)
        with disable_adapter(model):
            ref_logprobs, _, _ = grpo.completion_forward(model, prompts, tokens, mask)
    assert k3_kl(logprobs, ref_logprobs, mask, 2).item() == 0.0  # fresh adapter: policy == reference


def test_micro_batches_give_the_full_batch_gradient(tiny_checkpoint):
    prompts = [[5, 9, 2], [4, 11], [6], [7, 7, 7]]
    tokens = torch.tensor([[7, 8, 9, 1], [3, 4, 1, 1], [5, 5, 5, 5], [9, 1, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]).bool()
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    grads = []
    for per_micro_batch in (4, 1):
        model = lora_tiny_model(tiny_checkpoint[0])
        with torch.no_grad():
            for layer in model.modules():
                if hasattr(layer, "lora_B"):
                    layer.lora_B.normal_(0, 0.1)  # a trained adapter, so ARCA's weights are not uniform
        model.train()
        for start in range(0, 4, per_micro_batch):
            rows = slice(start, start + per_micro_batch)
            grpo.train_micro_batch(model, prompts[rows], tokens[rows], mask[rows], advantages[rows], StepConfig(), 4)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_micro_batch_without_completion_tokens_does_not_crash(tiny_checkpoint):
    model = lora_tiny_model(tiny_checkpoint[0]).train()
    tokens, mask = torch.tensor([[1, 1]]), torch.zeros(1, 2, dtype=torch.bool)
    for credit in ("uniform", "surprisal", "entropy", "divergence", "arca"):
        stats, _ = micro_batch_stats(model, [[5, 9]], tokens, mask, torch.tensor([1.0]), StepConfig(credit=credit, beta=0.1), 4)
        assert stats["loss"] == 0.0 and stats["rows"] == 0


def perturbed_lora_model(directory, seed=0):
    """A LoRA model whose adapter changes the output (B random), dropout 0, in train mode."""
    return randomise_adapter(lora_tiny_model(directory), seed).train()


STEP_BATCH = dict(
    prompts=[[5, 9, 2], [4, 11]],
    tokens=torch.tensor([[7, 8, 9, 1], [3, 4, 1, 1]]),
    mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]).bool(),
    advantages=torch.tensor([1.0, -1.0]),
)


def test_reference_pass_switches_the_adapter_off(tiny_checkpoint):
    """ARCA's h_base and the KL's pi_ref must come from the base model: checked against a model loaded without LoRA."""
    b = STEP_BATCH
    model = perturbed_lora_model(tiny_checkpoint[0])
    stats, _ = micro_batch_stats(model, b["prompts"], b["tokens"], b["mask"], b["advantages"], StepConfig(credit="arca", beta=0.1), 2)
    base_model = Qwen3.from_pretrained(tiny_checkpoint[0], dtype=torch.float32)  # the oracle: no adapter at all
    with torch.no_grad():
        logprobs, _, h_adapted = grpo.completion_forward(model, b["prompts"], b["tokens"], b["mask"])
        ref_logprobs, _, h_base = grpo.completion_forward(base_model, b["prompts"], b["tokens"], b["mask"])
    expected_norms = arca_scores(h_adapted, h_base)[b["mask"]]  # (valid tokens,)
    expected_kl = k3_kl(logprobs, ref_logprobs, b["mask"], 2).item()
    assert expected_norms.sum() > 1.0 and expected_kl > 1e-3  # the adapter matters: with it on, both would be 0
    assert stats["arca_norm_sum"] == pytest.approx(expected_norms.sum().item(), rel=1e-5)
    assert stats["arca_norm_max"] == pytest.approx(expected_norms.max().item(), rel=1e-5)
    assert stats["kl"] == pytest.approx(expected_kl, rel=1e-4)


def lora_gradient(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def test_beta_adds_the_kl_gradient(tiny_checkpoint):
    b = STEP_BATCH
    grads = {}
    for beta in (0.0, 1.0):
        model = perturbed_lora_model(tiny_checkpoint[0])
        grpo.train_micro_batch(model, b["prompts"], b["tokens"], b["mask"], b["advantages"], StepConfig(credit="uniform", beta=beta), 2)
        grads[beta] = lora_gradient(model)
    model = perturbed_lora_model(tiny_checkpoint[0])  # the KL term's gradient alone, by autograd
    logprobs, _, _ = grpo.completion_forward(model, b["prompts"], b["tokens"], b["mask"])
    with torch.no_grad(), disable_adapter(model):
        ref_logprobs, _, _ = grpo.completion_forward(model, b["prompts"], b["tokens"], b["mask"])
    k3_kl(logprobs, ref_logprobs, b["mask"], 2).backward()
    kl_grad = lora_gradient(model)
    assert kl_grad.abs().sum() > 1e-3
    torch.testing.assert_close(grads[1.0] - grads[0.0], kl_grad, atol=1e-6, rtol=1e-4)


def eos_rollout():
    """Two completions: one stops on EOS (id 1) at its third token, one is truncated at 4 tokens."""
    tokens = torch.tensor([[7, 8, 1, 1], [3, 4, 5, 6]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    return grpo.Rollout([[5, 9, 2], [4, 11]], torch.tensor([0, 0]), tokens, mask, torch.zeros(2, 4), grpo.eos_positions(tokens, mask, 1), [0, 1])


def test_eos_positions_are_read_at_the_last_valid_token():
    rollout = eos_rollout()
    assert rollout.ends_with_eos.tolist() == [True, False]
    # a completion whose EOS falls in the last slot stopped; it is not truncated
    assert grpo.eos_positions(torch.tensor([[3, 4, 5, 1]]), torch.ones(1, 4, dtype=torch.bool), 1).tolist() == [True]
    assert grpo.eos_positions(torch.tensor([[3, 1, 1]]), torch.ones(1, 3, dtype=torch.bool), []).tolist() == [False]


def test_no_credit_eos_leaves_eos_out_of_weights_and_gradient(tiny_checkpoint):
    rollout = eos_rollout()
    with_eos, without_eos = grpo.loss_mask(rollout, True), grpo.loss_mask(rollout, False)
    assert torch.equal(with_eos, rollout.mask)
    assert without_eos.tolist() == [[True, True, False, False], [True, True, True, True]]  # the truncated row is unchanged
    weights = token_weights(torch.rand(2, 4), without_eos)
    assert weights[0, 2] == 0 and weights.sum(dim=1).tolist() == pytest.approx([1.0, 1.0])

    def gradient(eos_id, mask, credit="surprisal"):  # the EOS slot holds eos_id; its log-prob changes with it
        model = perturbed_lora_model(tiny_checkpoint[0])
        tokens = rollout.tokens.clone()
        tokens[0, 2] = eos_id
        grpo.train_micro_batch(model, rollout.prompts, tokens, mask, torch.tensor([1.0, -1.0]), StepConfig(credit=credit, beta=0.1), 2)
        return lora_gradient(model)

    assert torch.equal(gradient(1, without_eos), gradient(12, without_eos))
    assert not torch.allclose(gradient(1, with_eos), gradient(12, with_eos))  # the test can fail


def test_every_signal_is_diagnosed_on_the_same_completions(tiny_checkpoint):
    b = STEP_BATCH
    model = perturbed_lora_model(tiny_checkpoint[0])
    config = StepConfig(credit="uniform")
    stats, _ = micro_batch_stats(model, b["prompts"], b["tokens"], b["mask"], b["advantages"], config, 2)
    assert {"gini/uniform", "gini/surprisal", "gini/entropy"} <= set(stats) and "gini/arca" not in stats  # no adapter-off pass ran
    stats, _ = micro_batch_stats(model, b["prompts"], b["tokens"], b["mask"], b["advantages"], config, 2, diagnose_all=True)
    oracle = grpo.all_method_weights(model, b["prompts"], b["tokens"], b["mask"], power=2.0)  # eval mode, its own passes
    model.train()
    for method, weights in oracle.items():
        expected = credit_diagnostics(weights, b["mask"])
        assert stats[f"gini/{method}"] / stats["rows"] == pytest.approx(expected["weight_gini"], abs=1e-5), method
        assert stats[f"effective_token_ratio/{method}"] / stats["rows"] == pytest.approx(expected["effective_token_ratio"], abs=1e-5)
        assert stats[f"top10_mass/{method}"] / stats["rows"] == pytest.approx(expected["top10_mass"], abs=1e-5)
    assert stats["gini/arca"] > 0.01 and stats["gini/uniform"] == 0.0  # the adapter shows in ARCA's weights


def bf16_and_rounded_fp32_models(directory, b_scale, seed=0):
    """The same LoRA model twice: bf16 base weights, and fp32 holding exactly those bf16 values."""
    models = []
    for dtype in (torch.bfloat16, torch.float32):
        model = Qwen3.from_pretrained(directory, dtype=dtype)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.bfloat16().to(dtype))
        torch.manual_seed(seed)
        apply_lora(model, rank=4, alpha=8)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.copy_(b_scale * torch.randn(layer.lora_B.shape, generator=generator))
        models.append(model.train())
    return models


def exact_arca_oracle(model, prompts, tokens, mask):
    """||h_adapted - h_base|| per valid token on an fp32 model, eval mode."""
    model.eval()
    with torch.no_grad():
        h_adapted = grpo.completion_hidden(model, prompts, tokens, mask)
        with disable_adapter(model):
            h_base = grpo.completion_hidden(model, prompts, tokens, mask)
    model.train()
    return arca_scores(h_adapted, h_base)[mask]


def test_exact_arca_equals_an_fp32_model_where_bf16_is_off(tiny_checkpoint):
    b = STEP_BATCH
    bf16_model, fp32_model = bf16_and_rounded_fp32_models(tiny_checkpoint[0], b_scale=1e-4)
    expected = exact_arca_oracle(fp32_model, b["prompts"], b["tokens"], b["mask"])  # (valid tokens,)
    stats = {}
    for precision in ("exact", "bf16"):
        config = StepConfig(credit="arca", arca_precision=precision)
        stats[precision], _ = micro_batch_stats(bf16_model, b["prompts"], b["tokens"], b["mask"], b["advantages"], config, 2, fidelity=True)
    assert stats["exact"]["arca_norm_sum"] == pytest.approx(expected.sum().item(), rel=1e-5)
    assert stats["exact"]["arca_norm_max"] == pytest.approx(expected.max().item(), rel=1e-5)
    assert abs(stats["bf16"]["arca_norm_sum"] / expected.sum().item() - 1) > 0.5  # bf16 mostly measures rounding here
    assert stats["exact"]["arca_exact_corr"] == pytest.approx(1.0, abs=1e-6)
    assert stats["bf16"]["arca_exact_corr"] < 0.9 and stats["bf16"]["arca_floor_ratio"] > 1.5
    assert stats["exact"]["arca_floor_ratio"] == pytest.approx(stats["bf16"]["arca_floor_ratio"], rel=0.05)  # the same figure


def test_exact_and_bf16_arca_are_zero_and_uniform_at_b_zero(tiny_checkpoint):
    b = STEP_BATCH
    bf16_model, _ = bf16_and_rounded_fp32_models(tiny_checkpoint[0], b_scale=0.0)
    for precision in ("exact", "bf16"):
        config = StepConfig(credit="arca", arca_precision=precision)
        stats, _ = micro_batch_stats(bf16_model, b["prompts"], b["tokens"], b["mask"], b["advantages"], config, 2)
        assert stats["arca_norm_sum"] == 0.0 and stats["arca_norm_max"] == 0.0
        assert stats["weight_gini"] == 0.0 and stats["effective_token_ratio"] == pytest.approx(2.0)  # 2 rows, each EffN/T 1


def test_exact_arca_keeps_the_kl_and_divergence_on_the_bf16_pair(tiny_checkpoint):
    """--arca-precision exact with bf16 weights: at B = 0 the KL is exactly 0 and divergence's weights uniform (the
    policy and reference passes differ by the adapter alone), and with beta > 0 the KL still has its gradient."""
    b = STEP_BATCH
    bf16_model, _ = bf16_and_rounded_fp32_models(tiny_checkpoint[0], b_scale=0.0)
    for credit in ("arca", "divergence"):
        config = StepConfig(credit=credit, arca_precision="exact", beta=0.1)
        stats, _ = micro_batch_stats(bf16_model, b["prompts"], b["tokens"], b["mask"], b["advantages"], config, 2, diagnose_all=True)
        assert stats["kl"] == 0.0 and stats["gini/divergence"] / stats["rows"] < 1e-6 and stats["arca_norm_sum"] == 0.0, credit
    grads = {}  # on the fp32 twin, where a gradient difference is not bf16 noise: the same code path
    for beta in (0.0, 1.0):
        _, model = bf16_and_rounded_fp32_models(tiny_checkpoint[0], b_scale=1e-2)
        grpo.train_micro_batch(model, b["prompts"], b["tokens"], b["mask"], b["advantages"], StepConfig(credit="arca", arca_precision="exact", beta=beta), 2)
        grads[beta] = lora_gradient(model)
    _, model = bf16_and_rounded_fp32_models(tiny_checkpoint[0], b_scale=1e-2)  # the KL term's gradient alone, by autograd
    logprobs, _, _ = grpo.completion_forward(model, b["prompts"], b["tokens"], b["mask"])
    with torch.no_grad(), disable_adapter(model):
        ref_logprobs, _, _ = grpo.completion_forward(model, b["prompts"], b["tokens"], b["mask"])
    k3_kl(logprobs, ref_logprobs, b["mask"], 2).backward()
    assert lora_gradient(model).abs().sum() > 1e-4
    torch.testing.assert_close(grads[1.0] - grads[0.0], lora_gradient(model), atol=1e-5, rtol=1e-3)


# ------------------------------------------------------------------------------------------------
# The GPU, faithfully on a CPU: another device for the no-grad code, a dispatch mode for a whole step

from torch.utils._python_dispatch import TorchDispatchMode

HOST_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default, torch.ops.aten.nonzero.default)


def tensor_arguments(args, kwargs):
    return [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]


class DeviceChecks(TorchDispatchMode):
    """Fails on an op whose tensors are on different devices (a 0-d CPU tensor excepted, as CUDA takes it) and records
    each host read (.item(), bool(), int(): aten._local_scalar_dense or is_nonzero; nonzero; a copy to the CPU) under
    the label in self.phase. A read of a tensor made from host copies alone (self.host) is not one. With stub_reads
    (tensors without values), a read returns False for a bool, else `stub`."""

    def __init__(self, stub_reads=False, stub=0):
        super().__init__()
        self.stub_reads, self.stub, self.phase, self.reads, self.host = stub_reads, stub, "step", [], set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = tensor_arguments(args, kwargs)
        devices = {t.device for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
        copy_to_host = func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default) and (
            kwargs.get("device", tensors[0].device).type == "cpu") and any(t.device.type != "cpu" for t in tensors)
        if len(devices) > 1 and not copy_to_host and func is not torch.ops.aten.copy_.default:
            raise AssertionError(f"{func} mixes devices {sorted(map(str, devices))}")
        on_host = bool(tensors) and all(t.untyped_storage().data_ptr() in self.host for t in tensors)
        if (func in HOST_READS and not on_host) or copy_to_host:
            self.reads.append(self.phase)
            if self.stub_reads and func is not torch.ops.aten.nonzero.default:
                return False if tensors[0].dtype == torch.bool else self.stub
        result = func(*args, **kwargs)
        if on_host:  # a tensor made from host tensors alone is on the host too
            self.host.update(t.untyped_storage().data_ptr() for t in tensor_arguments(result, {}))
        return result


def test_generation_and_the_credit_passes_never_mix_devices_and_read_the_device_when_said():
    """generate, the training forward without grad, the adapter-off and exact passes and every credit method, on a
    model on the meta device: like a GPU it is not the CPU (a tensor made without device= would mix and fail) and its
    tensors have no values (every read of one to the host is seen, and stubbed). generate reads the device once every
    8 decode steps (have all rows stopped?) and once at the end (the longest completion); the credit passes never.
    (FakeTensorMode's CUDA tensors would do, but a CPU build cannot index them: its indexing bindings take a CUDA
    device guard before any mode runs.)"""
    config = Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    with torch.device("meta"):
        model = apply_lora(Qwen3(config), rank=4, alpha=8)
    with DeviceChecks(stub_reads=True, stub=17) as checks:
        with sampling_copies(model):
            sampled = generate(model, [[5, 9, 2], [4, 11]], 17, temperature=1.0, top_p=0.9, top_k=20, eos_token_id=[1],
                               samples_per_prompt=4, return_logprobs=True)
            generate(model, [[5, 9, 2], [4, 11]], 17, temperature=0.0, top_p=1.0, eos_token_id=[1])
        assert all(t.device.type == "meta" for t in sampled) and len(checks.reads) == 2 * (2 + 1)  # steps 8 and 16, the end
        checks.reads.clear()
        tokens, mask = sampled[0], sampled[1]
        prompts = [[5, 9, 2]] * 4 + [[4, 11]] * 4
        with torch.no_grad():
            logprobs, entropies, hidden = grpo.completion_forward(model, prompts, tokens, mask)
            for precision in ("bf16", "exact"):
                signals = grpo.credit_signals(model, prompts, tokens, mask, logprobs, entropies, hidden,
                                              StepConfig(credit="arca", beta=0.1, arca_precision=precision))
                for method in ("uniform", "surprisal", "entropy", "divergence", "arca"):
                    weights = token_weights(credit_scores(method, mask, **signals), mask, power=2.0)
                    assert weights.device.type == "meta" and diagnostic_sums(weights, mask).device.type == "meta"
                assert grpo.k3_kl(logprobs, signals["ref_token_logprobs"], mask, 8).device.type == "meta"
            grpo.all_method_weights(model, prompts, tokens, mask, power=2.0)
        assert checks.reads == []  # the credit passes never wait for the device
    with pytest.raises(AssertionError, match="mixes devices"), DeviceChecks():  # the check can fail
        torch.ones(3, device="meta") + torch.ones(3)


def test_a_grpo_step_reads_the_device_a_known_number_of_times(tiny_checkpoint, monkeypatch):
    """One whole grpo_step on real CPU tensors under DeviceChecks (and .cpu() and .tolist() counted): per decode step
    one read every 8 steps, per micro-batch none, per update one (its statistics and the grad norm together), and per
    step a copy of the completions to the host and two in the advantages. The optimiser's own (CPU step counters) aside."""
    model = lora_tiny_model(tiny_checkpoint[0])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    checks = DeviceChecks()

    def labelled(owner, name, phase):
        real = getattr(owner, name)

        def run(*args, **kwargs):
            outer, checks.phase = checks.phase, phase
            try:
                return real(*args, **kwargs)
            finally:
                checks.phase = outer
        monkeypatch.setattr(owner, name, run)

    labelled(grpo, "generate", "decode")
    labelled(grpo, "train_micro_batch", "micro-batch")
    labelled(grpo, "micro_batch_statistics", "micro-batch")
    labelled(grpo, "read_statistics", "update")
    labelled(optimizer, "step", "optimiser")
    real_cpu, real_tolist = torch.Tensor.cpu, torch.Tensor.tolist

    def cpu(tensor, *args, **kwargs):  # a copy to the host: a read; what is made from it stays on the host
        checks.reads.append(checks.phase)
        copy = real_cpu(tensor, *args, **kwargs)
        checks.host.add(copy.untyped_storage().data_ptr())
        return copy

    def tolist(tensor):
        if tensor.untyped_storage().data_ptr() not in checks.host:
            checks.reads.append(checks.phase)
        return real_tolist(tensor)

    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    config = StepConfig(credit="arca", beta=0.05, max_new_tokens=17, diagnose_all=True)  # 2 micro-batches of 1 prompt x 4
    with checks:
        grpo.grpo_step(model, optimizer, scheduler, [[5, 9, 2], [4, 11]], ["0", "0"], CharTokenizer(), reward_first_token_even,
                       config, torch.Generator().manual_seed(0))
    counts = {phase: checks.reads.count(phase) for phase in ("decode", "micro-batch", "update", "step")}
    assert counts == {"decode": 2 + 1, "micro-batch": 0, "update": 1, "step": 1 + 2}, checks.reads


class CharTokenizer:
    """The model.Tokenizer surface over single characters, for GRPO steps on the tiny checkpoint."""

    eos_token_id, pad_token_id, vocab_size = 1, 1, 40

    def decode(self, ids):
        return "".join("\\boxed{}0123456789"[i % 18] for i in ids)


def reward_first_token_even(texts, golds):
    return [float(len(t) > 0 and t[0] in "\\o{0") for t in texts], 0


def test_grpo_step_updates_lora_only_and_skips_non_finite(tiny_checkpoint):
    model = lora_tiny_model(tiny_checkpoint[0])
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    config = StepConfig(credit="arca", beta=0.05)
    g = torch.Generator().manual_seed(0)
    metrics, rollout, rewards = grpo.grpo_step(model, optimizer, scheduler, [[5, 9, 2], [4, 11]], ["0", "0"],
                                                CharTokenizer(), reward_first_token_even, config, g)
    assert rollout.tokens.shape[0] == 8 and rollout.prompt_index.tolist() == [0] * 4 + [1] * 4
    assert 0 < metrics["reward_mean"] < 1 and not metrics["skipped_update"]  # the seed gives a mixed group
    assert metrics["logprob_gap"] < 1e-5  # sampler and training forward agree (fp32, dropout 0)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert all((layer.lora_B != 0).any() for layer in model.modules() if hasattr(layer, "lora_B"))
    # a non-finite loss (here from a NaN reward) skips the update, leaves the adapter as it was, and says so
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    nan_rewards = lambda texts, golds: ([float("nan"), 1.0, 0.0, 1.0] * 2, 0)
    metrics, _, _ = grpo.grpo_step(model, optimizer, scheduler, [[5, 9, 2], [4, 11]], ["0", "0"],
                                   CharTokenizer(), nan_rewards, StepConfig(credit="uniform"), g)
    assert metrics["skipped_update"]
    assert all(torch.equal(a, b) for a, b in zip([p for p in model.parameters() if p.requires_grad], before))


# ================================================================================================
# train.py: the CLI, data, outputs, resume

import dataclasses
import shutil
import signal
import subprocess
import sys

import data
import train

CHARS = "0123456789+-=\\boxed{} "


@pytest.fixture(scope="module")
def char_run_setup(tmp_path_factory):
    """A tiny checkpoint with a character tokenizer, and addition problems as JSON lines."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    root = tmp_path_factory.mktemp("char")
    directory, _ = save_tiny_checkpoint(root / "model", vocab_size=48, eos_token_id=0, bos_token_id=0, pad_token_id=0)
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(dict.fromkeys(CHARS))}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.save(str(directory / "tokenizer.json"))
    rng = random.Random(0)
    for split, count in (("train", 64), ("test", 8)):
        with open(root / f"{split}.jsonl", "w") as handle:
            for _ in range(count):
                a, b = rng.randint(0, 9), rng.randint(0, 9)
                handle.write(json.dumps({"problem": f"{a}+{b}=", "answer": str(a + b)}) + "\n")
    return root


def run_args(root, out, *extra):
    return ["--preset", "demo", "--model", str(root / "model"), "--data", str(root / "train.jsonl"),
            "--eval-data", str(root / "test.jsonl"), "--out", str(out), "--group-size", "4",
            "--prompts-per-micro-batch", "1", "--micro-batches", "2", "--max-new-tokens", "6", "--eval-problems", "4",
            "--eval-batch-size", "16", "--pass-k", "2", "--rank", "4", "--lr", "5e-2", "--lora-dropout", "0.05", "--warmup-steps", "3",
            "--temperature", "1.0", *extra]


METRIC_FIELDS = {
    "step", "reward_mean", "reward_std", "zero_spread_groups", "loss", "kl", "logprob_gap", "completion_len", "truncated",
    "weight_gini", "effective_token_ratio", "top10_mass", "arca_norm_mean", "arca_norm_max", "grad_norm", "lr",
    "rollout_s", "reward_s", "train_s", "tokens_per_s", "peak_memory_gb", "entropy", "skipped_update",
    "arca_exact_corr", "arca_floor_ratio", "gini/uniform", "gini/arca", "effective_token_ratio/divergence", "top10_mass/entropy",
}


def parity_reward(texts, golds, config):
    """A reward a random model earns half the time (parity of the text's character codes), so updates are non-zero."""
    return [float(sum(map(ord, text)) % 2) for text in texts], 0


def test_three_step_run_writes_every_output(char_run_setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "score", parity_reward)
    out = tmp_path / "run"
    train.main(run_args(char_run_setup, out, "--steps", "3", "--eval-every", "2", "--save-every", "2", "--lora-dropout", "0"))
    assert "step 3/3: reward" in capsys.readouterr().out  # not a terminal: plain progress lines, no bar
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(METRIC_FIELDS <= set(m) for m in metrics)
    assert all(m["logprob_gap"] < 1e-5 for m in metrics)  # dropout 0, fp32: the sampler's log-probs are the trainer's
    assert [m["lr"] for m in metrics] == pytest.approx([0.0, 5e-2 / 3, 2 * 5e-2 / 3])  # the lr each step ran at (warm-up 3)
    # B = 0 until the first update at a non-zero lr (step 2's): ARCA is exactly 0 and uniform, then the adapter shows
    assert all(m["arca_norm_mean"] == 0.0 and m["weight_gini"] < 1e-6 for m in metrics[:2])
    assert metrics[2]["arca_norm_mean"] > 1e-4 and metrics[2]["weight_gini"] > 1e-3
    # fidelity at the evaluation steps (2, 3); fp32 and dropout 0: the credit that trains is the exact score
    assert metrics[0]["arca_exact_corr"] is None and metrics[2]["arca_exact_corr"] == pytest.approx(1.0, abs=1e-5)
    assert metrics[2]["arca_floor_ratio"] == pytest.approx(1.0, abs=1e-4)
    evals = json.loads((out / "eval.json").read_text())
    keys = {"greedy_accuracy", "pass@2", "greedy_accuracy_strict", "pass@2_strict", "greedy_accuracy_symbolic", "pass@2_symbolic"}
    assert [e["step"] for e in evals] == [0, 2, 3] and all(keys <= set(e) for e in evals)
    assert all(e["greedy_accuracy"] == e["greedy_accuracy_symbolic"] for e in evals)  # the demo preset trains on symbolic
    info = json.loads((out / "config.json").read_text())
    assert info["config"]["credit"] == "arca" and info["trainable_parameters"] > 0
    page = (out / "credit.html").read_text()
    assert all(method in page for method in ("uniform", "surprisal", "entropy", "divergence", "arca"))
    assert (out / "checkpoint" / "state.pt").exists()

    # the adapter moved and PEFT loads it onto transformers' model, giving our logits
    from safetensors.torch import load_file

    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)
    ours = Qwen3.from_pretrained(char_run_setup / "model", dtype=torch.float32)
    apply_lora(ours, rank=4, alpha=8)
    load_adapter(ours, out / "adapter")
    peft_model = PeftModel.from_pretrained(transformers.Qwen3ForCausalLM.from_pretrained(char_run_setup / "model"), out / "adapter").eval()
    ids = torch.tensor([[3, 11, 4, 13]])
    with torch.no_grad():
        torch.testing.assert_close(ours.eval().lm_head(ours(ids)), peft_model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)

    with pytest.raises(SystemExit, match="already holds a run"):  # a finished run is never overwritten
        train.main(run_args(char_run_setup, out, "--steps", "3"))
    with pytest.raises(SystemExit, match="credit: 'arca' -> 'uniform'"):  # resume refuses a different config
        train.main(run_args(char_run_setup, out, "--steps", "4", "--credit", "uniform", "--resume"))
    report = train.report([out])
    assert f"| `{out}` | arca | 4 |" in report and "Gini" in report and "pass@k strict" in report and "unfinished" not in report


KILLER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import train
train.score = lambda texts, golds, config: ([float(sum(map(ord, text)) % 2) for text in texts], 0)
real_step, calls = train.grpo_step, []
def step_then_die(*args, **kwargs):
    if len(calls) == 2:  # after step 2's checkpoint: die as hard as a machine can
        os.kill(os.getpid(), signal.SIGKILL)
    calls.append(1)
    return real_step(*args, **kwargs)
train.grpo_step = step_then_die
train.main(sys.argv[1:])
"""


def test_resume_after_sigkill_gives_the_identical_adapter(char_run_setup, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setattr(train, "score", parity_reward)

    common = ("--steps", "4", "--save-every", "2", "--eval-every", "4")
    train.main(run_args(char_run_setup, tmp_path / "straight", *common))
    killed = subprocess.run([sys.executable, "-c", KILLER.format(repo=str(Path(__file__).resolve().parent)),
                             *run_args(char_run_setup, tmp_path / "killed", *common)], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "killed" / "adapter").exists()
    train.main(run_args(char_run_setup, tmp_path / "killed", *common, "--resume"))
    straight = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert all(t.abs().sum() > 0 for k, t in straight.items() if "lora_B" in k)  # trained, not trivially equal
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


# ----------------------------------------------------------------------------------------------
# Durable runs: real signals to a real child process, real files on disk

FAULTS = """
import os, signal, sys, pathlib, shutil
import torch
sys.path.insert(0, {repo!r})
import grpo, train
plan = {plan!r}  # (hook, call number, what): what is a signal number, 'twice:<n>', 'kill' or 'raise'
calls = {{}}

def hit(hook):
    calls[hook] = calls.get(hook, 0) + 1
    if plan[0] != hook or calls[hook] != plan[1]:
        return
    what = plan[2]
    if what == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif what == "raise":
        raise RuntimeError("injected failure")
    elif str(what).startswith("twice:"):
        os.kill(os.getpid(), int(what[6:]))
        os.kill(os.getpid(), int(what[6:]))
    else:
        os.kill(os.getpid(), what)

def wrap(owner, name, hook):
    real = getattr(owner, name)
    def wrapped(*args, **kwargs):
        hit(hook)
        return real(*args, **kwargs)
    setattr(owner, name, wrapped)

parity = lambda texts, golds, *rest: ([float(sum(map(ord, text)) % 2) for text in texts], 0)
train.score = train.score_symbolic = lambda texts, golds, config: parity(texts, golds)
train.score_strict = parity
wrap(grpo, "sample_rollouts", "rollout")
wrap(train, "score", "reward")
wrap(train, "evaluate", "eval")
real_step = torch.optim.AdamW.step
def step_then_hit(self, *args, **kwargs):
    result = real_step(self, *args, **kwargs)
    hit("after_update")
    return result
torch.optim.AdamW.step = step_then_hit
real_save = train.save_checkpoint
def save(out, model, optimizer, scheduler, step, rng, config):
    if len(plan) < 4 or step != plan[3]:
        return real_save(out, model, optimizer, scheduler, step, rng, config)
    operations = ((shutil, "rmtree"), (pathlib.Path, "rename"), (pathlib.Path, "mkdir"), (torch, "save"), (os, "replace"))
    originals = [getattr(owner, name) for owner, name in operations]
    for owner, name in operations:  # inside this save only, each file operation is a point to die at
        wrap(owner, name, "swap")
    try:
        return real_save(out, model, optimizer, scheduler, step, rng, config)
    finally:
        for (owner, name), original in zip(operations, originals):
            setattr(owner, name, original)
train.save_checkpoint = save
train.main(sys.argv[1:])
"""


def start_child(setup, out, plan, *args):
    script = FAULTS.format(repo=str(REPO), plan=plan)
    return subprocess.Popen([sys.executable, "-c", script, *run_args(setup, out, *args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run_child(setup, out, plan, *args):
    child = start_child(setup, out, plan, *args)
    stdout, stderr = child.communicate(timeout=120)
    return subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)


def run_outputs(out):
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = json.loads((out / "eval.json").read_text())
    return adapter, [m["step"] for m in metrics], [(m["step"], m["reward_mean"], m["loss"]) for m in metrics], evals


def assert_same_run(a, b):
    adapter_a, steps_a, values_a, evals_a = run_outputs(a)
    adapter_b, steps_b, values_b, evals_b = run_outputs(b)
    assert adapter_a.keys() == adapter_b.keys() and all(torch.equal(adapter_a[k], adapter_b[k]) for k in adapter_a)
    assert steps_a == steps_b and values_a == values_b  # each step once, with the same rollouts
    assert evals_a == evals_b


PARITY = lambda texts, golds, *rest: ([float(sum(map(ord, text)) % 2) for text in texts], 0)
DURABLE = ("--steps", "4", "--save-every", "2", "--eval-every", "2")


@pytest.fixture(scope="module")
def straight_run(char_run_setup, tmp_path_factory):
    """The uninterrupted run the interrupted ones must equal (parity reward everywhere)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    result = run_child(char_run_setup, out, ("none", 0, 0), *DURABLE)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.mark.parametrize("plan, code, saved_step", [  # eval call 2 is step 2's (call 1 is step 0's)
    (("rollout", 3, int(signal.SIGINT)), 130, 3),  # Ctrl-C while step 3 samples: step 3 finishes and is saved
    (("reward", 3, int(signal.SIGTERM)), 143, 3),  # preemption while step 3 is scored
    (("after_update", 3, int(signal.SIGINT)), 130, 3),  # right after step 3's optimizer.step(): its update counts once
    (("eval", 2, int(signal.SIGTERM)), 143, 2),  # during step 2's evaluation
    (("rollout", 3, "twice:2"), 130, 2),  # two Ctrl-C: stop at once; the adapter had not moved, so step 2 is saved
    (("eval", 2, "twice:15"), 130, 2),  # two SIGTERMs during an evaluation: the evaluation is redone on resume
    (("reward", 3, "raise"), 1, 2),  # an error inside a step: the last finished step is saved
])
def test_stop_at_any_moment_then_resume_is_bit_identical(char_run_setup, straight_run, tmp_path, monkeypatch, plan, code, saved_step):
    out = tmp_path / "run"
    result = run_child(char_run_setup, out, plan, *DURABLE, "--save-every", "3")  # no periodic save before step 3
    assert result.returncode == code, result.stderr[-2000:]
    assert find_checkpoint_step(out) == saved_step
    assert not (out / "adapter").exists()
    monkeypatch.setattr(train, "score", lambda texts, golds, config: PARITY(texts, golds))
    monkeypatch.setattr(train, "score_symbolic", lambda texts, golds, config: PARITY(texts, golds))
    monkeypatch.setattr(train, "score_strict", PARITY)
    train.main(run_args(char_run_setup, out, *DURABLE, "--save-every", "3", "--resume"))
    assert_same_run(out, straight_run)


def find_checkpoint_step(out):
    return torch.load(train.find_checkpoint(out) / "state.pt", weights_only=True)["step"]


def test_kill_at_every_point_of_the_checkpoint_swap(char_run_setup, tmp_path, monkeypatch):
    args = ("--steps", "3", "--save-every", "1", "--eval-every", "3")
    straight = tmp_path / "straight"
    assert run_child(char_run_setup, straight, ("none", 0, 0), *args).returncode == 0
    monkeypatch.setattr(train, "score", lambda texts, golds, config: PARITY(texts, golds))
    monkeypatch.setattr(train, "score_symbolic", lambda texts, golds, config: PARITY(texts, golds))
    monkeypatch.setattr(train, "score_strict", PARITY)
    # The save of step 2 replaces step 1's checkpoint: die before each of its file operations (9: rmtree,
    # mkdir, the two adapter files, state.pt, rmtree, two renames, rmtree), one child per point, two at a time.
    codes, point = {}, 1
    while 0 not in codes.values():
        children = {p: start_child(char_run_setup, tmp_path / f"killed-{p}", ("swap", p, "kill", 2), *args) for p in (point, point + 1)}
        codes.update({p: (child.communicate(timeout=120), child.returncode)[1] for p, child in children.items()})
        point += 2
    killed = [p for p in sorted(codes) if codes[p] == -9]
    assert killed == list(range(1, len(killed) + 1)) and len(killed) >= 9, codes  # then, past the last one, the run finished
    for point in killed:
        out = tmp_path / f"killed-{point}"
        assert find_checkpoint_step(out) in (1, 2)
        train.main(run_args(char_run_setup, out, *args, "--resume"))  # resumes, and saves again (steps 2 and 3)
        assert_same_run(out, straight)
        assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]


def test_a_checkpoint_restores_its_rng_states_whatever_the_device(char_run_setup, tmp_path, monkeypatch):
    """load_state(path, device) keeps the RNG states as CPU byte tensors (torch.set_rng_state and a generator's
    set_state take nothing else); the optimiser's moments go to `device` (meta here, standing in for a GPU)."""
    monkeypatch.setattr(train, "score", parity_reward)
    out = tmp_path / "run"
    train.main(run_args(char_run_setup, out, "--steps", "2", "--save-every", "1"))
    state = train.load_state(train.find_checkpoint(out) / "state.pt", torch.device("meta"))
    rng = state["rng"][0]
    assert rng["torch"].device.type == "cpu" and rng["torch"].dtype == torch.uint8 and rng["sampler"].device.type == "cpu"
    generator = torch.Generator()
    train.set_rng_states(rng, generator)
    assert torch.equal(torch.get_rng_state(), rng["torch"]) and torch.equal(generator.get_state(), rng["sampler"])
    moments = [value for moment in state["optimizer"]["state"].values() for name, value in moment.items() if name != "step"]
    assert moments and all(value.device.type == "meta" for value in moments)


def test_resume_refuses_a_pickled_payload_and_runs_nothing(char_run_setup, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "score", parity_reward)
    out, marker = tmp_path / "run", tmp_path / "pwned"
    train.main(run_args(char_run_setup, out, "--steps", "2", "--save-every", "1"))
    torch.save({"evil": PickledPayload(str(marker))}, out / "checkpoint" / "state.pt")
    with pytest.raises(SystemExit, match=r"state\.pt: refused"):
        train.main(run_args(char_run_setup, out, "--steps", "3", "--save-every", "1", "--resume"))
    assert not marker.exists()


class PickledPayload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_users_directory_is_refused_and_left_untouched(char_run_setup, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "score", parity_reward)
    out = tmp_path / "mine"
    (out / "checkpoint").mkdir(parents=True)
    (out / "adapter").mkdir()
    files = {out / "checkpoint" / "important.bin": b"keep", out / "adapter" / "mine.bin": b"me", out / "eval.json": b"[1]"}
    for path, data in files.items():
        path.write_bytes(data)
    for extra in ((), ("--resume",)):
        with pytest.raises(SystemExit, match="not a run directory of this project"):
            train.main(run_args(char_run_setup, out, "--steps", "1", *extra))
    assert all(path.read_bytes() == data for path, data in files.items())
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoint", "eval.json"]


def test_a_run_that_died_before_its_first_checkpoint_starts_again(char_run_setup, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "score", parity_reward)
    out = tmp_path / "run"
    result = run_child(char_run_setup, out, ("rollout", 1, "kill"), "--steps", "2")
    assert result.returncode == -9 and (out / "config.json").exists() and train.find_checkpoint(out) is None
    (out / "notes.txt").write_text("mine")  # a file the user added stays
    train.main(run_args(char_run_setup, out, "--steps", "2"))
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (out / "notes.txt").read_text() == "mine" and (out / "adapter").is_dir()


def test_resume_drops_a_torn_metrics_line_and_ignores_how_out_is_spelled(char_run_setup, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "score", parity_reward)
    monkeypatch.chdir(tmp_path)
    train.main(run_args(char_run_setup, "run", "--steps", "2", "--save-every", "1"))
    with open(tmp_path / "run" / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3, "reward_me')  # the disk filled up mid-line
    train.main(run_args(char_run_setup, tmp_path / "run", "--steps", "3", "--save-every", "1", "--resume"))  # absolute now
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_resume_writes_the_adapter_a_finished_run_lacks(char_run_setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "score", parity_reward)
    out = tmp_path / "run"
    train.main(run_args(char_run_setup, out, "--steps", "2"))
    expected = load_file(out / "adapter" / "adapter_model.safetensors")
    shutil.rmtree(out / "adapter")  # killed between the last checkpoint and the adapter
    train.main(run_args(char_run_setup, out, "--steps", "2", "--resume"))
    assert "already finished" in capsys.readouterr().out
    resumed = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)


def test_non_finite_steps_do_not_advance_the_schedule_and_stop_the_run(char_run_setup, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "score", lambda texts, golds, config: ([float("nan")] * len(texts), 0))
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"3 steps in a row had a non-finite loss.*checkpoint at step 3"):
        train.main(run_args(char_run_setup, out, "--steps", "10", "--warmup-steps", "0", "--save-every", "9"))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_update"] for m in metrics] == [True] * 3
    assert [m["lr"] for m in metrics] == [5e-2] * 3  # the schedule counts updates, and none was made
    assert find_checkpoint_step(out) == 3


def test_bad_bytes_in_a_data_file_name_the_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"problem": "1+1", "answer": "2"}\n{"problem": "\xff", "answer": "1"}\n')
    with pytest.raises(ValueError, match=r"data\.jsonl:2: not UTF-8 \(byte 0xff at column 14\)"):
        data.read_problems(path)


@pytest.mark.parametrize("flag, value", [
    ("--eval-every", "0"), ("--save-every", "0"), ("--top-p", "0"), ("--top-p", "1.5"), ("--temperature", "-1"),
    ("--reward-timeout", "0"), ("--lr", "-1e-5"), ("--lr", "nan"), ("--top-k", "-1"), ("--lora-dropout", "1"), ("--rank", "0"),
    ("--group-size", "1"), ("--eval-problems", "0"), ("--grad-clip", "0"), ("--reward", "exact"), ("--credit", "random"),
])
def test_invalid_options_name_the_flag_and_the_range(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--preset", "demo", flag, value])
    assert exit_info.value.code == 2
    assert f"{flag} " in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# torchrun: data-parallel GRPO on 2 CPU processes (gloo)

TORCHRUN_ENTRY = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import grpo, train
parity = lambda texts, golds, *rest: ([float(sum(map(ord, text)) % 2) for text in texts], 0)
train.score = train.score_symbolic = lambda texts, golds, config: parity(texts, golds)
train.score_strict = parity
fault = {fault!r}  # (rank, rollout call number, 'raise' or 'kill') or None
calls = []
real_sample = grpo.sample_rollouts
def sample(*args, **kwargs):
    calls.append(1)
    if fault and int(os.environ["RANK"]) == fault[0] and len(calls) == fault[1]:
        if fault[2] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("injected failure on rank " + os.environ["RANK"])
    return real_sample(*args, **kwargs)
grpo.sample_rollouts = sample
if __name__ == "__main__":
    train.main(sys.argv[1:])
"""
TWO_RANKS = ("--steps", "3", "--save-every", "2", "--eval-every", "3", "--lora-dropout", "0", "--prompts-per-micro-batch", "2",
             "--micro-batches", "1")


def torchrun(setup, out, tmp_path, *args, processes=2, fault=None):
    entry = tmp_path / f"entry_{abs(hash(str(out)))}.py"
    entry.write_text(TORCHRUN_ENTRY.format(repo=str(REPO), fault=fault))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", str(entry),
               *run_args(setup, out, *args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def one_and_two_processes(char_run_setup, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ddp")
    two = torchrun(char_run_setup, tmp_path / "two", tmp_path, *TWO_RANKS)
    assert two.returncode == 0, two.stderr[-3000:]
    one = torchrun(char_run_setup, tmp_path / "one", tmp_path, *TWO_RANKS, processes=1)
    assert one.returncode == 0, one.stderr[-3000:]
    return tmp_path / "one", tmp_path / "two", tmp_path


def test_two_processes_make_the_one_process_run(one_and_two_processes):
    one, two, _ = one_and_two_processes
    adapter_one, adapter_two = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (one, two))
    assert all((adapter_one[k] - adapter_two[k]).abs().max() < 1e-5 for k in adapter_one)
    assert any(adapter_one[k].abs().sum() > 0 for k in adapter_one if "lora_B" in k)  # it trained
    metrics_one, metrics_two = ([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two))
    assert [m["reward_mean"] for m in metrics_one] == [m["reward_mean"] for m in metrics_two]  # the same completions
    assert [m["completion_len"] for m in metrics_one] == [m["completion_len"] for m in metrics_two]
    assert len({m["reward_mean"] for m in metrics_one}) > 1 or metrics_one[0]["reward_mean"] not in (0.0, 1.0)
    evals_one, evals_two = (json.loads((d / "eval.json").read_text()) for d in (one, two))
    assert [e["greedy_accuracy"] for e in evals_one] == [e["greedy_accuracy"] for e in evals_two]
    assert [e["pass@2"] for e in evals_one] == [e["pass@2"] for e in evals_two]  # per-problem seeds: sampling agrees too
    assert json.loads((two / "config.json").read_text())["processes"] == 2


def test_a_failing_rank_ends_every_process(char_run_setup, one_and_two_processes):
    _, _, tmp_path = one_and_two_processes
    started = time.perf_counter()
    result = torchrun(char_run_setup, tmp_path / "failing", tmp_path, *TWO_RANKS, fault=(1, 2, "raise"))
    assert result.returncode != 0 and time.perf_counter() - started < 120
    assert "injected failure on rank 1" in result.stderr


def test_a_killed_two_process_run_resumes_on_two_processes(char_run_setup, one_and_two_processes):
    _, two, tmp_path = one_and_two_processes
    out = tmp_path / "killed"
    killed = torchrun(char_run_setup, out, tmp_path, *TWO_RANKS, fault=(0, 3, "kill"))  # rank 0 dies in step 3, after step 2's save
    assert killed.returncode != 0 and find_checkpoint_step(out) == 2 and not (out / "adapter").exists()
    refused = torchrun(char_run_setup, out, tmp_path, *TWO_RANKS, "--resume", processes=1)
    assert refused.returncode != 0 and "trained on 2 process(es), this is 1" in refused.stdout + refused.stderr
    resumed = torchrun(char_run_setup, out, tmp_path, *TWO_RANKS, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    adapter, expected = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (out, two))
    assert all(torch.equal(adapter[k], expected[k]) for k in adapter)


def test_prompts_that_do_not_divide_among_the_processes_are_refused(char_run_setup, one_and_two_processes):
    _, _, tmp_path = one_and_two_processes
    result = torchrun(char_run_setup, tmp_path / "odd", tmp_path, *TWO_RANKS, "--prompts-per-micro-batch", "3")
    assert result.returncode != 0 and "3 prompts per step" in result.stdout + result.stderr and "among 2 processes" in result.stdout + result.stderr


def test_dry_run_of_the_paper_preset_prints_the_papers_settings(capsys):
    train.main(["--preset", "paper", "--dry-run"])
    config = json.loads(capsys.readouterr().out)
    expected = {  # the paper's settings (README, The paper's run)
        "model": "Qwen/Qwen3-1.7B-Base", "group_size": 4, "prompts_per_micro_batch": 2, "micro_batches": 4,
        "steps": 100, "lr": 5e-6, "warmup_steps": 10, "weight_decay": 0.0, "grad_clip": 1.0, "max_prompt_tokens": 512,
        "max_new_tokens": 512, "temperature": 1.0, "top_p": 0.95, "rank": 64, "lora_alpha": 128.0, "lora_dropout": 0.05,
        "power": 2.0, "credit_eps": 1e-8, "eval_problems": 200, "pass_k": 4, "save_every": 20, "seed": 1337,
        "credit": "arca", "advantage": "grpo", "beta": 0.0, "updates_per_batch": 1, "dtype": "bfloat16",
        # the reference code's protocol (README, This implementation and the reference code): prompt, strict reward, EOS out of the loss, top-k 50, first 200 rows
        "prompt_template": "Solve this math problem step by step. Put your final answer in \\boxed{{}}.\n\nProblem: {problem}\n",
        "reward": "strict", "credit_eos": False, "top_k": 50, "eval_sample": False,
    }
    assert {k: config[k] for k in expected} == expected
    train.main(["--preset", "paper", "--rank", "4", "--credit", "uniform", "--dry-run"])
    config = json.loads(capsys.readouterr().out)
    assert (config["rank"], config["lora_alpha"], config["credit"]) == (4, 8.0, "uniform")


def test_warm_up_and_cosine_equal_transformers_schedule():
    def lrs(make_scheduler, steps=30):
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = make_scheduler(optimizer)
        values = []
        for _ in range(steps + 1):
            values.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return values

    for warmup, total in ((10, 30), (3, 30), (0, 30)):
        ours = lrs(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, train.cosine_with_warmup(warmup, total)))
        theirs = lrs(lambda opt: transformers.get_cosine_schedule_with_warmup(opt, warmup, total))
        assert ours == pytest.approx(theirs, abs=1e-12)
    assert ours[0] == 1.0 and lrs(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, train.cosine_with_warmup(10, 30)))[:2] == [0.0, 0.1]


def test_first_eval_rows_in_file_order_or_a_seeded_sample(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps({"problem": f"p{i}", "answer": str(i)}) + "\n" for i in range(50)))
    rows, _ = data.read_problems(path)
    paper = dataclasses.replace(train.PAPER, eval_problems=5)
    assert [r["answer"] for r in data.select_eval_rows(rows, paper)] == ["0", "1", "2", "3", "4"]
    sample = data.select_eval_rows(rows, dataclasses.replace(paper, eval_sample=True))
    answers = [int(r["answer"]) for r in sample]
    assert len(answers) == 5 and answers == sorted(answers) and answers != [0, 1, 2, 3, 4]
    assert data.select_eval_rows(rows, dataclasses.replace(paper, eval_sample=True)) == sample  # fixed, whatever the run's seed


def test_report_and_plot_show_every_run_and_signal(char_run_setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "score", parity_reward)
    finished, unfinished = tmp_path / "finished", tmp_path / "unfinished"
    train.main(run_args(char_run_setup, finished, "--steps", "2", "--credit", "uniform"))
    train.main(run_args(char_run_setup, unfinished, "--steps", "2", "--save-every", "1"))
    shutil.rmtree(unfinished / "adapter")  # as if killed before the end
    report = train.report([finished, unfinished])
    assert f"| `{finished}` | uniform |" in report and f"| `{unfinished}` (unfinished) | arca |" in report
    signals = report.split("All seven signals")[1]
    assert signals.count("| uniform (trains) |") == 1 and signals.count("| arca (trains) |") == 1
    assert signals.count("| divergence | 0.") == 2  # measured in both runs, the uniform one included (--diagnose-all)
    pytest.importorskip("matplotlib")
    train.main(["--report", str(finished), str(unfinished), "--plot", str(tmp_path / "runs.png")])
    assert (tmp_path / "runs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_help_shows_each_default(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(paper 'strict', demo 'symbolic')" in text and "(default 1337)" in text and "(paper 50, demo 0)" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_paper_preset_without_cuda_says_what_to_run():
    with pytest.raises(SystemExit, match="--preset demo"):
        train.main(["--preset", "paper"])


def test_read_problems_reports_bad_lines_and_skips_empty_answers(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"problem": "1+1", "answer": "2"}, {"problem": "p", "solution": "so \\boxed{\\frac12}."},
            {"problem": "q", "answer": ""}, {"problem": "r", "solution": "no box"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    problems, skipped = data.read_problems(path)
    assert problems == [{"problem": "1+1", "answer": "2"}, {"problem": "p", "answer": "\\frac12"}] and skipped == 2
    path.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"data.jsonl:2: not valid JSON"):
        data.read_problems(path)
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"question": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"data.jsonl:2: expected an object with 'problem'.*\['question'\]"):
        data.read_problems(path)


# ------------------------------------------------------------------------------------------------
# Problems from the hub: no network, a hub cache laid out in a temporary folder or a hub on loopback

import hashlib
import http.server
import socket
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq


def parquet_bytes(rows):
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


def math_rows(split, count):
    """MATH-lighteval-like rows whose file order is not any sorted order; train has MATH's two empty boxes and a "Level ?"."""
    rows = [{"problem": f"{split} problem {(i * 7919) % count}", "level": f"Level {1 + i % 5}", "type": "Algebra",
             "solution": f"so \\boxed{{{(i * 7919) % count}}}"} for i in range(count)]
    if split == "train":
        rows[5]["solution"] = rows[9]["solution"] = "so \\boxed{}"
        rows[7]["level"] = "Level ?"
    return rows


def gsm8k_rows(count):
    return [{"question": f"question {i}", "answer": f"{i} + 1000 = {i + 1000:,}\n#### {i + 1000:,}"} for i in range(count)]


def lay_out_hub_cache(cache, dataset, files, revision=None):
    """files {path in the repo: bytes}, where huggingface_hub's cache keeps a dataset at a commit (a local hub cache)."""
    snapshot = cache / f"datasets--{dataset['id'].replace('/', '--')}" / "snapshots" / (revision or dataset["revision"])
    for name, content in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(content)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache and an empty ARCA_CACHE, for this process (huggingface_hub read HF_HUB_CACHE at import)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "arca")
    return tmp_path / "hub"


class LoopbackHub(http.server.ThreadingHTTPServer):
    """A Hugging Face hub on 127.0.0.1 for huggingface_hub's own client: it serves `files` {url path: bytes} at the
    revision in the path, answers other revisions as the hub does (`errors` {revision: (status, X-Error-Code)}) and
    logs every request."""

    def __init__(self, files, errors):
        self.files, self.errors, self.requests = files, errors, []

        class Handler(http.server.BaseHTTPRequestHandler):
            def answer(handler, body):
                self.requests.append((handler.command, handler.path))
                revision = next((r for r in self.errors if f"/{r}/" in handler.path), None)
                content = self.files.get(handler.path)
                status, code = self.errors[revision] if revision else (200, None) if content is not None else (404, "EntryNotFound")
                handler.send_response(status)
                if code:
                    handler.send_header("X-Error-Code", code)
                if status == 200:
                    handler.send_header("X-Repo-Commit", handler.path.split("/resolve/")[1].split("/")[0])
                    handler.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
                handler.send_header("Content-Length", str(len(content) if status == 200 else 0))
                handler.end_headers()
                if body and status == 200:
                    handler.wfile.write(content)

            def do_HEAD(handler):
                handler.answer(False)

            def do_GET(handler):
                handler.answer(True)

            def log_message(handler, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def file_requests(self):
        return [(method, path) for method, path in self.requests if "/resolve/" in path]


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LOAD_DATA = """
import json, sys, types
sys.path.insert(0, {repo!r})
import data
config = types.SimpleNamespace(task={task!r}, data=None, eval_data=None, data_revision=None, eval_set="test", eval_problems=200, seed=0)
train, held_out = data.load_data(config)
print(json.dumps({{"train": train, "eval": held_out}}))
"""


def load_in_a_child(env, task="math"):
    result = subprocess.run([sys.executable, "-c", LOAD_DATA.format(repo=str(REPO), task=task)], capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_a_hub_dataset_is_fetched_once_in_file_order_and_then_read_offline(tmp_path):
    lighteval = data.MATH_LIGHTEVAL
    base = f"/datasets/{lighteval['id']}/resolve/{lighteval['revision']}/"
    hub = LoopbackHub({base + lighteval["files"][split]: parquet_bytes(math_rows(split, lighteval["rows"][split]))
                       for split in ("train", "test")}, {})
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hub"), "ARCA_CACHE": str(tmp_path / "arca")}
    try:
        first = load_in_a_child(env)
    finally:
        hub.shutdown()
    fetched = hub.file_requests()
    assert sorted({path for _, path in fetched}) == sorted(base + lighteval["files"][s] for s in ("test", "train"))
    assert [method for method, _ in fetched].count("GET") == 2  # each file downloaded once
    # the file's own order, the two empty boxes skipped, and the cache names the dataset and revision
    expected = [row for row in math_rows("train", 7500) if row["solution"] != "so \\boxed{}"]
    assert [r["answer"] for r in first["train"]] == [row["solution"][10:-1] for row in expected] and len(first["train"]) == 7498
    assert [r["problem"] for r in first["eval"][:3]] == ["test problem 0", "test problem 2919", "test problem 838"]
    cache = tmp_path / "arca" / "datasets" / "DigitalLearningGmbH--MATH-lighteval" / lighteval["revision"]
    cached = [json.loads(line) for line in (cache / "train.jsonl").read_text().splitlines()]
    assert len(cached) == 7500 and cached[0] == {"problem": "train problem 0", "solution": "so \\boxed{0}", "subject": "Algebra", "level": 1}
    assert cached[7]["level"] is None and sorted(p.name for p in cache.iterdir()) == ["test.jsonl", "train.jsonl"]
    # a second run reads the cache: no hub at all (its address now refuses connections), the same rows
    assert load_in_a_child({**env, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}) == first
    assert hub.file_requests() == fetched


def test_a_bad_hub_file_names_the_file_and_what_was_expected(hub_cache, tmp_path):
    revisions = {name: f"{i}" * 40 for i, name in enumerate(("short", "column", "garbage", "gsm8k"), 1)}
    lighteval, test_file = data.MATH_LIGHTEVAL, data.MATH_LIGHTEVAL["files"]["test"]
    lay_out_hub_cache(hub_cache, lighteval, {test_file: parquet_bytes(math_rows("test", 4999))}, revisions["short"])
    rows = [{k: v for k, v in row.items() if k != "solution"} for row in math_rows("test", 5000)]
    lay_out_hub_cache(hub_cache, lighteval, {test_file: parquet_bytes(rows)}, revisions["column"])
    lay_out_hub_cache(hub_cache, lighteval, {test_file: b"<html>rate limited</html>"}, revisions["garbage"])
    rows = gsm8k_rows(1319)
    rows[41]["answer"] = "the answer is 3"
    lay_out_hub_cache(hub_cache, data.GSM8K, {data.GSM8K["files"]["test"]: parquet_bytes(rows)}, revisions["gsm8k"])
    with pytest.raises(SystemExit, match=r"test-00000-of-00001.parquet: 4,999 rows, expected 5,000 .*--data-revision"):
        data.cached_split("math", "test", revisions["short"])
    with pytest.raises(SystemExit, match=r"test-00000-of-00001.parquet: no column 'solution' .*expected \['problem', 'level', 'type', 'solution'\]"):
        data.cached_split("math", "test", revisions["column"])
    with pytest.raises(SystemExit, match=r"test-00000-of-00001.parquet: not a readable parquet file"):
        data.cached_split("math", "test", revisions["garbage"])
    with pytest.raises(SystemExit, match=r"row 42's answer has no '#### <number>' line: 'the answer is 3'"):
        data.cached_split("gsm8k", "test", revisions["gsm8k"])
    left = [p.name for p in (tmp_path / "arca").rglob("*") if p.is_file()]
    assert left == []  # nothing half-written in our cache


HUB_ERRORS = """
import json, sys
sys.path.insert(0, {repo!r})
import data
for revision in {revisions!r}:
    try:
        data.cached_split("math", "train", revision)
    except SystemExit as err:
        print(json.dumps(str(err)))
"""


def test_hub_errors_say_what_went_wrong_and_what_to_do(tmp_path):
    lighteval = data.MATH_LIGHTEVAL
    errors = {"1" * 40: (404, "RevisionNotFound"), "2" * 40: (403, "GatedRepo"), "3" * 40: (401, "RepoNotFound"), "4" * 40: (500, None)}
    hub = LoopbackHub({}, errors)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "ARCA_CACHE": str(tmp_path / "arca")}
    script = HUB_ERRORS.format(repo=str(REPO), revisions=[*errors, "5" * 40])
    cli = [sys.executable, "train.py", "--preset", "paper", "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "run")]
    started = time.monotonic()
    children = [subprocess.Popen([sys.executable, "-c", script], env={**env, "HF_ENDPOINT": hub.url}, cwd=REPO, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True),
                subprocess.Popen(cli, env={**env, "HF_HUB_OFFLINE": "1"}, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                subprocess.Popen(cli, env={**env, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}, cwd=REPO, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)]
    (statuses, _), (_, offline), (_, unreachable) = (child.communicate(timeout=60) for child in children)
    seconds = time.monotonic() - started
    hub.shutdown()
    messages = [json.loads(line) for line in statuses.splitlines()]
    where = f"could not fetch {lighteval['id']} (revision "
    assert all(m.startswith(where) and f"Hub cache: {tmp_path / 'hub'}" in m and "--data train.jsonl" in m for m in messages)
    assert "has no revision 1111111111111111111111111111111111111111; pass an existing commit" in messages[0]
    assert "is gated: accept its terms at https://huggingface.co/datasets/DigitalLearningGmbH/MATH-lighteval" in messages[1]
    assert "the hub refused DigitalLearningGmbH/MATH-lighteval: it does not exist, or it is private" in messages[2]
    assert f"the hub ({hub.url}) answered HTTP 500" in messages[3]
    assert "has no file data/train-00000-of-00001.parquet at revision 5555555555555555555555555555555555555555" in messages[4]
    # offline or unreachable: one message naming the dataset, its revision, the hub cache and the local-file alternative,
    # before the model is touched (no such model directory) and before anything is written
    for stderr, reason in ((offline, "HF_HUB_OFFLINE is set, and the file is not in the hub cache"),
                           (unreachable, "could not be reached (ConnectError")):
        assert f"could not fetch {lighteval['id']} (revision {lighteval['revision']}, file data/train-00000-of-00001.parquet)" in stderr
        assert reason in stderr and f"Hub cache: {tmp_path / 'hub'}" in stderr and '"problem" and an "answer"' in stderr
        assert "no-such-model" not in stderr and "Traceback" not in stderr, stderr[-2000:]
    assert not (tmp_path / "run").exists() and seconds < 30


def test_gsm8k_golds_and_both_rewards_follow_the_reference(hub_cache):
    from math_reward import gsm8k_answer, gsm8k_reward, gsm8k_strict_match

    cases = {"Final answer: 1234": 1.0, "\\boxed{1,234}": 1.0, "1000 + 234 = 1234.00": 1.0, "12340": 0.0, "no number at all": 0.0}
    for completion, expected in cases.items():
        assert gsm8k_strict_match(completion, "1234") == expected and gsm8k_reward(completion, "1234") == expected, completion
    assert gsm8k_strict_match("Final answer: 7, then 9 more", "7") == 1.0 and gsm8k_answer("3 apples, then 5") == "5"
    assert gsm8k_answer("\\boxed{12} so the answer is 5") == "12"  # a box wins over the final-answer pattern
    assert gsm8k_answer("so 2 + 2 = 4 and 1234") == "2"  # "so N" is a final-answer pattern of the reference's, as written
    assert gsm8k_strict_match("so 3/4", "0.75") == 1.0 and gsm8k_strict_match("\\boxed{\\frac{3}{4}}", "0.75") == 0.0
    assert gsm8k_reward("Final answer: $18.50", "18.5") == 1.0
    started = time.monotonic()
    assert gsm8k_strict_match("answer" + " " * 200_000 + "x" + "9" * 100_000, "1") == 0.0  # linear on hostile text
    assert time.monotonic() - started < 2
    assert data.gsm8k_gold("Natalia sold 48/2 = 24 clips.\n#### 1,234") == "1234" and data.gsm8k_gold("no marker") is None
    lay_out_hub_cache(hub_cache, data.GSM8K, {data.GSM8K["files"][s]: parquet_bytes(gsm8k_rows(n)) for s, n in (("train", 7473), ("test", 1319))})
    config, _, _ = train.parse_args(["--preset", "paper", "--task", "gsm8k"])
    train_rows, eval_rows = data.load_data(config)
    assert len(train_rows) == 7473 and len(eval_rows) == 1319
    assert eval_rows[1234] == {"problem": "question 1234", "answer": "2234"}
    assert config.prompt_template.format(problem="q").startswith("You are a careful math solver.") and config.out == "runs/paper-gsm8k-arca-r64"


@pytest.mark.skipif(not (SHARED_DATA / "math" / "test500.jsonl").exists(), reason="needs ../shared/data")
def test_math500_is_an_eval_set_of_its_own_rows_and_answers(hub_cache):
    math500 = (SHARED_DATA / "math" / "test500.jsonl").read_bytes()
    lay_out_hub_cache(hub_cache, data.MATH_500, {"test.jsonl": math500})
    lay_out_hub_cache(hub_cache, data.MATH_LIGHTEVAL, {data.MATH_LIGHTEVAL["files"]["train"]: parquet_bytes(math_rows("train", 7500))})
    config, _, _ = train.parse_args(["--preset", "paper", "--eval-set", "math500"])
    _, eval_rows = data.load_data(config)
    expected = [json.loads(line) for line in math500.decode().splitlines()]
    assert config.eval_problems == 500 and [(r["problem"], r["answer"]) for r in eval_rows] == [(r["problem"], r["answer"]) for r in expected]
    config, _, _ = train.parse_args(["--preset", "paper", "--eval-set", "math500", "--eval-problems", "50"])
    assert data.select_eval_rows(eval_rows, config) == eval_rows[:50]


def test_dry_run_names_the_datasets_their_revisions_and_the_eval_set(capsys):
    for args, train_data, eval_data in (
            ([], "DigitalLearningGmbH/MATH-lighteval@0530c78699ea5e8eb5530600900e1f328b48acad data/train-00000-of-00001.parquet",
             "DigitalLearningGmbH/MATH-lighteval@0530c78699ea5e8eb5530600900e1f328b48acad data/test-00000-of-00001.parquet"),
            (["--task", "gsm8k"], "openai/gsm8k@740312add88f781978c0658806c59bc2815b9866 main/train-00000-of-00001.parquet",
             "openai/gsm8k@740312add88f781978c0658806c59bc2815b9866 main/test-00000-of-00001.parquet"),
            (["--eval-set", "math500"], "DigitalLearningGmbH/MATH-lighteval@0530c78699ea5e8eb5530600900e1f328b48acad data/train-00000-of-00001.parquet",
             "HuggingFaceH4/MATH-500@6e4ed1a2a79af7d8630a6b768ec859cb5af4d3be test.jsonl")):
        train.main(["--preset", "paper", *args, "--dry-run"])
        sources = json.loads(capsys.readouterr().out)["data_sources"]
        assert (sources["train"], sources["eval"]) == (train_data, eval_data)
        assert sources["eval_set"] == ("math500" if "math500" in args else "test")
    with pytest.raises(SystemExit):
        train.parse_args(["--preset", "paper", "--task", "gsm8k", "--eval-set", "math500"])
    assert "--eval-set math500 is HuggingFaceH4/MATH-500" in capsys.readouterr().err


# ================================================================================================
# bench.py --quick


def test_bench_quick_prints_every_measurement():
    result = subprocess.run([sys.executable, "bench.py", "--quick"], cwd=REPO, capture_output=True, text=True, timeout=240,
                            env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    for line in lines:
        assert set(line) == {"what", "shape", "batch", "device", "ours", "reference", "ratio", "unit", "note"}
        assert line["shape"] in ("tiny", "precision") and line["device"].startswith("cpu")
    kinds = {line["what"] for line in lines}
    assert kinds >= {"rollout", "train_step", "train_peak_memory", "sampler_trainer_gap", "grpo_step_checkpointed",
                     "grpo_step_arca_over_uniform_beta0", "grpo_step_arca_over_uniform_beta0.04",
                     "grpo_update_arca_over_uniform_beta0", "grpo_update_arca_over_uniform_beta0.04", "grpo_update_diagnose_all_over_off",
                     "grpo_update_arca_exact_over_bf16", "grpo_step_arca_exact_over_bf16_peak_memory", "arca_bf16_vs_exact_s0.0001",
                     "prefill_k4_shared_over_repeated"}
    precision = {line["what"]: line["ours"] for line in lines if line["shape"] == "precision"}
    assert precision["arca_bf16_vs_exact_s0.01"] > precision["arca_bf16_vs_exact_s0.0001"]  # bf16 tracks a large adapter better
    rollouts = [line for line in lines if line["what"] == "rollout"]
    assert sorted(line["batch"] for line in rollouts) == [1, 16, 64]
    for line in rollouts + [line for line in lines if line["what"].startswith(("train_step", "grpo_step_arca"))]:
        assert line["ours"] > 0 and line["reference"] > 0
        assert line["ratio"] == pytest.approx(line["ours"] / line["reference"])
    kernels = {line["what"].removeprefix("kernels_per_decode_step "): line for line in lines if line["what"].startswith("kernels_per")}
    assert set(kernels) == {"(eager)", "(eager LoRA)", "(eager LoRA sampling_copies)"}  # (compiled ones with --compile)
    assert 0 < kernels["(eager)"]["ours"] < kernels["(eager LoRA sampling_copies)"]["ours"] < kernels["(eager LoRA)"]["ours"]
    assert kernels["(eager LoRA)"]["reference"] > kernels["(eager)"]["reference"] > 0  # transformers + PEFT, transformers
    assert sorted(line["batch"] for line in lines if line["what"] == "rollout_lora") == [1, 16, 64]
    gap = next(line for line in lines if line["what"] == "sampler_trainer_gap")
    assert 0 <= gap["ours"] < 1e-4  # fp32 on the CPU: the sampler and the training forward agree
    assert "| what | shape | batch |" in result.stdout  # the Markdown table follows the JSON lines


@pytest.mark.skipif(inductor_missing() is not None, reason=str(inductor_missing()))
def test_bench_compiled_rows(tiny_checkpoint):
    import bench

    model = Qwen3.from_pretrained(tiny_checkpoint[0], dtype=torch.float32)
    records = []
    bench.bench_compiled(model, model.config, torch.device("cpu"), dict(prompt=8), records, "tiny")
    rows = {line["what"]: line for line in records}
    assert rows["decode_step_compilations"]["ours"] == 1 and rows["decode_step_compilations"]["note"].endswith("added 0")
    assert rows["decode_step_compile_seconds"]["ours"] > 0  # a compilation costs more than a replay
    assert rows["compiled_greedy_tokens_equal_eager"]["ours"] == 1.0
    assert rows["compiled_sampler_trainer_gap"]["ours"] < 1e-5 and "repeated every token" in rows["compiled_sampler_trainer_gap"]["note"]


def test_gpu_check_measures_the_goals_and_names_what_it_could_not(tmp_path, monkeypatch):
    import bench

    cpu = torch.device("cpu")
    size = dict(bench.sizes(cpu, quick=True), batches=(1, 4))
    directory = bench.write_checkpoint("tiny", tmp_path / "checkpoint")
    records, skipped, seconds = bench.gpu_check(directory, cpu, torch.float32, size, "tiny", compile=False)
    assert skipped == []
    whats = {(line["what"], line["batch"]) for line in records}
    assert whats >= {("rollout", 4), ("rollout", 1), ("paper_step", 4), ("paper_step_checkpointed", 4), ("train_step", 2),
                     ("rollout_lora", 4), ("activations_per_token_checkpointed", 1), ("paper_step_planned_peak_checkpointed", None)}
    table = bench.goals_table(records, skipped, seconds, cpu)
    assert "| paper GRPO step (32 completions of up to 512 tokens), s | <= 3 |" in table
    assert "| rollout at batch 64: compiled / transformers generate | >= 5 | not measured |" in table  # no batch 64, no compile
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(bench, "bench_paper_step", broken)  # one failure: reported, the others still measured
    records, skipped, _ = bench.gpu_check(directory, cpu, torch.float32, size, "tiny", compile=False)
    assert skipped == ["paper step (failed: RuntimeError: CUDA out of memory)"] and ("train_step", 2) in {(r["what"], r["batch"]) for r in records}
    monkeypatch.setattr(bench, "GPU_CHECK_SECONDS", 0)
    records, skipped, _ = bench.gpu_check(directory, cpu, torch.float32, size, "tiny", compile=False)
    assert records == [] and skipped == [f"{name} (out of time)" for name in
                                         ("rollout at batch 4", "paper step", "train step", "rollout at batch 1", "LoRA rollout at batch 4",
                                          "memory")]
    assert "not measured: rollout at batch 4 (out of time); paper step (out of time)" in bench.goals_table(records, skipped, 1.0, cpu)


# ================================================================================================
# model.py: the two top-p samplers


def in_nucleus(probs, top_p):
    """Brute force, (..., V) -> (..., V) bool: token i is kept iff the mass of strictly likelier tokens is below p."""
    likelier = (probs[..., None, :] > probs[..., :, None]) * probs[..., None, :]  # (..., V, V): [i, j] = p_j if p_j > p_i
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
        assert (kept.sum(dim=-1) > 1).float().mean() > 0.5 and (kept.sum(dim=-1) < 300).all()  # the test can fail
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


# ================================================================================================
# model.py: attention with the query heads folded, and generate's outputs


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
                                      initializer_range=0.2)
    directory = tmp_path_factory.mktemp("tiny")
    transformers.Qwen3ForCausalLM(config).save_pretrained(directory)
    return Qwen3.from_pretrained(directory, dtype=torch.float32)


def test_folded_masked_attention_equals_sdpa_gqa(gqa_model):
    ids = torch.randint(0, 96, (3, 11), generator=torch.Generator().manual_seed(0))  # (B, T)
    with torch.no_grad():
        plain = gqa_model(ids)  # no mask: SDPA's causal GQA path
        folded = gqa_model(ids, torch.ones_like(ids))  # a mask: G = 4 query heads folded per KV head
    torch.testing.assert_close(folded, plain, atol=1e-5, rtol=1e-5)


def test_generate_returns_ordinary_tensors(gqa_model):
    tokens, mask, logprobs = generate(gqa_model, [[5, 9, 2], [4]], 6, temperature=1.0, top_p=0.9, eos_token_id=[],
                                      generator=torch.Generator().manual_seed(0), return_logprobs=True)
    assert not any(torch.is_inference(t) for t in (tokens, mask, logprobs))
    weight = torch.ones(mask.shape, requires_grad=True)
    (weight * mask * logprobs).sum().backward()  # an inference tensor could not be saved for backward
    assert torch.equal(weight.grad, logprobs * mask)


# ================================================================================================
# demo.py: the CPU demo's model, tokenizer, task and warm-up

import demo
from math_reward import math_reward

DEMO_TARGET_ACCURACY = demo.WARMUP["target_accuracy"]


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    """A demo checkpoint built with a short warm-up that learns the layout, not yet the sums (the full one takes a minute)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(demo.WARMUP, "target_accuracy", 0.02)
        yield demo.build_demo_checkpoint(tmp_path_factory.mktemp("demo") / "demo-qwen3")


@pytest.fixture
def quick_recipe(monkeypatch):
    """The warm-up stops at its first check (5 steps): a build in about a second."""
    monkeypatch.setitem(demo.WARMUP, "target_accuracy", 0.0)


def test_splits_are_disjoint_and_cover_every_pair():
    train = demo.demo_problems("train", 7100, seed=0)
    test = demo.demo_problems("test", 1000, seed=0)
    train_texts, test_texts = {p["problem"] for p in train}, {p["problem"] for p in test}
    assert len(train_texts) == 7100 and len(test_texts) == 1000
    assert not train_texts & test_texts
    assert len(train_texts | test_texts) == len(demo.OPERANDS) ** 2 == 8100


def test_problems_are_seeded_samples_of_their_split():
    assert demo.demo_problems("train", 50, seed=3) == demo.demo_problems("train", 50, seed=3)
    assert demo.demo_problems("train", 50, seed=3) != demo.demo_problems("train", 50, seed=4)
    for p in demo.demo_problems("test", 100, seed=1):
        a, b = p["problem"].removesuffix("=").split("+")
        assert int(p["answer"]) == int(a) + int(b)
    with pytest.raises(ValueError, match="split 'valid'"):
        demo.demo_problems("valid", 10, seed=0)
    with pytest.raises(ValueError, match="count 1001"):
        demo.demo_problems("test", 1001, seed=0)


def test_gold_answers_score_one_and_wrong_answers_zero():
    assert demo.completion_text("47+85=") == "7+5=12,4+8+1=13,\\boxed{132}" and demo.completion_text("23+45=") == "3+5=08,2+4+0=06,\\boxed{68}"
    for p in demo.demo_problems("test", 200, seed=0):
        a, b = (int(x) for x in p["problem"].removesuffix("=").split("+"))
        assert math_reward(demo.completion_text(p["problem"]), p["answer"]) == 1.0
        assert math_reward(demo.completion_text(p["problem"]).replace(f"{{{a + b}}}", f"{{{a + b + 1}}}"), p["answer"]) == 0.0
    assert math_reward("7+5=12,4+8+1=13,", "132") == 0.0  # no \boxed{}: no reward


def test_token_roles_mark_the_column_sums():
    """Computed: the two digits of each column's sum; copies (operand digits, the carry, the answer) and format are not.
    A completion out of the layout (cut short, a wrong separator, junk after the box) is not parsed."""
    tokenizer = demo.build_tokenizer()
    pieces = lambda text: [tokenizer.decode([i]) for i in tokenizer.encode(text).ids] + [demo.EOS]
    completion = pieces(demo.completion_text("47+85="))  # 7 + 5 = 1 2 , 4 + 8 + 1 = 1 3 , \boxed{ 1 3 2 } EOS
    roles = demo.token_roles("47+85=", completion)
    assert len(roles) == len(completion) == 22 and [i for i, computed in enumerate(roles) if computed] == [4, 5, 13, 14]
    assert demo.token_roles("47+85=", completion[:-1]) == roles[:-1]  # truncated just before EOS: still parsed
    wrong_sums = pieces("7+5=13,4+8+1=99,\\boxed{932}")  # the arithmetic is wrong, the layout is not: the same roles
    assert demo.token_roles("47+85=", wrong_sums) == roles
    for broken in (completion[:10], completion[:4] + ["+"] + completion[5:], completion[:-1] + ["7", demo.EOS], pieces("\\boxed{132}")):
        assert demo.token_roles("47+85=", broken) is None


def test_tokenizer_round_trips_every_problem_and_completion(demo_checkpoint):
    tokenizer = load_tokenizer(demo_checkpoint)
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 0
    assert tokenizer.vocab_size == len(demo.VOCAB)
    problems = demo.demo_problems("train", 7100, seed=0) + demo.demo_problems("test", 1000, seed=0)
    texts = [demo.DEMO_PROMPT_TEMPLATE.format(problem=p["problem"]) + demo.completion_text(p["problem"]) + demo.EOS
             for p in problems]
    for text, encoding in zip(texts, tokenizer.tokenizer.encode_batch(texts, add_special_tokens=False)):
        assert tokenizer.decode(encoding.ids) == text
        assert encoding.ids[-1] == tokenizer.eos_token_id
        assert encoding.ids.count(tokenizer.tokenizer.token_to_id(demo.BOXED)) == 1  # \boxed{ is one token
    completions = [len(tokenizer.encode(demo.completion_text(p["problem"]))) + 1 for p in problems]
    assert min(completions) == 21 and max(completions) == 22 and sum(completions) / len(completions) > 21  # with EOS
    assert train.DEMO.max_new_tokens >= max(completions)  # the demo's length limit fits every completion
    prompts = [len(tokenizer.encode(p["problem"])) for p in problems]
    assert max(prompts) + train.DEMO.max_new_tokens <= demo.MODEL["max_position_embeddings"]  # and the model's positions
    with pytest.raises(Exception, match="UNK|unk"):
        tokenizer.encode("12/4=")  # a character outside the task is an error, not a silent token


def test_checkpoint_loads_like_a_real_one(demo_checkpoint):
    config = json.loads((demo_checkpoint / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["eos_token_id"] == 0 and config["tie_word_embeddings"]
    model = Qwen3.from_pretrained(demo_checkpoint)
    assert model.lm_head.weight.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.hidden_size == demo.MODEL["hidden_size"]
    assert model.config.num_hidden_layers == demo.MODEL["num_hidden_layers"]
    assert not list(demo_checkpoint.parent.glob(f".{demo_checkpoint.name}.building-*"))  # the staging directory is gone


def test_warm_up_leaves_the_model_neither_hopeless_nor_perfect(tmp_path, monkeypatch):
    monkeypatch.setitem(demo.WARMUP, "target_accuracy", DEMO_TARGET_ACCURACY)  # the real recipe, whatever fixtures patched
    checkpoint = demo.build_demo_checkpoint(tmp_path / "demo-qwen3")  # the full warm-up: 10-20 s
    model, tokenizer = Qwen3.from_pretrained(checkpoint), load_tokenizer(checkpoint)
    problems = demo.demo_problems("test", 400, seed=0)
    prompts = [tokenizer.encode(demo.DEMO_PROMPT_TEMPLATE.format(problem=p["problem"])) for p in problems]
    tokens, mask = generate(model, prompts, train.DEMO.max_new_tokens, temperature=0.0, top_p=1.0, eos_token_id=tokenizer.eos_token_id)
    completions = [row[valid].tolist() for row, valid in zip(tokens, mask)]
    accuracy = sum(math_reward(tokenizer.decode(ids), p["answer"]) for ids, p in zip(completions, problems)) / len(problems)
    assert 0.1 <= accuracy <= 0.6
    well_formed = [demo.token_roles(p["problem"], [tokenizer.decode([i]) for i in ids]) is not None for ids, p in zip(completions, problems)]
    assert sum(well_formed) / len(completions) > 0.95  # the layout is learnt; the column sums are what is left to learn


@pytest.mark.parametrize("credit", ["arca-shuffled", "entropy-top20"])
def test_the_controls_train_end_to_end_and_every_signal_finds_the_computed_tokens(demo_checkpoint, tmp_path, credit, monkeypatch):
    """Each control trains a demo run (the adapter moves), and every step of a demo run logs all seven methods' Gini
    and computed_mass (their weight's share on the column sums of the completions token_roles parses)."""
    monkeypatch.setattr(train, "score", parity_reward)  # a reward earned half the time: every step has a gradient
    out = tmp_path / credit
    train.main(["--preset", "demo", "--model", str(demo_checkpoint), "--out", str(out), "--credit", credit, "--steps", "2",
                "--eval-every", "2", "--eval-problems", "8", "--prompts-per-micro-batch", "4", "--group-size", "4", "--lr", "1e-3",
                "--warmup-steps", "0"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in metrics:
        for method in ("uniform", "surprisal", "entropy", "divergence", "arca", "arca-shuffled", "entropy-top20"):
            assert 0 <= row[f"gini/{method}"] < 1 and 0 <= row[f"computed_mass/{method}"] <= 1, (method, row)
        assert row["unparsed_completions"] <= 16
        assert 0.1 < row["computed_mass/uniform"] < 0.25  # 4 of the 21 or 22 tokens
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)
    report = train.report([out])
    assert "arca-shuffled" in report and "entropy-top20" in report


def test_cached_checkpoint_is_reused(demo_checkpoint):
    weights = demo_checkpoint / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert demo.build_demo_checkpoint(demo_checkpoint) == demo_checkpoint
    assert weights.stat().st_mtime_ns == before


def test_build_is_deterministic_given_the_seed(tmp_path, quick_recipe):
    rng_before = torch.get_rng_state()
    first = demo.build_demo_checkpoint(tmp_path / "a", seed=5)
    assert torch.equal(torch.get_rng_state(), rng_before)  # its own generator; the global RNG is untouched
    second = demo.build_demo_checkpoint(tmp_path / "b", seed=5)
    other = demo.build_demo_checkpoint(tmp_path / "c", seed=6)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()


def test_build_runs_on_one_thread_whatever_the_machine_has(tmp_path, quick_recipe, monkeypatch):
    threads_seen = []
    real_warm_up = demo.warm_up
    monkeypatch.setattr(demo, "warm_up", lambda *args: (threads_seen.append(torch.get_num_threads()), real_warm_up(*args))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = demo.build_demo_checkpoint(tmp_path / "two", seed=3)
        torch.set_num_threads(1)
        one = demo.build_demo_checkpoint(tmp_path / "one", seed=3)
        assert torch.get_num_threads() == 1  # restored
    finally:
        torch.set_num_threads(before)
    assert threads_seen == [1, 1]
    assert (two / "model.safetensors").read_bytes() == (one / "model.safetensors").read_bytes()


def test_stale_or_incomplete_checkpoint_is_rebuilt(tmp_path, quick_recipe):
    directory = demo.build_demo_checkpoint(tmp_path / "demo", seed=0)
    weights = directory / "model.safetensors"
    assert demo.is_built(directory, seed=0) and not demo.is_built(directory, seed=1)
    recipe = json.loads((directory / "recipe.json").read_text())
    (directory / "recipe.json").write_text(json.dumps({**recipe, "hash": "an older recipe"}))
    assert not demo.is_built(directory, seed=0)
    before = weights.stat().st_mtime_ns
    demo.build_demo_checkpoint(directory, seed=0)
    assert demo.is_built(directory, seed=0) and weights.stat().st_mtime_ns != before
    weights.unlink()  # an interrupted copy by hand, say
    assert not demo.is_built(directory, seed=0)
    demo.build_demo_checkpoint(directory, seed=0)
    assert demo.is_built(directory, seed=0)


# ================================================================================================
# math_reward.py: labelled answers, adversarial inputs, the MATH solutions, worker timeouts

import signal
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from math_reward import extract_boxed, is_equiv, normalize_answer, score_batch, strict_match

MATH_DATA_DIR = SHARED_DATA / "math"
PWNED_FILE = Path("/tmp/arca_math_reward_pwned")  # created only if model text were executed


def boxed(answer):
    return f"The answer is $\\boxed{{{answer}}}$."


# (predicted answer, gold answer, equivalent?) -- the prediction is put in a box.
LABELLED = [
    # plain numbers and near-misses
    ("3", "3", True),
    ("3", "3.1", False),
    ("10", "100", False),
    ("1/2", "2", False),
    ("-3", "3", False),
    ("3.0", "3", True),
    ("03", "3", True),
    ("2.50", "2.5", True),
    ("0.5", "\\frac{1}{2}", True),
    (".5", "0.5", True),
    ("-.5", "-\\frac12", True),
    ("0.333", "\\frac{1}{3}", False),
    ("0.3333333333", "\\frac{1}{3}", False),  # exact numbers compare exactly
    ("1.4142135623731", "\\sqrt{2}", True),  # a decimal vs an irrational: relative 1e-9
    ("1.414", "\\sqrt{2}", False),
    ("3.14", "\\pi", False),
    # thousands separators
    ("12441600", "12,\\!441,\\!600", True),
    ("12,441,600", "12441600", True),
    ("23000", "\\$23{,}000", True),
    ("1,000", "1000", True),
    ("1,000", "100", False),
    ("11,\\! 111,\\! 111,\\! 100", "11111111100", True),
    # fractions: \dfrac, \tfrac, shorthand, slash
    ("\\dfrac{1}{2}", "\\frac12", True),
    ("\\tfrac{3}{4}", "\\frac{3}{4}", True),
    ("\\cfrac{3}{4}", "0.75", True),
    ("\\frac 54", "\\frac{5}{4}", True),
    ("\\frac1{72}", "\\frac{1}{72}", True),
    ("5/4", "\\frac{5}{4}", True),
    ("4/5", "\\frac{5}{4}", False),
    ("\\frac{2}{4}", "\\frac{1}{2}", True),
    ("-\\frac{1}{9}", "\\frac{-1}{9}", True),
    ("\\frac{1}{9}", "-\\frac{1}{9}", False),
    ("8\\frac47", "\\frac{60}{7}", True),  # mixed numbers
    ("1\\frac{1}{4}", "1.25", True),
    ("-8\\frac47", "-\\frac{60}{7}", True),
    ("8\\frac47", "\\frac{32}{7}", False),
    # roots and pi
    ("2\\sqrt{2}", "\\sqrt{8}", True),
    ("\\sqrt8", "2\\sqrt2", True),
    ("2\\sqrt{3}", "\\sqrt{8}", False),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}", True),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True),
    ("\\frac{2\\sqrt{35}}{35}", "\\frac{2}{\\sqrt{35}}", True),
    ("\\sqrt[3]{8}", "2", True),
    ("\\sqrt[3]{4}", "\\sqrt{4}", False),
    ("2\\pi", "\\pi \\cdot 2", True),
    ("72\\pi", "72 \\pi", True),
    ("\\frac{9\\pi}{2}", "4.5\\pi", True),
    ("\\frac{81}{32}\\pi", "\\frac{81\\pi}{32}", True),
    ("3\\pi", "3", False),
    ("18+2\\pi", "2\\pi+18", True),
    ("\\sqrt{185} - 4", "-4+\\sqrt{185}", True),
    ("\\sqrt3-\\sqrt2", "\\sqrt2-\\sqrt3", False),
    ("\\pi r^2", "r^2 \\pi", True),
    # powers
    ("2^{10}", "1024", True),
    ("2^{2008}-2", "2^{2008} -2", True),
    ("2^{2008}-1", "2^{2008}-2", False),
    ("5^{12}", "244140625", True),
    ("5^{12}", "5^{13}", False),
    ("2**10", "1024", True),
    ("x^{-1}", "\\frac{1}{x}", True),
    # factorials, binomials, logs, trig
    ("5!", "120", True),
    ("\\binom{5}{2}", "10", True),
    ("\\dbinom{6}{3}", "20", True),
    ("\\log_2 8", "3", True),
    ("\\ln(e^2)", "2", True),
    ("\\sin^2 x + \\cos^2 x", "1", True),
    ("\\tan 15^\\circ", "2-\\sqrt{3}", True),
    ("\\cos 60^\\circ", "\\frac12", True),
    ("\\cot x", "\\frac{\\cos x}{\\sin x}", True),
    ("\\cot x", "\\tan x", False),
    ("|-3|", "3", True),
    # complex numbers
    ("6-3i", "6 - 3i", True),
    ("-3i+6", "6-3i", True),
    ("6+3i", "6-3i", False),
    ("\\frac{3}{2} + \\frac{3}{2} i", "1.5+1.5i", True),
    ("i^2", "-1", True),
    # polynomials and rational functions
    ("x^2+2x+1", "(x+1)^2", True),
    ("x^2", "x^3", False),
    ("x^2+2x", "(x+1)^2", False),
    ("(t-7)(t+7)", "t^2-49", True),
    ("-6t^4 +11t^3 -19t^2 +17t -10", "11t^3-6t^4-19t^2+17t-10", True),
    ("-6t^4 +11t^3 -19t^2 +17t -10", "-6t^4 +11t^3 -19t^2 +17t +10", False),
    ("4x(8x^2-x+5)", "32x^3-4x^2+20x", True),
    ("\\frac{1}{y} + y", "\\frac{y^2+1}{y}", True),
    ("\\frac{11+9a}{20}", "\\frac{11}{20}+\\frac{9a}{20}", True),
    ("\\frac{11+9a}{20}", "\\frac{11+9b}{20}", False),
    ("10p^3 \\sqrt{3p}", "10\\sqrt{3}p^{7/2}", True),
    ("x+y", "y+x", True),
    ("xy", "yx", True),
    ("x-y", "y-x", False),
    ("a_1 + a_2", "a_2 + a_1", True),
    ("a_1", "a_2", False),
    ("\\frac{1}{4m}", "\\frac{1}{4}m", False),
    ("29b(5b+1)", "145b^2+29b", True),
    # tuples, points, vectors
    ("(1,2)", "(1, 2)", True),
    ("(1,2)", "(2,1)", False),
    ("(1,2)", "[1,2]", False),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)", True),
    ("(3, \\frac{\\pi}{2})", "(3, \\frac{3\\pi}{2})", False),
    ("\\left( \\frac{170}{49}, \\frac{78}{49}, \\frac{10}{49} \\right)", "(170/49, 78/49, 10/49)", True),
    ("(1,2,3)", "(1,2)", False),
    ("(0.5, 2)", "(\\frac12, 2)", True),
    ("(-\\tfrac52, -\\tfrac52)", "(-2.5, -2.5)", True),
    # intervals and unions: open and closed ends matter
    ("[0,1)", "[0,1)", True),
    ("[0,1)", "[0,1]", False),
    ("(0,1]", "[0,1]", False),
    ("[-2,2]", "\\left[ -2, 2 \\right]", True),
    ("(-\\infty, 0]", "(-\\infty,0]", True),
    ("(-\\infty, 0)", "(-\\infty,0]", False),
    ("(-\\infty,-5]\\cup[5,\\infty)", "[5,\\infty) \\cup (-\\infty,-5]", True),
    ("(-\\infty,-5)\\cup[5,\\infty)", "(-\\infty,-5]\\cup[5,\\infty)", False),
    ("x \\in [2, 5)", "[2,5)", True),
    ("\\left[ \\frac{1}{2}, \\frac{3}{2} \\right]", "[0.5, 1.5]", True),
    # sets and lists of solutions (order-free)
    ("\\{1,2\\}", "\\{2,1\\}", True),
    ("\\{1,2\\}", "\\{1,3\\}", False),
    ("2,-2", "-2, 2", True),
    ("2, -1", "-1,2", True),
    ("2, -1", "2", False),
    ("1, 1, 2", "1, 2", False),
    ("-2,-1,1,2", "1,2,-1,-2", True),
    ("1 \\pm \\sqrt{19}", "1+\\sqrt{19}, 1-\\sqrt{19}", True),
    ("1 \\pm \\sqrt{19}", "1+\\sqrt{19}", False),
    ("\\{1\\pm\\sqrt{5},-2\\}", "\\{-2, 1+\\sqrt5, 1-\\sqrt5\\}", True),
    ("3 - i, -2 + i", "-2+i, 3-i", True),
    ("6, 8, and 10", "6,8,10", True),
    ("19 \\text{ and } 43", "43, 19", True),
    ("4^\\circ, 20^\\circ", "20, 4", True),
    # matrices
    ("\\begin{pmatrix} 1 \\\\ 4 \\\\ 3 \\end{pmatrix}", "\\begin{pmatrix}1\\\\4\\\\3\\end{pmatrix}", True),
    ("\\begin{pmatrix} 1 \\\\ 4 \\\\ 3 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 3 \\\\ 4 \\end{pmatrix}", False),
    ("\\begin{bmatrix} 1/5 \\\\ -3/5 \\end{bmatrix}", "\\begin{pmatrix} 0.2 \\\\ -0.6 \\end{pmatrix}", True),
    ("\\begin{pmatrix} 1/\\sqrt{2} & 1/\\sqrt{2} \\\\ -1/\\sqrt{2} & 1/\\sqrt{2} \\end{pmatrix}",
     "\\begin{pmatrix} \\frac{\\sqrt2}{2} & \\frac{\\sqrt2}{2} \\\\ -\\frac{\\sqrt2}{2} & \\frac{\\sqrt2}{2} \\end{pmatrix}", True),
    ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix} 1 & 3 \\\\ 2 & 4 \\end{pmatrix}", False),
    ("\\begin{pmatrix} 1 & 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", False),
    # equations
    ("y = 1-2x", "y=-2x+1", True),
    ("y = 1+2x", "y=-2x+1", False),
    ("x + 2y - 2z - 9 = 0", "2z - x - 2y + 9 = 0", True),
    ("x + 2y - 2z - 9 = 0", "x + 2y - 2z + 9 = 0", False),
    ("20x + 23y + 26z - 69 = 0", "20x+23y+26z=69", True),
    ("3x - y = 2", "y = 3x - 2", True),
    ("3+y = 2x", "y = 2x + 3", False),
    ("x = 5", "5", True),
    ("k=6", "6", True),
    ("b=\\frac{1}{49}", "\\frac{1}{49}", True),
    ("x = \\frac{3}{2}", "1.5", True),
    ("x = 2", "3", False),
    # units, text, degrees, percent, dollars
    ("441", "441\\text{ pounds}", True),
    ("441 pounds", "441", True),
    ("5 inches", "5\\text{ inches}", True),
    ("45", "45 \\text{ units}^2", True),
    ("8\\sqrt{3}", "8\\sqrt{3} \\text { square inches}", True),
    ("480 + 480\\sqrt{3}", "480 + 480\\sqrt{3}\\text{ feet}", True),
    ("20\\text{ miles}", "21", False),
    ("117^\\circ", "117", True),
    ("117^{\\circ}", "117", True),
    ("117°", "117", True),
    ("117 degrees", "117", True),
    ("118^\\circ", "117", False),
    ("44\\%", "44", True),
    ("44%", "44\\%", True),
    ("45\\%", "44\\%", False),
    ("\\$0.25", "0.25", True),
    ("\\$ 139", "139", True),
    ("\\$4813.24", "4813.24", True),
    ("\\$4813.25", "4813.24", False),
    ("\\text{Sunday}", "Sunday", True),
    ("sunday", "\\text{Sunday}", True),
    ("\\text{Monday}", "\\text{Sunday}", False),
    ("\\text{odd}", "odd", True),
    ("\\text{dod}", "\\text{odd}", False),
    ("\\mbox{four}", "four", True),
    ("\\text{(E)}", "E", True),
    ("(E)", "\\text{(E)}", True),
    ("D", "\\text{(E)}", False),
    ("\\textbf{13}", "13", True),
    # spacing, \left/\right, trailing period, dollars around the answer
    ("\\! 1 \\, 2 \\; 3", "123", True),
    ("\\left(1,2\\right)", "(1,2)", True),
    ("5.", "5", True),
    ("$5$", "5", True),
    ("\\displaystyle\\frac{1}{2}", "\\frac12", True),
    ("5\\ \\text{cm}", "5", True),
    # bases
    ("11011100_2", "11011100", True),
    ("141_{13}", "141_{13}", True),
    ("141_{13}", "142", False),
    ("2021_3", "2021", True),
    ("4210_{5}", "4210_{7}", False),
    ("1_6", "1_7", False),
    # repeating decimals
    ("\\frac{1}{3}", "0.\\overline{3}", True),
    ("\\frac16", "0.1\\overline{6}", True),
    ("-\\frac{14}{11}", "-1.\\overline{27}", True),
    ("\\frac{1}{3}", "0.\\overline{6}", False),
    # plain-text math a model may write
    ("sqrt(2)/2", "\\frac{\\sqrt{2}}{2}", True),
    ("3*pi", "3\\pi", True),
    ("1/(2*sqrt(3))", "\\frac{\\sqrt3}{6}", True),
    ("(3 + sqrt(5))/2", "\\frac{3+\\sqrt{5}}{2}", True),
    ("x^2 - 2x + 2", "x^2-10x+41", False),
    # infinity
    ("\\infty", "\\infty", True),
    ("-\\infty", "\\infty", False),
    # no answer
    ("", "5", False),
    ("5", "", False),
]


def test_labelled_cases():
    wrong = [(pred, gold, expected) for pred, gold, expected in LABELLED
             if math_reward(boxed(pred), gold) != float(expected)]
    print(f"\nlabelled cases: {len(LABELLED) - len(wrong)}/{len(LABELLED)} right")
    assert len(LABELLED) >= 150
    assert not wrong


def test_is_equiv_is_symmetric_on_labelled_cases():
    for pred, gold, expected in LABELLED:
        if pred and gold:
            assert is_equiv(gold, pred) == expected, (pred, gold)


EXTRACTION = [
    ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("first \\boxed{1}, then \\boxed{2}", "2"),
    ("answer: $\\boxed 9$.", "9"),
    ("\\boxed {17}.", "17"),
    ("\\fbox{5}", "5"),
    ("\\boxed{\\{1\\pm\\sqrt{5},-2\\}}", "\\{1\\pm\\sqrt{5},-2\\}"),
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
    ("no box here", None),
    ("\\boxed{1} then \\boxed{2", None),
    ("\\boxed{", None),
    ("\\boxed", None),
    ("\\boxed{}", ""),
]


@pytest.mark.parametrize("text, expected", EXTRACTION)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


NORMALISATION = [
    ("\\left( 3, \\dfrac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("\\$12,\\!441.50", "12441.50"),
    ("x = \\frac12.", "\\frac{1}{2}"),
    ("117^\\circ", "117"),
    ("\\text{(E)}", "E"),
    ("441\\text{ pounds}", "441"),
    ("\\sqrt3", "\\sqrt{3}"),
    (".5", "0.5"),
    ("\\pi r^2", "\\pi r^2"),
    ("a \\leq b", "a\\leq b"),
    ("141_13", "141_{13}"),
    ("0.\\overline{3}", "\\frac{3}{9}"),
]


@pytest.mark.parametrize("answer, expected", NORMALISATION)
def test_normalize_answer(answer, expected):
    assert normalize_answer(answer) == expected


def test_gold_may_be_a_full_solution():
    solution = "Adding, $(2+2)+(1+3)i=\\boxed{4+4i}$."
    assert math_reward(boxed("4+4i"), solution) == 1.0
    assert math_reward(boxed("4-4i"), solution) == 0.0


ADVERSARIAL = {
    "exponent tower": boxed("9^{9^{9^9}}"),
    "exponent tower with a variable": boxed("x^{x^{x^{x^{x}}}}"),
    "e tower": boxed("e^{e^{e^{e^{100}}}}"),
    "exp tower": boxed("\\exp(\\exp(\\exp(100)))"),
    "sinh tower": boxed("\\sinh(\\cosh(\\sinh(100)))"),
    "huge power of a power": boxed("(10^{10000})^{10000}"),
    "nested powers": boxed("((((2^{100})^{100})^{100})^{100})"),
    "power of a root": boxed("(\\sqrt{2^{9999}})^{9999}"),
    "big integer power": boxed("*".join(["9" * 100] * 9) + "^{9999}"),
    "factorial tower": boxed("(((3!)!)!)!"),
    "double factorial": boxed("1000!!"),
    "factorial of a huge number": boxed("(10^{100})!"),
    "factorial of a variable tower": boxed("((x!)!)!"),
    "big binomial": boxed("\\binom{10^{9}}{5}"),
    "sin of a huge number": boxed("\\sin(10^{10000})"),
    "root of huge index": boxed("\\sqrt[" + "9" * 99 + "]{2}"),
    "million-character answer": boxed("1" * 10**6),
    "million-character sum": boxed("+".join(["x"] * 300_000)),
    "million characters, no box": "a" * 10**6,
    "thousands of nested braces": boxed("{" * 5000 + "1" + "}" * 5000),
    "thousands of nested parentheses": boxed("(" * 5000 + "1" + ")" * 5000),
    "thousands of nested fracs": boxed("\\frac" * 3000 + "1" * 3000),
    "nested tuples": boxed("(" * 40 + "1,2" + ")" * 40),
    "unbalanced braces": "\\boxed{" * 10000,
    "unbalanced inside": boxed("{{{{{1") + "}" * 3,
    "NUL bytes": boxed("1\x002") + "\x00" * 1000,
    "only a NUL in the box": "\x00" * 1000 + boxed("\x00"),
    "python os.system": boxed(f"__import__('os').system('touch {PWNED_FILE}')"),
    "python open": boxed(f"open('{PWNED_FILE}', 'w').write('x')"),
    "python exec": boxed(f"exec(\"open('{PWNED_FILE}', 'w')\")"),
    "sympify lambda": boxed(f"(lambda: open('{PWNED_FILE}', 'w'))()"),
    "many elements": boxed(",".join(str(i) for i in range(2000))),
    "big set": boxed("\\{" + ",".join(f"x^{i}" for i in range(32)) + "\\}"),
    "big matrix": boxed("\\begin{pmatrix}" + "\\\\".join("&".join(["1"] * 32) for _ in range(32)) + "\\end{pmatrix}"),
    "many plus-minus": boxed("\\pm" * 500),
    "long subscript": boxed("x_{" + "1" * 900 + "}"),
    "division by zero": boxed("1/0"),
    "zero to a negative power": boxed("0^{-1}"),
    "tan of pi/2": boxed("\\tan(\\pi/2)"),
    "unicode": boxed("π√∞±" * 100),
    # found by fuzzing: each took sympy seconds to minutes before its guard
    "binomial with a huge k": boxed("\\binom{x}{99999999999}"),
    "999th root": boxed("\\frac{\\log_{y}{-1}}{\\sqrt[999]{i\\cdot 99999999999}}"),
    "root of a factorial": boxed("\\sqrt{99999999999+(1000+9)!}"),
    "complex power of a power": boxed("\\frac{\\sqrt[y]{{{y}^{1000}}^{\\sqrt{i}}}}{2}"),
    "tiny exponent": boxed("\\frac{\\sinh(-10^{4})}{99999999999^{1/99999999999^{9}}}"),
}
ADVERSARIAL_GOLDS = ["1", "x", "\\frac{\\sqrt3}{2}", "(1,2)", "\\{1,2\\}", "y = 2x+3",
                     "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"]


def test_adversarial_inputs_are_fast_and_harmless():
    slowest = (0.0, "")
    for name, completion in ADVERSARIAL.items():
        for gold in ADVERSARIAL_GOLDS + [completion]:
            start = time.perf_counter()
            reward = math_reward(completion, gold)
            elapsed = time.perf_counter() - start
            assert reward in (0.0, 1.0), name
            slowest = max(slowest, (elapsed, name))
            assert elapsed < 2.0, (name, elapsed)
    print(f"\nslowest adversarial call: {slowest[0] * 1000:.0f} ms ({slowest[1]})")
    assert not PWNED_FILE.exists()


STRICT_CASES = [  # (completion, gold, strict_match, math_reward)
    ("so \\boxed{\\dfrac{1}{2}}.", "\\frac{1}{2}", 1.0, 1.0),  # \dfrac -> \frac
    ("\\boxed{\\tfrac{1}{2}}", "\\frac{1}{2}", 1.0, 1.0),
    ("\\boxed{ 12. }", "12", 1.0, 1.0),  # strip, trailing period
    ("\\boxed{x  +\n y}", "x + y", 1.0, 1.0),  # whitespace runs to one space
    ("\\boxed{\\left(3, 4\\right)}", "(3, 4)", 1.0, 1.0),  # \left, \right deleted
    ("\\boxed{5\\,\\text{cm}}", "5\\text{cm}", 1.0, 1.0),  # \, and \text deleted: both sides read "5{cm}"
    ("\\boxed{1} then \\boxed{2}", "2", 1.0, 1.0),  # the last box
    ("\\boxed{a\\{b\\}}", "a\\{b\\}", 1.0, 1.0),  # balanced braces
    # where the reference rejects what the symbolic checker accepts
    ("\\boxed{0.5}", "\\frac{1}{2}", 0.0, 1.0),
    ("\\boxed{x = 5}", "5", 0.0, 1.0),
    ("\\boxed{1,000}", "1000", 0.0, 1.0),
    ("\\boxed{(1,2)}", "(1, 2)", 0.0, 1.0),
    ("\\boxed{ABC}", "abc", 0.0, 1.0),  # no lowercasing (the reference's docstring says so, its code does not)
    # no answer
    ("no box at all", "5", 0.0, 0.0),
    ("\\boxed{5", "5", 0.0, 0.0),  # the last box never closes
    ("\\boxed{5} and \\boxed{6", "5", 0.0, 0.0),  # ... and neither falls back to an earlier one
]


@pytest.mark.parametrize("completion, gold, strict, symbolic", STRICT_CASES)
def test_strict_match_is_the_reference_codes_check(completion, gold, strict, symbolic):
    assert strict_match(completion, gold) == strict
    assert strict_match(completion, "Solution: so \\boxed{" + gold + "}.") == strict  # a gold solution: its last box
    assert math_reward(completion, gold) == symbolic  # the two checkers differ exactly where the table says


def test_strict_match_is_linear_on_hostile_text():
    start = time.perf_counter()
    assert strict_match("\\boxed{" * 200_000 + "x", "x") == 0.0
    assert strict_match("{" * 10**6 + "\\boxed{1}", "1") == 1.0
    assert time.perf_counter() - start < 2.0


def test_math_solutions_score_one_against_their_own_answer():
    if not MATH_DATA_DIR.is_dir():
        pytest.skip(f"{MATH_DATA_DIR} not found")
    n_checks, failures = 0, []
    start = time.perf_counter()
    for name in ("test500.jsonl", "test5000.jsonl", "train.jsonl"):
        with open(MATH_DATA_DIR / name) as f:
            for line in f:
                row = json.loads(line)
                assert extract_boxed(row["solution"]) == row["answer"], row["unique_id"]
                if not row["answer"]:  # two train rows have an empty \boxed{}
                    continue
                n_checks += 1
                if math_reward(row["solution"], row["answer"]) != 1.0:
                    failures.append(row["unique_id"])
    elapsed = time.perf_counter() - start
    print(f"\nMATH solutions: {n_checks} checks in {elapsed:.2f} s ({n_checks / elapsed:.0f} per second)")
    assert n_checks == 17_498
    assert not failures


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200), st.text(max_size=50))
def test_math_reward_never_raises_on_arbitrary_text(completion, gold):
    assert math_reward(completion, gold) in (0.0, 1.0)


MATH_ALPHABET = st.sampled_from(list("0123456789xyie+-*/^_!.,=()[]{}| ") + [
    "\\frac", "\\sqrt", "\\pi", "\\infty", "\\pm", "\\cup", "\\{", "\\}", "\\left(", "\\right)",
    "\\text{", "\\sin", "\\exp", "\\log", "\\binom", "^\\circ", "\\%", "\\$", "\\\\", "&",
    "\\begin{pmatrix}", "\\end{pmatrix}", "\\boxed{", "}"])


@settings(max_examples=300, deadline=None)
@given(st.lists(MATH_ALPHABET, max_size=40).map("".join), st.lists(MATH_ALPHABET, max_size=20).map("".join))
def test_math_reward_never_raises_on_math_like_text(completion, gold):
    start = time.perf_counter()
    assert math_reward(boxed(completion), gold) in (0.0, 1.0)
    assert time.perf_counter() - start < 2.0


HANG_SCORER = """
import time
from math_reward import math_reward

def hang_on_marker(completion, gold):
    if completion == "hang":  # never returns: only the pool's timeout gets past it
        time.sleep(3600)
    return math_reward(completion, gold)
"""


@pytest.fixture
def hang_on_marker(tmp_path, monkeypatch):
    """A scorer that never returns on the completion "hang", in a small module the spawned workers
    can import by name (workers unpickle the scorer by importing its module; this file is heavy)."""
    (tmp_path / "hang_scorer.py").write_text(HANG_SCORER)
    monkeypatch.syspath_prepend(str(tmp_path))
    import math_reward as math_reward_module

    if math_reward_module._pool is not None:  # workers spawned earlier could not import the new module
        math_reward_module._pool.close()
        math_reward_module._pool = None
    import importlib

    return importlib.import_module("hang_scorer").hang_on_marker


def test_score_batch_scores_and_survives_a_hanging_item(hang_on_marker):
    completions = [boxed("\\frac12"), "hang", boxed("3"), boxed("(1,2)")] * 2
    golds = ["0.5", "1", "4", "(1,2)"] * 2
    scores, n_timeouts = score_batch(completions, golds, timeout=1.0, n_workers=2, scorer=hang_on_marker)
    assert scores == [1.0, 0.0, 0.0, 1.0] * 2
    assert n_timeouts == 2
    start = time.perf_counter()  # the stuck workers were replaced: the pool still works, and fast
    scores, n_timeouts = score_batch([boxed("x+x")] * 32, ["2x"] * 32, n_workers=2)
    elapsed = time.perf_counter() - start
    assert scores == [1.0] * 32 and n_timeouts == 0
    print(f"\nscore_batch, 32 items on a warm pool: {elapsed * 1000:.0f} ms")
    assert elapsed < 5.0


def test_a_worker_killed_while_idle_is_replaced():
    score_batch([boxed("1")] * 2, ["1"] * 2, n_workers=2)  # the pool is up and idle
    import math_reward as math_reward_module

    victim = math_reward_module._pool.workers[0].process
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(timeout=10)
    scores, n_timeouts = score_batch([boxed("1"), boxed("2"), boxed("3"), boxed("4")], ["1", "2", "3", "5"], n_workers=2)
    assert scores[1:] == [1.0, 1.0, 0.0] and scores[0] in (0.0, 1.0) and n_timeouts == (scores[0] == 0.0)
    assert all(worker.process.is_alive() for worker in math_reward_module._pool.workers)


MEMORY_SCORER = """
import resource
def address_space_limit(completion, gold):
    return float(resource.getrlimit(resource.RLIMIT_AS)[0])
"""


def test_workers_run_under_an_address_space_limit(tmp_path, monkeypatch):
    (tmp_path / "memory_scorer.py").write_text(MEMORY_SCORER)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import math_reward as math_reward_module

    if math_reward_module._pool is not None:
        math_reward_module._pool.close()
        math_reward_module._pool = None
    scorer = importlib.import_module("memory_scorer").address_space_limit
    (limit,), _ = score_batch(["x"], ["x"], n_workers=1, scorer=scorer)
    import resource

    assert limit != float(resource.RLIM_INFINITY) and limit < 64 * 2**30  # a few GiB, not the machine's memory


def test_huge_function_arguments_are_refused_fast():
    start = time.perf_counter()
    for text in ("\\cos(5000! \\cdot 60)", "\\sin(e^{10000})", "\\tan(10^{3000})", "\\log(2^{5000})"):
        assert math_reward(boxed(text), "\\frac{1}{2}") == 0.0
        assert math_reward(boxed(text), text) == 1.0  # the same text still matches as a string
    assert math_reward(boxed("\\sin(2^{10}) + 1"), "1 + \\sin 1024") == 1.0  # ordinary arguments still compare
    assert time.perf_counter() - start < 5.0  # refused before evaluation: milliseconds, not the minute cos(5000!) could take


def test_score_batch_workers_ignore_ctrl_c():
    import math_reward as module

    score_batch([boxed("1")], ["1"], n_workers=3)  # a new pool: its workers may still be importing
    for worker in module._pool.workers:
        os.kill(worker.process.pid, signal.SIGINT)  # what Ctrl-C sends to the process group
    time.sleep(0.5)
    assert all(worker.process.is_alive() for worker in module._pool.workers)
    assert score_batch([boxed("1")] * 6, ["1"] * 6, n_workers=3) == ([1.0] * 6, 0)
