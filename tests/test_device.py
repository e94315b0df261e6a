"""The GPU, faithfully on a CPU: the no-grad code on the meta device (another device than the CPU, with
no values: a tensor made without device= mixes and fails, and every host read is seen), and one whole
grpo_step under a dispatch mode that fails on mixed devices and counts the reads of the device.
"""


import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import grpo
import step_log
from conftest import CharTokenizer, StepConfig, lora_tiny_model, one_grpo_step, reward_first_token_even
from credit import credit_weights, diagnostic_sums
from lora import RecentAdapters, apply_lora, sampling_copies
from model import Qwen3, Qwen3Config
from sampling import Completions, generate

HOST_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
              torch.ops.aten.nonzero.default)


def tensor_arguments(args, kwargs):
    return [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]


class DeviceChecks(TorchDispatchMode):
    """Fails on an op whose tensors are on different devices (a 0-d CPU tensor excepted, as CUDA takes it) and
    records each host read (.item(), bool(), int(): aten._local_scalar_dense or is_nonzero; nonzero; a copy
    to the CPU) under the label in self.phase. A read of a tensor made from host copies alone (self.host)
    is not one. With stub_reads (tensors without values), a read returns False for a bool, else `stub`.

    self.host maps each host copy's storage address to the tensor, which it keeps alive: a freed copy's
    address could be reused by a device tensor, whose read would then go uncounted."""

    def __init__(self, stub_reads=False, stub=0):
        super().__init__()
        self.stub_reads, self.stub, self.phase, self.reads, self.host = stub_reads, stub, "step", [], {}

    def on_host(self, tensor):
        self.host[tensor.untyped_storage().data_ptr()] = tensor

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = tensor_arguments(args, kwargs)
        devices = {t.device for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
        copying = func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)
        to_cpu = kwargs.get("device", tensors[0].device).type == "cpu" if tensors else False
        copy_to_host = copying and to_cpu and any(t.device.type != "cpu" for t in tensors)
        if len(devices) > 1 and not copy_to_host and func is not torch.ops.aten.copy_.default:
            raise AssertionError(f"{func} mixes devices {sorted(map(str, devices))}")
        from_host = bool(tensors) and all(t.untyped_storage().data_ptr() in self.host for t in tensors)
        if (func in HOST_READS and not from_host) or copy_to_host:
            self.reads.append(self.phase)
            if self.stub_reads and func is not torch.ops.aten.nonzero.default:
                return False if tensors[0].dtype == torch.bool else self.stub
        result = func(*args, **kwargs)
        if from_host:  # a tensor made from host tensors alone is on the host too
            for tensor in tensor_arguments(result, {}):
                self.on_host(tensor)
        return result


def test_generation_and_the_credit_passes_never_mix_devices_and_read_the_device_when_said():
    """generate, the training forward without grad, the adapter-off and exact passes and every credit method,
    on a model on the meta device: like a GPU it is not the CPU (a tensor made without device= would mix
    and fail) and its tensors have no values (every read of one to the host is seen, and stubbed). generate
    reads the device once every 8 decode steps (have all rows stopped?) and once at the end (the longest
    completion); the credit passes never. (FakeTensorMode's CUDA tensors would do, but a CPU build cannot
    index them: its indexing bindings take a CUDA device guard before any mode runs.)"""
    config = Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    with torch.device("meta"):
        model = apply_lora(Qwen3(config), rank=4, alpha=8)
    with DeviceChecks(stub_reads=True, stub=17) as checks:
        with sampling_copies(model):
            sampled = generate(model, [[5, 9, 2], [4, 11]], 17, temperature=1.0, top_p=0.9, top_k=20,
                               eos_token_id=[1], samples_per_prompt=4, return_logprobs=True)
            generate(model, [[5, 9, 2], [4, 11]], 17, temperature=0.0, top_p=1.0, eos_token_id=[1])
        # steps 8 and 16, the end
        assert all(t.device.type == "meta" for t in sampled) and len(checks.reads) == 2 * (2 + 1)
        checks.reads.clear()
        tokens, mask = sampled[0], sampled[1]
        prompts = [[5, 9, 2]] * 4 + [[4, 11]] * 4
        with torch.no_grad():
            logprobs, entropies, hidden = grpo.completion_forward(model, prompts, tokens, mask)
            model.recent_adapters = RecentAdapters(model, torch.optim.SGD(model.parameters(), lr=0.1), k=2)
            model.recent_adapters.push()  # an older adapter for arca-recent's pass
            for credit, precision in (("arca", "bf16"), ("arca", "exact"), ("arca-recent", "bf16")):
                config = StepConfig(credit=credit, beta=0.1, arca_precision=precision)
                inputs = grpo.credit_inputs(model, prompts, tokens, mask, logprobs, entropies, hidden, config,
                                            valid=mask)
                methods = step_log.measurable(inputs)
                assert len(methods) == 9 - (credit == "arca"), methods  # arca-recent's pass ran only for it
                for method in methods:
                    weights = credit_weights(method, mask, power=2.0, shuffle_seeds=range(8), **inputs)
                    assert weights.device.type == "meta"
                    assert diagnostic_sums(weights, mask).device.type == "meta"
                assert grpo.k3_kl(logprobs, inputs["ref_token_logprobs"], mask, 8).device.type == "meta"
            step_log.all_method_weights(model, prompts, tokens, mask, power=2.0)
        assert checks.reads == []  # the credit passes never wait for the device
    with pytest.raises(AssertionError, match="mixes devices"), DeviceChecks():  # the check can fail
        torch.ones(3, device="meta") + torch.ones(3)


class MetaStepLog:
    """What grpo_step hands its log, kept; every update is finite (a meta tensor has no value to test)."""

    def __init__(self):
        self.tensors = []

    def sampled(self, rollout):
        self.tensors += [rollout.tokens, rollout.mask, rollout.ends_with_eos, rollout.prompt_index]

    def scored(self, completions, scores, timeouts):
        pass

    def micro_batch(self, rows, mask, inputs, weights, loss, kl):
        self.tensors += [mask, weights, loss, kl]

    def update(self, grad_norm):
        self.tensors.append(grad_norm)
        return True


@pytest.mark.parametrize("credit", ["arca", "arca-shuffled", "entropy-gate"])
def test_a_whole_grpo_step_on_the_meta_device_never_mixes_devices(credit, monkeypatch):
    """grpo_step end to end on a meta-device model: sample_rollouts (and its eos_positions), the rewards
    tensor, group_advantages, loss_mask, the loss's normaliser, each micro-batch's forward, credit, loss
    and backward, the clipping and the update. A tensor made on the CPU by mistake meets a meta one and
    fails. The completions' copy to the host is the one thing replaced (a meta tensor has no values):
    the tokens it would have read."""
    model_config = Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                               tie_word_embeddings=True)
    with torch.device("meta"):
        model = apply_lora(Qwen3(model_config), rank=4, alpha=8)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    lengths = [6, 3, 6, 1, 2, 6, 6, 4]  # what the host copy would say

    def read_completions(rollout, tokenizer):
        return Completions(["1"] * 8, lengths, [n < 6 for n in lengths], [[7] * n for n in lengths])

    monkeypatch.setattr(grpo, "read_completions", read_completions)
    config = StepConfig(credit=credit, beta=0.1, max_new_tokens=6, loss_type="token", mask_truncated=True,
                        credit_eos=False)
    log = MetaStepLog()
    with DeviceChecks(stub_reads=True, stub=1):  # int(prompt_index.max()) reads 1: two prompts
        rollout, rewards = one_step_on_meta(model, optimizer, scheduler, config, log)
    tensors = [rollout.tokens, rewards, *log.tensors] + [p.grad for p in trainable]
    assert all(t.device.type == "meta" for t in tensors)
    assert len(log.tensors) == 4 + 2 * 4 + 1  # two micro-batches and one update went through


def one_step_on_meta(model, optimizer, scheduler, config, log):
    tokenizer = CharTokenizer()
    tokenizer.eos_token_id = [1, 2]  # a list of EOS ids, as Qwen3's tokenizer gives
    return grpo.grpo_step(model, optimizer, scheduler, [[5, 9, 2], [4, 11]], ["0", "0"], tokenizer,
                          lambda texts, golds: ([1.0, 0.0] * 4, 0), config, None, log)  # no meta generator


def test_a_grpo_step_reads_the_device_a_known_number_of_times(tiny_checkpoint, monkeypatch):
    """One whole grpo_step on real CPU tensors under DeviceChecks (and .cpu() and .tolist() counted): per
    decode step one read every 8 steps, per micro-batch none, per update one (its statistics and the grad
    norm together), and per step a copy of the completions to the host and two in the advantages. The
    optimiser's own (CPU step counters) aside."""
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
    labelled(step_log.StepLog, "micro_batch", "micro-batch")
    labelled(step_log.StepLog, "update", "update")
    labelled(optimizer, "step", "optimiser")
    real_cpu, real_tolist = torch.Tensor.cpu, torch.Tensor.tolist

    def cpu(tensor, *args, **kwargs):  # a copy to the host: a read; what is made from it stays on the host
        checks.reads.append(checks.phase)
        copy = real_cpu(tensor, *args, **kwargs)
        checks.on_host(copy)
        return copy

    def tolist(tensor):
        if tensor.untyped_storage().data_ptr() not in checks.host:
            checks.reads.append(checks.phase)
        return real_tolist(tensor)

    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    # 2 micro-batches of 1 prompt x 4
    config = StepConfig(credit="arca", beta=0.05, max_new_tokens=17, diagnose_all=True)
    with checks:
        one_grpo_step(model, optimizer, scheduler, [[5, 9, 2], [4, 11]], ["0", "0"], reward_first_token_even,
                      config, torch.Generator().manual_seed(0))
    counts = {phase: checks.reads.count(phase) for phase in ("decode", "micro-batch", "update", "step")}
    assert counts == {"decode": 2 + 1, "micro-batch": 0, "update": 1, "step": 1 + 2}, checks.reads


# what torch refuses on CUDA under use_deterministic_algorithms(True) (its documentation's list, the ops
# a training step could reach): func -> a test of the call's arguments (None: always)
REFUSED_ON_CUDA = {
    torch.ops.aten.cumsum.default: lambda args, kwargs: args[0].is_floating_point(),
    torch.ops.aten.cumsum.out: lambda args, kwargs: args[0].is_floating_point(),
    torch.ops.aten.histc.default: None,
    torch.ops.aten.bincount.default: lambda args, kwargs: len(args) > 1 and args[1] is not None,
    torch.ops.aten.median.dim: None,
    torch.ops.aten.nanmedian.dim: None,
    torch.ops.aten.put_.default: None,
    torch.ops.aten.scatter_reduce.two: lambda args, kwargs: args[4] == "prod",
    torch.ops.aten.nll_loss_forward.default: None,
    torch.ops.aten.nll_loss2d_forward.default: None,
    torch.ops.aten.embedding_bag.default: None,
    torch.ops.aten.grid_sampler_2d_backward.default: None,
    torch.ops.aten.avg_pool3d_backward.default: None,
    torch.ops.aten.reflection_pad1d_backward.default: None,
    torch.ops.aten.upsample_bilinear2d_backward.default: None,
}


class RefusedOnCuda(TorchDispatchMode):
    """Records each dispatched op that a GPU would refuse in deterministic mode."""

    def __init__(self):
        super().__init__()
        self.refused = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in REFUSED_ON_CUDA and (REFUSED_ON_CUDA[func] is None or REFUSED_ON_CUDA[func](args, kwargs)):
            self.refused.append(str(func))
        return func(*args, **kwargs)


def test_a_deterministic_run_dispatches_nothing_a_gpu_refuses_in_deterministic_mode(char_run_setup, tmp_path,
                                                                                  monkeypatch):
    """--deterministic turns torch's deterministic algorithms on, and a run (a step with every signal
    diagnosed, an evaluation with sampling) then calls no op that CUDA refuses in that mode: the
    samplers' running sums take sampling.cumulative_sum's fixed order. Without the flag the same run
    does call one (a float cumsum): the check can fail. The GPU samplers (top-k's and the sorted one)
    too, on the same uniforms as without the flag."""
    import train
    from conftest import parity_reward, run_args
    from sampling import sample_next_token, sample_top_k_top_p, sample_top_p_sorted

    monkeypatch.setattr(train, "score", parity_reward)
    options = ("--steps", "1", "--eval-every", "1", "--diagnose-all")
    with RefusedOnCuda() as plain:
        train.main(run_args(char_run_setup, tmp_path / "plain", *options))
    assert "aten.cumsum.default" in plain.refused
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3  # (B, V)
    uniforms = torch.rand(6, generator=torch.Generator().manual_seed(1))  # (B,)
    samplers = lambda: [sample_top_k_top_p(logits, 5, 0.9, uniforms=uniforms),
                        sample_top_p_sorted(logits.softmax(-1), 0.9, uniforms=uniforms),
                        sample_next_token(logits, 1.0, 1.0, uniforms=uniforms[:, None])]
    expected = samplers()
    try:
        with RefusedOnCuda() as checked:
            train.main(run_args(char_run_setup, tmp_path / "deterministic", *options, "--deterministic"))
            assert torch.are_deterministic_algorithms_enabled()
            drawn = samplers()
    finally:
        torch.use_deterministic_algorithms(False)
    assert checked.refused == []
    assert all(torch.equal(a, b) for a, b in zip(drawn, expected))
    config = json.loads((tmp_path / "deterministic" / "config.json").read_text())["config"]
    assert config["deterministic"] is True
