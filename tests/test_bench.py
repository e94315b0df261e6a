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


def test_gpu_check_measures_the_goals_and_names_what_it_could_not(tmp_path, monkeypatch):
    import bench

    cpu = torch.device("cpu")
    size = dict(bench.sizes(cpu, quick=True), batches=(1, 4))
    directory = bench.write_checkpoint("tiny", tmp_path / "checkpoint")
    records, skipped, seconds = bench.gpu_check(directory, cpu, torch.float32, size, "tiny", compile=False)
    assert skipped == []
    whats = {(line["what"], line["batch"]) for line in records}
    assert whats >= {("rollout", 4), ("rollout", 1), ("paper_step", 4), ("paper_step_checkpointed", 4),
                     ("train_step", 2),
                     ("rollout_lora", 4), ("activations_per_token_checkpointed",
                                           1), ("paper_step_planned_peak_checkpointed", None)}
    table = bench.goals_table(records, skipped, seconds, cpu)
    assert "| paper GRPO step (32 completions of up to 512 tokens), s | <= 3 |" in table
    # no batch 64, no compile
    assert "| rollout at batch 64: compiled / transformers generate | >= 5 | not measured |" in table
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(bench, "bench_paper_step", broken)  # one failure: reported, the others still measured
    records, skipped, _ = bench.gpu_check(directory, cpu, torch.float32, size, "tiny", compile=False)
    assert skipped == ["paper step (failed: RuntimeError: CUDA out of memory)"]
    assert ("train_step", 2) in {(r["what"], r["batch"]) for r in records}
    monkeypatch.setattr(bench, "GPU_CHECK_SECONDS", 0)
    records, skipped, _ = bench.gpu_check(directory, cpu, torch.float32, size, "tiny", compile=False)
    assert records == [] and skipped == [f"{name} (out of time)" for name in
                                         ("rollout at batch 4", "paper step", "train step",
                                          "rollout at batch 1", "LoRA rollout at batch 4",
                                          "memory")]
    table = bench.goals_table(records, skipped, 1.0, cpu)
    assert "not measured: rollout at batch 4 (out of time); paper step (out of time)" in table
