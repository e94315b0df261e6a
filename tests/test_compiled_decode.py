"""compiled_decode.py: the static-shape decode step under torch.compile, against the eager loop, and the
number of graphs a paper run compiles (dynamo's counters).
"""

import re

import pytest
import torch

import grpo
from conftest import inductor_missing, randomise_adapter
from lora import apply_lora, sampling_copies
from model import Qwen3
from sampling import generate, sample_top_p_sorted, top_k_filter


@pytest.mark.skipif(inductor_missing() is not None, reason=str(inductor_missing()))
def test_compiled_decode_step_matches_eager_and_compiles_once(tiny_checkpoint, monkeypatch):
    """Inductor's compiled step: each layer's K and V written in place (its generated code allocates no
    cache-sized buffer, which a copy of the cache would need), greedy tokens equal eager's, sampled ones
    equal the eager sorted sampler's on the same uniforms at three temperatures without recompiling,
    log-probs the trainer's, LoRA too."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    import compiled_decode
    import sampling as sampling_module

    # a fresh compilation, whose code is read below
    monkeypatch.setattr(compiled_decode, "_compiled_decode_step", None)
    torch._dynamo.reset()
    model = Qwen3.from_pretrained(tiny_checkpoint[0], dtype=torch.float32)
    prompts = [[5, 9, 2, 7], [4, 11], [3]]
    greedy = dict(temperature=0, top_p=1.0, eos_token_id=[1, 2, 3])
    eager_tokens, eager_mask = generate(model, prompts, 24, **greedy)
    graphs = counters["stats"]["unique_graphs"]
    (tokens, mask), code = run_and_get_code(lambda: generate(model, prompts, 24, compile=True, **greedy))
    assert counters["stats"]["unique_graphs"] - graphs == 1  # one compilation for all 24 steps
    # 3 rows in the bucket of 4
    batch, kv_heads, slots, head_dim = model.decode_buffers.caches[4, 256][0].keys[0].shape
    allocations = re.findall(r"empty_strided\w*\(\(([\d, ]+)\)", "\n".join(code))
    # the cache is never copied
    assert allocations and f"{batch}, {kv_heads}, {slots}, {head_dim}" not in allocations
    # EOS stopped some rows
    assert torch.equal(tokens, eager_tokens) and torch.equal(mask, eager_mask) and not mask.all()
    generate(model, [[7, 8], [9, 10], [11]], 24, compile=True, **greedy)
    generate(model, [[7, 8], [9, 10], [11]], 40, compile=True, **greedy)
    # the same batch and cache bucket, any length in it: reused
    assert counters["stats"]["unique_graphs"] - graphs == 1

    # the eager reference
    def sorted_sampler(logits, temperature, top_p, generator=None, top_k=0, uniforms=None):
        if temperature == 0:
            return logits.argmax(dim=-1)
        return sample_top_p_sorted(top_k_filter(logits / temperature, top_k).softmax(dim=-1), top_p,
                                   uniforms=uniforms[:, 0])

    graphs = None
    for temperature in (0.7, 1.0, 1.3):
        # a prompt's K rows share one
        rows = lambda: [g for seed in (1, 2, 3) for g in [torch.Generator().manual_seed(seed)] * 4]
        sampling = dict(temperature=temperature, top_p=0.9, top_k=20, eos_token_id=[1], samples_per_prompt=4,
                        return_logprobs=True)
        compiled = generate(model, prompts, 16, compile=True, row_generators=rows(), **sampling)
        with monkeypatch.context() as patched:
            patched.setattr(sampling_module, "sample_next_token", sorted_sampler)
            reference = generate(model, prompts, 16, row_generators=rows(), **sampling)
        assert torch.equal(compiled[0], reference[0]) and torch.equal(compiled[1], reference[1]), temperature
        graphs = graphs or counters["stats"]["unique_graphs"]
        trained, _, _ = grpo.completion_forward(model, [p for p in prompts for _ in range(4)], compiled[0],
                                                compiled[1])
        # the trainer's log-probs
        torch.testing.assert_close(compiled[2][compiled[1]], trained[compiled[1]], atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] == graphs  # temperature and top-p are inputs: no recompilation
    assert len({tuple(row) for row in compiled[0][:4].tolist()}) > 1  # a prompt's 4 samples differ
    # the rollout path: unmerged LoRA in sampling_copies
    randomise_adapter(apply_lora(model, rank=4, alpha=8))
    with sampling_copies(model):
        eager_lora = generate(model, prompts, 24, **greedy)
        compiled_lora = generate(model, prompts, 24, compile=True, **greedy)
    assert all(torch.equal(a, b) for a, b in zip(eager_lora, compiled_lora))
    assert not torch.equal(eager_lora[0], eager_tokens)
    torch._dynamo.reset()


def test_a_paper_run_compiles_a_known_number_of_graphs(tiny_checkpoint, monkeypatch):
    """The calls of a paper run (rollouts of 8 prompts x K 4, evaluation batches of 64 and their tails, greedy
    and sampled), with temperature, top-p, max_new_tokens and the batch size changing: one graph per
    (greedy or sampled, batch bucket, cache bucket), counted by dynamo (eager backend: the graphs, not
    inductor's kernels, are counted), reused by every later call, its buffers at the same addresses."""
    from torch._dynamo.testing import CompileCounter

    import compiled_decode

    counter, real_compile = CompileCounter(), torch.compile
    monkeypatch.setattr(compiled_decode, "_compiled_decode_step", None)
    # the tiny model's lengths, as 256 is the paper's
    monkeypatch.setattr(compiled_decode, "CACHE_BUCKET", 32)
    monkeypatch.setattr(torch, "compile",
                        lambda fn, **kwargs: real_compile(fn, backend=counter, fullgraph=True, dynamic=False))
    torch._dynamo.reset()
    model = Qwen3.from_pretrained(tiny_checkpoint[0], dtype=torch.float32)
    prompt = lambda i: [5 + i % 7, 9, 2 + i % 5][: 1 + i % 3]
    rollout = dict(samples_per_prompt=4, top_k=20, eos_token_id=[1],
                   generator=torch.Generator().manual_seed(0), compile=True)
    calls = [  # (what, prompts, max_new_tokens, sampling)
        ("rollout, a long one: cache bucket 64", 8, 40, dict(temperature=1.0, top_p=0.95, **rollout)),
        ("rollout", 8, 12, dict(temperature=1.0, top_p=0.95, **rollout)),
        ("rollout, other T, p and length", 8, 20, dict(temperature=0.7, top_p=0.9, **rollout)),
        ("greedy evaluation, batch 64", 64, 12,
         dict(temperature=0.0, top_p=1.0, eos_token_id=[1], compile=True)),
        ("greedy evaluation, the tail of 200", 8, 12,
         dict(temperature=0.0, top_p=1.0, eos_token_id=[1], compile=True)),
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
    # a second paper step: no new graph, every bucket's buffers where they were
    for what, count, new, sampling in calls:
        generate(model, [prompt(i) for i in range(count)], new, **sampling)
    assert counter.frame_count == 5 and sorted(caches) == [(8, 32), (32, 32), (32, 64), (64, 32)]
    assert all(model.decode_buffers.caches[key][0] is caches[key][0] for key in caches)
    assert all(caches[key][0].keys[0].data_ptr() == addresses[key] for key in caches)
    torch._dynamo.reset()
