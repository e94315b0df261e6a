"""--report-to: the trackers get metrics.jsonl's figures at its steps, evaluation figures and sample tables
at evaluation steps; a missing package stops the run before it starts, a failing tracker never ends it.
wandb and trackio are fakes here (no network, nothing installed); TensorBoard's event files are read back.
"""

import json
import subprocess
import sys
import types

import pytest

import train
from conftest import REPO, metrics_of, parity_reward, run_args
from evaluation import SAMPLE_COLUMNS
from trackers import Tracker

STEPS = ("--steps", "2", "--eval-every", "2")


class FakeRun:
    """What train.py reaches of a wandb run or of the trackio module: log(values, step) and finish()."""

    def __init__(self, fail_on_call=None):
        self.logged, self.finished, self.fail_on_call = [], False, fail_on_call

    def log(self, values, step):
        if len(self.logged) + 1 == self.fail_on_call:
            raise ConnectionError("the tracker's server went away")
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


class FakeTable:
    def __init__(self, columns, data):
        self.columns, self.data = columns, data


def fake_wandb(run):
    module = types.ModuleType("wandb")
    module.Table = FakeTable
    module.init = lambda project, name, dir, config: run
    return module


def fake_trackio(run):
    module = types.ModuleType("trackio")
    module.Table, module.log, module.finish = FakeTable, run.log, run.finish
    module.init = lambda project, name, config: run
    return module


def numbers(values):
    return {name: float(value) for name, value in values.items() if isinstance(value, (int, float))}


def expected_logs(out):
    """(step, values) in the order a tracker must get them: step 0's evaluation, then each step's metrics
    and, at an evaluation step, its figures and its table of sampled completions."""
    evals = {e["step"]: e for e in json.loads((out / "eval.json").read_text())}
    metrics = {row.pop("step"): numbers(row) for row in metrics_of(out)}
    expected = []
    for step in range(max(metrics) + 1):
        if step in metrics:
            expected.append((step, metrics[step]))
        if step in evals:
            expected.append((step, numbers({f"eval/{k}": v for k, v in evals[step].items() if k != "step"})))
            expected.append((step, "eval/samples"))
    return expected


@pytest.mark.parametrize("kind, make_module", [("wandb", fake_wandb), ("trackio", fake_trackio)])
def test_a_tracker_gets_the_metrics_jsonl_figures_and_sample_tables(char_run_setup, tmp_path, monkeypatch,
                                                                    kind, make_module):
    monkeypatch.setattr(train, "score", parity_reward)
    run = FakeRun()
    monkeypatch.setitem(sys.modules, kind, make_module(run))
    out = tmp_path / kind
    train.main(run_args(char_run_setup, out, *STEPS, "--report-to", kind))
    logged = [(step, "eval/samples" if "eval/samples" in values else values) for step, values in run.logged]
    as_text = lambda logs: json.dumps(logs, sort_keys=True)  # NaN equals NaN as text
    assert as_text(logged) == as_text(expected_logs(out)) and run.finished
    tables = [values["eval/samples"] for _, values in run.logged if "eval/samples" in values]
    assert len(tables) == 2 and tables[0].columns == SAMPLE_COLUMNS and len(tables[0].data) > 0
    assert all(len(row) == len(SAMPLE_COLUMNS) for row in tables[0].data)


def test_a_failing_tracker_is_one_warning_and_the_run_goes_on(char_run_setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "score", parity_reward)
    run = FakeRun(fail_on_call=1)
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(run))
    out = tmp_path / "failing"
    train.main(run_args(char_run_setup, out, *STEPS, "--report-to", "wandb"))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "--report-to wandb failed" in line]
    assert warnings == ["warning: --report-to wandb failed (ConnectionError: the tracker's server went "
                        "away); the run goes on without it"]
    assert [row["step"] for row in metrics_of(out)] == [1, 2] and (out / "adapter").is_dir()
    assert run.logged == [] and not run.finished  # quiet after its failure


def test_a_missing_tracker_package_stops_the_run_before_it_starts(char_run_setup, tmp_path):
    """One line on stderr that says what to install, a non-zero exit, no traceback, no run directory."""
    out = tmp_path / "missing"
    args = run_args(char_run_setup, out, *STEPS, "--report-to", "trackio")
    program = (f"import sys; sys.path.insert(0, {str(REPO)!r}); sys.modules['trackio'] = None; "
               f"import train; train.main({args!r})")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    message = "--report-to trackio needs the trackio package: pip install trackio"
    assert result.stderr.strip().splitlines() == [message]
    assert not out.exists()


def test_only_the_first_process_reports(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # importing it would fail
    tracker = Tracker("wandb", rank=1)
    tracker.start(tmp_path, {})
    tracker.log({"loss": 1.0}, 1)
    assert tracker.backend is None
    with pytest.raises(SystemExit, match="pip install wandb"):
        Tracker("wandb", rank=0)


def test_tensorboard_event_files_hold_the_metrics_jsonl_scalars(char_run_setup, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed: pip install tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setattr(train, "score", parity_reward)
    out = tmp_path / "tensorboard-run"
    train.main(run_args(char_run_setup, out, *STEPS, "--report-to", "tensorboard"))
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    expected = {}
    for step, values in expected_logs(out):
        for tag, value in (values.items() if isinstance(values, dict) else ()):
            expected.setdefault(tag, {})[step] = value
    assert set(scalars) == set(expected) and "reward_mean" in scalars and "eval/greedy_accuracy" in scalars
    for tag, by_step in expected.items():
        assert scalars[tag] == pytest.approx(by_step, rel=1e-6, abs=1e-30, nan_ok=True), tag  # float32
    texts = events.Tags()["tensors"]
    assert any("eval/samples" in tag for tag in texts), texts  # the sample table, as Markdown text
