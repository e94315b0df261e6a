"""bench.py: --quick prints every measurement, the compiled rows, --gpu-check's goals.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, inductor_missing
from model import Qwen3


def test_bench_quick_prints_every_measurement():
    result = subprocess.run([sys.executable, "bench.py", "--quick"], cwd=REPO, capture_output=True, text=True,
                            timeout=240, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    for line in lines:
        assert set(line) == {"what", "shape", "batch", "device", "ours", "reference", "ratio", "unit", "note"}
        assert line["shape"] in ("tiny", "precision") and line["device"].startswith("cpu")
    kinds = {line["what"] for line in lines}
    assert kinds >= {"rollout", "train_step", "train_peak_memory", "sampler_trainer_gap",
                     "grpo_step_checkpointed", "grpo_step_arca_over_uniform_beta0",
                     "grpo_step_arca_over_uniform_beta0.04", "grpo_update_arca_over_uniform_beta0",
                     "grpo_update_arca_over_uniform_beta0.04", "grpo_update_diagnose_all_over_off",
                     "grpo_update_arca_exact_over_bf16", "grpo_step_arca_exact_over_bf16_peak_memory",
                     "arca_bf16_vs_exact_s0.0001", "prefill_k4_shared_over_repeated"}
    precision = {line["what"]: line["ours"] for line in lines if line["shape"] == "precision"}
    # bf16 tracks a large adapter better
    assert precision["arca_bf16_vs_exact_s0.01"] > precision["arca_bf16_vs_exact_s0.0001"]
    rollouts = [line for line in lines if line["what"] == "rollout"]
    assert sorted(line["batch"] for line in rollouts) == [1, 16, 64]
    steps = [line for line in lines if line["what"].startswith(("train_step", "grpo_step_arca"))]
    for line in rollouts + steps:
        assert line["ours"] > 0 and line["reference"] > 0
        assert line["ratio"] == pytest.approx(line["ours"] / line["reference"])
    kernels = {line["what"].removeprefix("kernels_per_decode_step "): line for line in lines
               if line["what"].startswith("kernels_per")}
    # (compiled ones with --compile)
    assert set(kernels) == {"(eager)", "(eager LoRA)", "(eager LoRA sampling_copies)"}
    variants = ("(eager)", "(eager LoRA sampling_copies)", "(eager LoRA)")
    eager, copies, lora = (kernels[name]["ours"] for name in variants)
    assert 0 < eager < copies < lora
    # transformers + PEFT, transformers
    assert kernels["(eager LoRA)"]["reference"] > kernels["(eager)"]["reference"] > 0
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
    assert rows["decode_step_compilations"]["ours"] == 1
    assert rows["decode_step_compilations"]["note"].endswith("added 0")
    assert rows["decode_step_compile_seconds"]["ours"] > 0  # a compilation costs more than a replay
    assert rows["compiled_greedy_tokens_equal_eager"]["ours"] == 1.0
    assert rows["compiled_sampler_trainer_gap"]["ours"] < 1e-5
    assert "repeated every token" in rows["compiled_sampler_trainer_gap"]["note"]


def test_gpu_check_plan_lists_the_paper_presets_rows_in_order_within_eight_minutes(tmp_path):
    """`bench.py --gpu-check --plan` on a machine without a GPU: one JSON object, the rows in run order
    with the paper preset's settings (its LoRA arithmetic, top-k), each estimate from the stated
    constants, the total under 480 s; nothing is written."""
    import bench
    from train import PAPER

    command = [sys.executable, str(REPO / "bench.py"), "--gpu-check", "--plan"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads(result.stdout)
    assert [row["name"] for row in plan["rows"]] == ["memory", "paper step eager", "paper step compiled",
                                                     "rollout at batch 64", "LoRA rollout at batch 64"]
    rows = {row["name"]: row for row in plan["rows"]}
    assert rows["paper step eager"] == {"name": "paper step eager", "lora_dtype": PAPER.lora_dtype,
                                        "top_k": PAPER.top_k, "compile": False, "graphs": 0,
                                        "estimate_s": rows["paper step eager"]["estimate_s"]}
    assert PAPER.lora_dtype == "bfloat16" and PAPER.top_k == 50
    assert all(row["top_k"] == 50 for row in plan["rows"][1:])
    assert [row["graphs"] for row in plan["rows"]] == [0, 0, 1, 1, 1]
    assert sum(row["estimate_s"] for row in plan["rows"]) + bench.SETUP_S == plan["total_s"] < 480
    # the constants are no lower than what the first GPU minutes were planned with
    assert bench.COLD_COMPILE_S >= 60 and bench.EAGER_DECODE_STEP_S >= 0.009 and bench.SETUP_S >= 30
    assert bench.TRANSFORMERS_DECODE_STEP_S >= 0.010 and bench.EAGER_PAPER_STEP_S >= 6
    assert rows["paper step compiled"]["estimate_s"] >= 60 + 3 * 6
    assert list(tmp_path.iterdir()) == []


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_gpu_check_runs_goal_rows_first_and_stops_between_rows(tmp_path):
    """The goal rows that take seconds (memory, the eager paper step) come before anything that
    compiles. On a fake clock: a row starts only if its estimate fits in what is left, a row that
    started is never cut short (it overruns its estimate and still finishes), a later row that fits
    still runs, and every row, run, failed or skipped, is one line of the file at once."""
    import bench

    rows = bench.gpu_check_rows(tmp_path, torch.device("cpu"), torch.float32, "tiny")
    names = [row.name for row in rows if not row.extra]
    first_compiled = min(i for i, row in enumerate(rows) if row.compile)
    assert names.index("memory") < names.index("paper step eager") < first_compiled

    clock, lines = FakeClock(), []
    out_file = tmp_path / "gpu-check.jsonl"

    def fake(seconds, fail=False):
        def measure(records):
            lines.append(len(out_file.read_text().splitlines()) if out_file.exists() else 0)
            clock.now += seconds
            if fail:
                raise RuntimeError("CUDA out of memory")
            records.append({"what": "row", "batch": None, "ours": seconds})
        return measure

    fakes = [bench.Row("a", fake(50), 40), bench.Row("b", fake(10, fail=True), 10),
             bench.Row("c", fake(100), 100, compile=True), bench.Row("d", fake(20), 20)]
    bench.run_rows(fakes, out_file, limit_s=100, clock=clock)
    entries = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [entry["row"] for entry in entries] == ["a", "b", "c", "d"]
    assert lines == [0, 1, 3]  # each row's line was written before the next row began
    assert entries[0]["records"] == [{"what": "row", "batch": None, "ours": 50}]  # overran, finished
    assert entries[1]["error"] == "RuntimeError: CUDA out of memory"
    assert entries[2]["skipped"].startswith("out of time: 60 s gone, 100 s planned")
    assert "skipped" not in entries[3] and entries[3]["records"]  # 60 + 20 fits in 100
    assert clock.now == 80


def test_gpu_check_measures_the_goals_on_a_cpu_and_names_what_it_could_not(tmp_path, monkeypatch):
    """The eager rows at small sizes on a CPU (the compiled ones are tested in test_compiled_decode):
    the goals table is read from gpu-check.jsonl, the last check's rows alone."""
    import dataclasses

    import bench
    from train import PAPER

    cpu = torch.device("cpu")
    small = dataclasses.replace(PAPER, max_prompt_tokens=16, max_new_tokens=8, eval_batch_size=4,
                                prompts_per_micro_batch=1, micro_batches=2, group_size=2)
    directory = bench.write_checkpoint("tiny", tmp_path / "checkpoint")
    rows = bench.gpu_check_rows(directory, cpu, torch.float32, "tiny", small)
    rows = [row for row in rows if not row.compile]
    out_file = tmp_path / "out" / "gpu-check.jsonl"
    out_file.parent.mkdir()
    bench.run_rows(rows, out_file, limit_s=10**6)
    entries = [json.loads(line) for line in out_file.read_text().splitlines()]
    names = ["memory", "paper step eager", "train step", "repeatability"]
    assert [entry["row"] for entry in entries] == names
    assert all("error" not in entry for entry in entries), entries
    whats = {(r["what"], r["batch"]) for entry in entries for r in entry["records"]}
    assert whats >= {("paper_step", 4), ("paper_step_checkpointed", 4), ("train_step", 2),
                     ("activations_per_token_checkpointed", 1),
                     ("paper_step_planned_peak_checkpointed", None)}
    repeat = entries[3]["records"][0]
    assert repeat["what"] == "repeat_adapter_difference"
    assert repeat["ours"] == repeat["reference"] == 0.0  # a CPU repeats itself either way
    assert not torch.are_deterministic_algorithms_enabled()  # left as found
    paper_step = next(r for entry in entries for r in entry["records"] if r["what"] == "paper_step")
    assert "top-k 50, LoRA arithmetic bfloat16" in paper_step["note"]
    table = bench.goals_table(out_file, cpu)
    assert "| paper GRPO step, eager (32 completions of up to 512 tokens), s | <= 3 |" in table
    assert "| rollout at batch 64: compiled / transformers generate | >= 5 | not measured |" in table
    monkeypatch.setattr(bench, "bench_paper_step", lambda *args, **kwargs: 1 / 0)  # a second check, failing
    bench.run_rows(rows[1:2], out_file, limit_s=10**6)
    table = bench.goals_table(out_file, cpu)
    assert "not measured: paper step eager (ZeroDivisionError: division by zero)" in table
    assert "| activations with gradient checkpointing, MB per token | <= 0.5 | not measured |" in table
    assert len(out_file.read_text().splitlines()) == 5  # the first check's rows are kept
