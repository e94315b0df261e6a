"""Durable runs (runs.py, train.run): real signals to a real child process, real files on disk, and a
resumed run compared bit for bit with an uninterrupted one.
"""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file

import evaluation
import runs
import train
from conftest import PARITY, REPO, find_checkpoint_step, metrics_of, parity_reward, run_args
from lora import apply_lora, load_adapter
from model import Qwen3

METRIC_FIELDS = {
    "step", "reward_mean", "reward_std", "zero_spread_groups", "loss", "kl", "logprob_gap", "completion_len",
    "truncated", "weight_gini", "effective_token_ratio", "top10_mass", "arca_norm_mean", "arca_norm_max",
    "grad_norm", "lr", "rollout_s", "reward_s", "train_s", "tokens_per_s", "peak_memory_gb", "entropy",
    "skipped_update", "arca_exact_corr", "arca_floor_ratio", "gini/uniform", "gini/arca",
    "effective_token_ratio/divergence", "top10_mass/entropy",
}


def test_three_step_run_writes_every_output(char_run_setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "score", parity_reward)
    out = tmp_path / "run"
    train.main(run_args(char_run_setup, out, "--steps", "3", "--eval-every", "2", "--save-every", "2",
                        "--lora-dropout", "0"))
    assert "step 3/3: reward" in capsys.readouterr().out  # not a terminal: plain progress lines, no bar
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(METRIC_FIELDS <= set(m) for m in metrics)
    # dropout 0, fp32: the sampler's log-probs are the trainer's
    assert all(m["logprob_gap"] < 1e-5 for m in metrics)
    # the lr each step ran at (warm-up 3)
    assert [m["lr"] for m in metrics] == pytest.approx([0.0, 5e-2 / 3, 2 * 5e-2 / 3])
    # B = 0 until the first update at a non-zero lr (step 2's): ARCA is exactly 0 and uniform, then the
    # adapter shows
    assert all(m["arca_norm_mean"] == 0.0 and m["weight_gini"] < 1e-6 for m in metrics[:2])
    assert metrics[2]["arca_norm_mean"] > 1e-4 and metrics[2]["weight_gini"] > 1e-3
    # fidelity at the evaluation steps (2, 3); fp32 and dropout 0: the credit that trains is the exact score
    assert metrics[0]["arca_exact_corr"] is None
    assert metrics[2]["arca_exact_corr"] == pytest.approx(1.0, abs=1e-5)
    assert metrics[2]["arca_floor_ratio"] == pytest.approx(1.0, abs=1e-4)
    evals = json.loads((out / "eval.json").read_text())
    keys = {"greedy_accuracy", "pass@2", "greedy_accuracy_strict", "pass@2_strict",
            "greedy_accuracy_symbolic", "pass@2_symbolic"}
    assert [e["step"] for e in evals] == [0, 2, 3] and all(keys <= set(e) for e in evals)
    # the demo preset trains on symbolic
    assert all(e["greedy_accuracy"] == e["greedy_accuracy_symbolic"] for e in evals)
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
    base = transformers.Qwen3ForCausalLM.from_pretrained(char_run_setup / "model")
    peft_model = PeftModel.from_pretrained(base, out / "adapter").eval()
    ids = torch.tensor([[3, 11, 4, 13]])
    with torch.no_grad():
        torch.testing.assert_close(ours.eval().lm_head(ours(ids)), peft_model(input_ids=ids).logits,
                                   atol=1e-4, rtol=1e-4)

    with pytest.raises(SystemExit, match="already holds a run"):  # a finished run is never overwritten
        train.main(run_args(char_run_setup, out, "--steps", "3"))
    with pytest.raises(SystemExit, match="credit: 'arca' -> 'uniform'"):  # resume refuses a different config
        train.main(run_args(char_run_setup, out, "--steps", "4", "--credit", "uniform", "--resume"))
    report = train.report([out])
    assert f"| `{out}` | arca | 4 |" in report
    assert "Gini" in report
    assert "pass@k strict" in report
    assert "unfinished" not in report


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


@pytest.mark.parametrize("credit", ["arca", "arca-recent"])
def test_resume_after_sigkill_gives_the_identical_adapter(char_run_setup, tmp_path, monkeypatch, credit):
    """Killed after step 2's checkpoint, resumed: the adapter of the uninterrupted run, bit for bit; with
    arca-recent (k 2) the checkpoint carries its ring of older adapters, which step 4 reads."""
    from safetensors.torch import load_file

    monkeypatch.setattr(train, "score", parity_reward)

    common = ("--steps", "4", "--save-every", "2", "--eval-every", "4", "--credit", credit,
              "--arca-recent-updates", "2")
    train.main(run_args(char_run_setup, tmp_path / "straight", *common))
    killed = subprocess.run([sys.executable, "-c", KILLER.format(repo=str(REPO)),
                             *run_args(char_run_setup, tmp_path / "killed", *common)],
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "killed" / "adapter").exists()
    train.main(run_args(char_run_setup, tmp_path / "killed", *common, "--resume"))
    straight = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    # trained, not trivially equal
    assert all(t.abs().sum() > 0 for k, t in straight.items() if "lora_B" in k)
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    steps = [row["step"] for row in metrics_of(tmp_path / "killed")]
    assert steps == [1, 2, 3, 4]


FAULTS = """
import os, signal, sys, pathlib, shutil
import torch
sys.path.insert(0, {repo!r})
import evaluation, grpo, runs, train
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
train.score = evaluation.score_symbolic = lambda texts, golds, config: parity(texts, golds)
evaluation.score_strict = parity
wrap(grpo, "sample_rollouts", "rollout")
wrap(train, "score", "reward")
wrap(evaluation, "evaluate", "eval")
real_step = torch.optim.AdamW.step
def step_then_hit(self, *args, **kwargs):
    result = real_step(self, *args, **kwargs)
    hit("after_update")
    return result
torch.optim.AdamW.step = step_then_hit
real_save = runs.save_checkpoint
def save(out, model, optimizer, scheduler, step, rng, config):
    if len(plan) < 4 or step != plan[3]:
        return real_save(out, model, optimizer, scheduler, step, rng, config)
    operations = ((shutil, "rmtree"), (pathlib.Path, "rename"), (pathlib.Path, "mkdir"), (torch, "save"),
                  (os, "replace"))
    originals = [getattr(owner, name) for owner, name in operations]
    for owner, name in operations:  # inside this save only, each file operation is a point to die at
        wrap(owner, name, "swap")
    try:
        return real_save(out, model, optimizer, scheduler, step, rng, config)
    finally:
        for (owner, name), original in zip(operations, originals):
            setattr(owner, name, original)
runs.save_checkpoint = save
train.main(sys.argv[1:])
"""


def start_child(setup, out, plan, *args):
    script = FAULTS.format(repo=str(REPO), plan=plan)
    return subprocess.Popen([sys.executable, "-c", script, *run_args(setup, out, *args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_child(setup, out, plan, *args):
    child = start_child(setup, out, plan, *args)
    stdout, stderr = child.communicate(timeout=120)
    return subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)


def run_outputs(out):
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = json.loads((out / "eval.json").read_text())
    return adapter, [m["step"] for m in metrics], [(m["step"], m["reward_mean"],
                                                    m["loss"]) for m in metrics], evals


def assert_same_run(a, b):
    adapter_a, steps_a, values_a, evals_a = run_outputs(a)
    adapter_b, steps_b, values_b, evals_b = run_outputs(b)
    assert adapter_a.keys() == adapter_b.keys()
    assert all(torch.equal(adapter_a[k], adapter_b[k]) for k in adapter_a)
    assert steps_a == steps_b and values_a == values_b  # each step once, with the same rollouts
    assert evals_a == evals_b


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
    # right after step 3's optimizer.step(): its update counts once
    (("after_update", 3, int(signal.SIGINT)), 130, 3),
    (("eval", 2, int(signal.SIGTERM)), 143, 2),  # during step 2's evaluation
    # two Ctrl-C: stop at once; the adapter had not moved, so step 2 is saved
    (("rollout", 3, "twice:2"), 130, 2),
    # two SIGTERMs during an evaluation: the evaluation is redone on resume
    (("eval", 2, "twice:15"), 130, 2),
    (("reward", 3, "raise"), 1, 2),  # an error inside a step: the last finished step is saved
])
def test_stop_at_any_moment_then_resume_is_bit_identical(char_run_setup, straight_run, tmp_path, monkeypatch,
                                                         plan, code, saved_step):
    out = tmp_path / "run"
    # no periodic save before step 3
    result = run_child(char_run_setup, out, plan, *DURABLE, "--save-every", "3")
    assert result.returncode == code, result.stderr[-2000:]
    assert find_checkpoint_step(out) == saved_step
    assert not (out / "adapter").exists()
    monkeypatch.setattr(train, "score", lambda texts, golds, config: PARITY(texts, golds))
    monkeypatch.setattr(evaluation, "score_symbolic", lambda texts, golds, config: PARITY(texts, golds))
    monkeypatch.setattr(evaluation, "score_strict", PARITY)
    train.main(run_args(char_run_setup, out, *DURABLE, "--save-every", "3", "--resume"))
    assert_same_run(out, straight_run)


def test_kill_at_every_point_of_the_checkpoint_swap(char_run_setup, tmp_path, monkeypatch):
    args = ("--steps", "3", "--save-every", "1", "--eval-every", "3")
    straight = tmp_path / "straight"
    assert run_child(char_run_setup, straight, ("none", 0, 0), *args).returncode == 0
    monkeypatch.setattr(train, "score", lambda texts, golds, config: PARITY(texts, golds))
    monkeypatch.setattr(evaluation, "score_symbolic", lambda texts, golds, config: PARITY(texts, golds))
    monkeypatch.setattr(evaluation, "score_strict", PARITY)
    # The save of step 2 replaces step 1's checkpoint: die before each of its file operations (9: rmtree,
    # mkdir, the two adapter files, state.pt, rmtree, two renames, rmtree), one child per point, two at a
    # time.
    codes, point = {}, 1
    while 0 not in codes.values():
        children = {p: start_child(char_run_setup, tmp_path / f"killed-{p}", ("swap", p, "kill", 2),
                                   *args) for p in (point, point + 1)}
        codes.update({p: (child.communicate(timeout=120),
                          child.returncode)[1] for p, child in children.items()})
        point += 2
    killed = [p for p in sorted(codes) if codes[p] == -9]
    # then, past the last one, the run finished
    assert killed == list(range(1, len(killed) + 1)) and len(killed) >= 9, codes
    for point in killed:
        out = tmp_path / f"killed-{point}"
        assert find_checkpoint_step(out) in (1, 2)
        # resumes, and saves again (steps 2 and 3)
        train.main(run_args(char_run_setup, out, *args, "--resume"))
        assert_same_run(out, straight)
        assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]


def test_a_checkpoint_restores_its_rng_states_whatever_the_device(char_run_setup, tmp_path, monkeypatch):
    """load_state(path, device) keeps the RNG states as CPU byte tensors (torch.set_rng_state and a
    generator's set_state take nothing else); the optimiser's moments go to `device` (meta here, standing
    in for a GPU)."""
    monkeypatch.setattr(train, "score", parity_reward)
    out = tmp_path / "run"
    train.main(run_args(char_run_setup, out, "--steps", "2", "--save-every", "1"))
    state = runs.load_state(runs.find_checkpoint(out) / "state.pt", torch.device("meta"))
    rng = state["rng"][0]
    assert rng["torch"].device.type == "cpu"
    assert rng["torch"].dtype == torch.uint8
    assert rng["sampler"].device.type == "cpu"
    generator = torch.Generator()
    runs.set_rng_states(rng, generator)
    assert torch.equal(torch.get_rng_state(), rng["torch"])
    assert torch.equal(generator.get_state(), rng["sampler"])
    moments = [value for moment in state["optimizer"]["state"].values() for name, value in moment.items()
               if name != "step"]
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
    files = {out / "checkpoint" / "important.bin": b"keep", out / "adapter" / "mine.bin": b"me",
             out / "eval.json": b"[1]"}
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
    assert result.returncode == -9 and (out / "config.json").exists() and runs.find_checkpoint(out) is None
    (out / "notes.txt").write_text("mine")  # a file the user added stays
    train.main(run_args(char_run_setup, out, "--steps", "2"))
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (out / "notes.txt").read_text() == "mine" and (out / "adapter").is_dir()


def test_resume_drops_a_torn_metrics_line_and_ignores_how_out_is_spelled(char_run_setup, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setattr(train, "score", parity_reward)
    monkeypatch.chdir(tmp_path)
    train.main(run_args(char_run_setup, "run", "--steps", "2", "--save-every", "1"))
    with open(tmp_path / "run" / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3, "reward_me')  # the disk filled up mid-line
    # absolute now
    train.main(run_args(char_run_setup, tmp_path / "run", "--steps", "3", "--save-every", "1", "--resume"))
    assert [row["step"] for row in metrics_of(tmp_path / "run")] == [1, 2, 3]


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
