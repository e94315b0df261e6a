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


def test_the_compiled_step_attends_only_to_the_slots_its_sequence_has_reached(tiny_checkpoint, monkeypatch):
    """At step s of a prompt batch of width P, attention reads ceil((P + s + 1) / ATTEND_BUCKET) x
    ATTEND_BUCKET keys, not the whole cache: recorded at every layer of the step function the compiled
    path calls (run eagerly here, so that Python sees each call). Compiled, every attended length is one
    graph, and the tokens are eager's."""
    from torch._dynamo.utils import counters

    import compiled_decode

    monkeypatch.setattr(compiled_decode, "CACHE_BUCKET", 64)
    monkeypatch.setattr(compiled_decode, "ATTEND_BUCKET", 16)
    model = Qwen3.from_pretrained(tiny_checkpoint[0], dtype=torch.float32)
    prompts, greedy = [[5, 9, 2, 7], [4, 11], [3]], dict(temperature=0, top_p=1.0, eos_token_id=[])
    eager_tokens, _ = generate(model, prompts, 50, **greedy)
    keys_read, in_step, real_attention = [], [], torch.nn.functional.scaled_dot_product_attention

    def step_function(*args, **kwargs):  # the decode step, eager, one list of key lengths per call
        keys_read.append([])
        in_step.append(True)
        try:
            return compiled_decode.decode_step(*args, **kwargs)
        finally:
            in_step.pop()

    def attention(q, k, v, **kwargs):
        if in_step:  # not the prefill
            keys_read[-1].append(k.shape[2])
        return real_attention(q, k, v, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(compiled_decode, "compiled_decode_step", lambda device: step_function)
        patched.setattr(torch.nn.functional, "scaled_dot_product_attention", attention)
        tokens, _ = generate(model, prompts, 50, compile=True, **greedy)
    layers = model.config.num_hidden_layers
    assert keys_read == [[-(-(4 + step + 1) // 16) * 16] * layers for step in range(50)]
    assert keys_read[0] == [16] * layers and keys_read[-1] == [64] * layers  # of a 64-slot cache
    assert torch.equal(tokens, eager_tokens)
    monkeypatch.setattr(compiled_decode, "_compiled_decode_step", None)
    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    assert torch.equal(generate(model, prompts, 50, compile=True, **greedy)[0], eager_tokens)
    assert counters["stats"]["unique_graphs"] - graphs == 1  # attended lengths 16, 32, 48 and 64
    torch._dynamo.reset()


def test_a_run_reserves_its_largest_decode_buffers_once_and_an_eager_run_none(char_run_setup):
    """train.load_model with --compile reserves the decode buffers of the run's largest call: evaluation
    ordered calls, a small batch first and then longer prompts, never move them (no graph is recorded
    again). Without --compile nothing is allocated for the compiled step."""
    import compiled_decode
    import train
    from conftest import run_args

    cpu = torch.device("cpu")
    options = ("--max-prompt-tokens", "40", "--max-new-tokens", "20", "--eval-batch-size", "16")
    eager, _ = train.load_model(train.parse_args(run_args(char_run_setup, "unused", *options))[0], cpu, 0, 1)
    config, _, _ = train.parse_args(run_args(char_run_setup, "unused", *options, "--compile"))
    model, _ = train.load_model(config, cpu, 0, 1)
    assert getattr(eager, "decode_buffers", None) is None
    buffers = model.decode_buffers
    addresses = [buffers.keys[0].data_ptr(), buffers.bias.data_ptr()]
    rows, length = (16, compiled_decode.cache_length(40 + 20))
    assert buffers.capacity == rows * model.config.num_key_value_heads * (length + 16) * model.config.head_dim
    step = lambda *args, **kwargs: compiled_decode.decode_step(*args, **kwargs)[:4]  # eager: quick
    compiled_decode._compiled_decode_step, real = step, compiled_decode._compiled_decode_step
    try:
        for count, width in ((2, 3), (16, 3), (16, 40), (5, 40)):  # a batch of 2, then longer prompts
            prompts = [[5] * width] * count
            generate(model, prompts, 20, temperature=0, top_p=1.0, eos_token_id=[], compile=True)
            assert model.decode_buffers is buffers
            assert [buffers.keys[0].data_ptr(), buffers.bias.data_ptr()] == addresses
    finally:
        compiled_decode._compiled_decode_step = real
    assert getattr(eager, "decode_buffers", None) is None


def test_the_recompile_limit_is_set_under_the_names_this_torch_has(monkeypatch):
    """torch 2.6 (the floor) calls it cache_size_limit and fail_on_cache_limit_hit, 2.7 and later
    recompile_limit and fail_on_recompile_limit_hit; either way the compiled step's patch applies."""
    import types

    import compiled_decode

    options = compiled_decode.recompile_limit_options()
    assert options == {"recompile_limit": compiled_decode.MAX_GRAPHS, "fail_on_recompile_limit_hit": True}
    with torch._dynamo.config.patch(**options):
        assert torch._dynamo.config.recompile_limit == compiled_decode.MAX_GRAPHS
    old_names = types.SimpleNamespace(cache_size_limit=8, fail_on_cache_limit_hit=False)
    monkeypatch.setattr(torch._dynamo, "config", old_names)
    assert compiled_decode.recompile_limit_options() == {"cache_size_limit": compiled_decode.MAX_GRAPHS,
                                                         "fail_on_cache_limit_hit": True}


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
    compiled_decode.reserve_decode_buffers(model, rows=64, tokens=3 + 40)  # as train.load_model does
    reserved = model.decode_buffers.keys[0].data_ptr()
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
    assert counter.frame_count == 5 and sorted(caches) == [(8, 32), (32, 32), (32, 64), (64, 32), (64, 64)]
    assert all(model.decode_buffers.caches[key][0] is caches[key][0] for key in caches)
    assert all(caches[key][0].keys[0].data_ptr() == addresses[key] == reserved for key in caches)
    torch._dynamo.reset()
