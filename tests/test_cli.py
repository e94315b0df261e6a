"""train.py's command line: presets, flags and their errors, --dry-run, --help, --report and --plot.
"""

import json
import shutil

import pytest
import torch
import torch.nn as nn
import transformers

import train
from credit import METHODS
from conftest import parity_reward, run_args


@pytest.mark.parametrize("flag, value", [
    ("--eval-every", "0"), ("--save-every", "0"), ("--top-p", "0"), ("--top-p", "1.5"),
    ("--temperature", "-1"), ("--reward-timeout", "0"), ("--lr", "-1e-5"), ("--lr", "nan"),
    ("--top-k", "-1"), ("--lora-dropout", "1"), ("--rank", "0"), ("--group-size", "1"),
    ("--eval-problems", "0"), ("--grad-clip", "0"), ("--reward", "exact"), ("--credit", "random"),
    ("--loss-type", "dapo"), ("--scale-rewards", "batch"), ("--entropy-quantile", "0"),
    ("--entropy-quantile", "1.5"), ("--report-to", "mlflow"), ("--arca-recent-updates", "0"),
])
def test_invalid_options_name_the_flag_and_the_range(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--preset", "demo", flag, value])
    assert exit_info.value.code == 2
    assert f"{flag} " in capsys.readouterr().err


def test_dry_run_of_the_paper_preset_prints_the_papers_settings(capsys):
    train.main(["--preset", "paper", "--dry-run"])
    config = json.loads(capsys.readouterr().out)
    expected = {  # the paper's settings (README, The paper's run)
        "model": "Qwen/Qwen3-1.7B-Base", "group_size": 4, "prompts_per_micro_batch": 2, "micro_batches": 4,
        "steps": 100, "lr": 5e-6, "warmup_steps": 10, "weight_decay": 0.0, "grad_clip": 1.0,
        "max_prompt_tokens": 512, "max_new_tokens": 512, "temperature": 1.0, "top_p": 0.95, "rank": 64,
        "lora_alpha": 128.0, "lora_dropout": 0.05,
        "power": 2.0, "credit_eps": 1e-8, "eval_problems": 200, "pass_k": 4, "save_every": 20, "seed": 1337,
        "credit": "arca", "advantage": "grpo", "beta": 0.0, "updates_per_batch": 1, "dtype": "bfloat16",
        # the reference code's protocol (README, This implementation and the reference code): prompt, strict
        # reward, EOS out of the loss, top-k 50, first 200 rows
        "prompt_template": "Solve this math problem step by step. Put your final answer in "
                           "\\boxed{{}}.\n\nProblem: {problem}\n",
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
        schedule = train.cosine_with_warmup(warmup, total)
        ours = lrs(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        theirs = lrs(lambda opt: transformers.get_cosine_schedule_with_warmup(opt, warmup, total))
        assert ours == pytest.approx(theirs, abs=1e-12)
    assert ours[0] == 1.0
    first_two = lrs(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, train.cosine_with_warmup(10, 30)))[:2]
    assert first_two == [0.0, 0.1]


def test_report_and_plot_show_every_run_and_signal(char_run_setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "score", parity_reward)
    finished, unfinished = tmp_path / "finished", tmp_path / "unfinished"
    train.main(run_args(char_run_setup, finished, "--steps", "2", "--credit", "uniform"))
    train.main(run_args(char_run_setup, unfinished, "--steps", "2", "--save-every", "1"))
    shutil.rmtree(unfinished / "adapter")  # as if killed before the end
    report = train.report([finished, unfinished])
    assert f"| `{finished}` | uniform |" in report and f"| `{unfinished}` (unfinished) | arca |" in report
    signals = report.split("All signals")[1]
    assert signals.count("| uniform (trains) |") == 1 and signals.count("| arca (trains) |") == 1
    # measured in both runs, the uniform one included (--diagnose-all)
    assert signals.count("| divergence | 0.") == 2
    pytest.importorskip("matplotlib")
    train.main(["--report", str(finished), str(unfinished), "--plot", str(tmp_path / "runs.png")])
    assert (tmp_path / "runs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_help_shows_each_default(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(paper 'strict', demo 'symbolic')" in text
    assert "(default 1337)" in text
    assert "(paper 50, demo 0)" in text
    credit = text.split("--credit CREDIT token credit:")[1].split("(default")[0]  # every method, listed
    assert all(method in credit for method in METHODS), credit
    assert "90% of the device's memory" in text  # a percent sign printed once, not %%


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_paper_preset_without_cuda_says_what_to_run():
    with pytest.raises(SystemExit, match="--preset demo"):
        train.main(["--preset", "paper"])


def test_dry_run_names_the_datasets_their_revisions_and_the_eval_set(capsys):
    for args, train_data, eval_data in (
            ([], "DigitalLearningGmbH/MATH-lighteval@0530c78699ea5e8eb5530600900e1f328b48acad "
                 "data/train-00000-of-00001.parquet",
             "DigitalLearningGmbH/MATH-lighteval@0530c78699ea5e8eb5530600900e1f328b48acad "
             "data/test-00000-of-00001.parquet"),
            (["--task", "gsm8k"],
             "openai/gsm8k@740312add88f781978c0658806c59bc2815b9866 main/train-00000-of-00001.parquet",
             "openai/gsm8k@740312add88f781978c0658806c59bc2815b9866 main/test-00000-of-00001.parquet"),
            (["--eval-set", "math500"],
             "DigitalLearningGmbH/MATH-lighteval@0530c78699ea5e8eb5530600900e1f328b48acad "
             "data/train-00000-of-00001.parquet",
             "HuggingFaceH4/MATH-500@6e4ed1a2a79af7d8630a6b768ec859cb5af4d3be test.jsonl")):
        train.main(["--preset", "paper", *args, "--dry-run"])
        sources = json.loads(capsys.readouterr().out)["data_sources"]
        assert (sources["train"], sources["eval"]) == (train_data, eval_data)
        assert sources["eval_set"] == ("math500" if "math500" in args else "test")
    with pytest.raises(SystemExit):
        train.parse_args(["--preset", "paper", "--task", "gsm8k", "--eval-set", "math500"])
    assert "--eval-set math500 is HuggingFaceH4/MATH-500" in capsys.readouterr().err
