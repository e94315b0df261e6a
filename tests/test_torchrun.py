"""torchrun: data-parallel GRPO on 2 CPU processes (gloo) makes the one-process run.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, find_checkpoint_step, metrics_of, run_args

TORCHRUN_ENTRY = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import evaluation, grpo, train
parity = lambda texts, golds, *rest: ([float(sum(map(ord, text)) % 2) for text in texts], 0)
train.score = evaluation.score_symbolic = lambda texts, golds, config: parity(texts, golds)
evaluation.score_strict = parity
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


TWO_RANKS = ("--steps", "3", "--save-every", "2", "--eval-every", "3", "--lora-dropout", "0",
             "--prompts-per-micro-batch", "2",
             "--micro-batches", "1")


def torchrun(setup, out, tmp_path, *args, processes=2, fault=None):
    entry = tmp_path / f"entry_{abs(hash(str(out)))}.py"
    entry.write_text(TORCHRUN_ENTRY.format(repo=str(REPO), fault=fault))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               str(entry), *run_args(setup, out, *args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


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
    metrics_one, metrics_two = metrics_of(one), metrics_of(two)
    # the same completions
    assert [m["reward_mean"] for m in metrics_one] == [m["reward_mean"] for m in metrics_two]
    assert [m["completion_len"] for m in metrics_one] == [m["completion_len"] for m in metrics_two]
    assert len({m["reward_mean"] for m in metrics_one}) > 1 or metrics_one[0]["reward_mean"] not in (0.0, 1.0)
    evals_one, evals_two = (json.loads((d / "eval.json").read_text()) for d in (one, two))
    assert [e["greedy_accuracy"] for e in evals_one] == [e["greedy_accuracy"] for e in evals_two]
    # per-problem seeds: sampling agrees too
    assert [e["pass@2"] for e in evals_one] == [e["pass@2"] for e in evals_two]
    assert json.loads((two / "config.json").read_text())["processes"] == 2


@pytest.mark.parametrize("options", [
    ("--loss-type", "token", "--credit", "entropy-gate"),
    ("--loss-type", "dr_grpo", "--credit", "arca-shuffled", "--scale-rewards", "none", "--mask-truncated",
     "--max-new-tokens", "16"),  # longer, so that some completions end and train
], ids=["token-loss-entropy-gate", "dr_grpo-loss-arca-shuffled-scale-none-mask-truncated"])
def test_two_processes_make_the_one_process_run_under_each_loss(char_run_setup, tmp_path, options):
    """The token and dr_grpo normalisers, entropy-gate's threshold and arca-shuffled's seeds are taken
    over the whole step on every rank: 2 processes train the adapter 1 process does."""
    runs = {processes: tmp_path / f"processes-{processes}" for processes in (1, 2)}
    for processes, out in runs.items():
        result = torchrun(char_run_setup, out, tmp_path, *TWO_RANKS, *options, processes=processes)
        assert result.returncode == 0, result.stderr[-3000:]
    adapter_one, adapter_two = (load_file(d / "adapter" / "adapter_model.safetensors") for d in runs.values())
    # the all-reduce sums in another order: 2e-5 apart after 3 steps of 16 tokens, on weights of about 0.2
    assert all((adapter_one[k] - adapter_two[k]).abs().max() < 1e-4 for k in adapter_one)
    assert any(adapter_one[k].abs().sum() > 0 for k in adapter_one if "lora_B" in k)  # it trained
    metrics_one, metrics_two = metrics_of(runs[1]), metrics_of(runs[2])
    for key in ("loss", "grad_norm"):  # Adam's first steps barely see a gradient's scale: compare it
        assert [m[key] for m in metrics_two] == pytest.approx([m[key] for m in metrics_one], rel=1e-4), key
    config = json.loads((runs[2] / "config.json").read_text())["config"]
    assert (config["loss_type"], config["credit"]) == (options[1], options[3])
    assert any(0 < m["truncated"] < 1 for m in metrics_two)  # --mask-truncated has something to mask


def test_a_failing_rank_ends_every_process(char_run_setup, one_and_two_processes):
    _, _, tmp_path = one_and_two_processes
    started = time.perf_counter()
    result = torchrun(char_run_setup, tmp_path / "failing", tmp_path, *TWO_RANKS, fault=(1, 2, "raise"))
    assert result.returncode != 0 and time.perf_counter() - started < 120
    assert "injected failure on rank 1" in result.stderr


def test_a_killed_two_process_run_resumes_on_two_processes(char_run_setup, one_and_two_processes):
    _, two, tmp_path = one_and_two_processes
    out = tmp_path / "killed"
    # rank 0 dies in step 3, after step 2's save
    killed = torchrun(char_run_setup, out, tmp_path, *TWO_RANKS, fault=(0, 3, "kill"))
    assert killed.returncode != 0 and find_checkpoint_step(out) == 2 and not (out / "adapter").exists()
    refused = torchrun(char_run_setup, out, tmp_path, *TWO_RANKS, "--resume", processes=1)
    assert refused.returncode != 0
    assert "trained on 2 process(es), this is 1" in refused.stdout + refused.stderr
    resumed = torchrun(char_run_setup, out, tmp_path, *TWO_RANKS, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [row["step"] for row in metrics_of(out)] == [1, 2, 3]
    adapter, expected = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (out, two))
    assert all(torch.equal(adapter[k], expected[k]) for k in adapter)


def test_prompts_that_do_not_divide_among_the_processes_are_refused(char_run_setup, one_and_two_processes):
    _, _, tmp_path = one_and_two_processes
    result = torchrun(char_run_setup, tmp_path / "odd", tmp_path, *TWO_RANKS, "--prompts-per-micro-batch",
                      "3")
    assert result.returncode != 0
    assert "3 prompts per step" in result.stdout + result.stderr
    assert "among 2 processes" in result.stdout + result.stderr
