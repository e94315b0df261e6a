"""data.py: local JSON-lines files, the evaluation rows, and the hub datasets without network (a hub cache
laid out in a temporary folder, or a hub on loopback).
"""

import dataclasses
import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data
import train
from conftest import REPO, SHARED_DATA


def test_bad_bytes_in_a_data_file_name_the_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"problem": "1+1", "answer": "2"}\n{"problem": "\xff", "answer": "1"}\n')
    with pytest.raises(ValueError, match=r"data\.jsonl:2: not UTF-8 \(byte 0xff at column 14\)"):
        data.read_problems(path)


def test_first_eval_rows_in_file_order_or_a_seeded_sample(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps({"problem": f"p{i}", "answer": str(i)}) + "\n" for i in range(50)))
    rows, _ = data.read_problems(path)
    paper = dataclasses.replace(train.PAPER, eval_problems=5)
    assert [r["answer"] for r in data.select_eval_rows(rows, paper)] == ["0", "1", "2", "3", "4"]
    sample = data.select_eval_rows(rows, dataclasses.replace(paper, eval_sample=True))
    answers = [int(r["answer"]) for r in sample]
    assert len(answers) == 5 and answers == sorted(answers) and answers != [0, 1, 2, 3, 4]
    # fixed, whatever the run's seed
    assert data.select_eval_rows(rows, dataclasses.replace(paper, eval_sample=True, seed=2)) == sample


def evaluated_problems(monkeypatch):
    """The problems of each evaluation a run makes, as evaluation.evaluate receives them (then runs)."""
    import evaluation

    seen, real = [], evaluation.evaluate

    def recording(model, tokenizer, eval_rows, *args, **kwargs):
        seen.append([row["problem"] for row in eval_rows])
        return real(model, tokenizer, eval_rows, *args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate", recording)
    return seen


def additions_file(path, count, long_rows=()):
    """count addition problems "i+i=" as JSON lines; the rows in long_rows 400 characters long."""
    problems = ["1+" * 200 + "=" if i in long_rows else f"{i}+{i}=" for i in range(count)]
    path.write_text("".join(json.dumps({"problem": p, "answer": "0"}) + "\n" for p in problems))
    return path


def test_a_run_evaluates_the_first_rows_of_the_file_less_the_too_long_ones(char_run_setup, tmp_path,
                                                                          monkeypatch, capsys):
    """--eval-problems 4 with the 2nd row over --max-prompt-tokens: the run evaluates rows 1, 3 and 4 (that
    one dropped and counted), not row 5 in its place: the rows are chosen before the length filter."""
    from conftest import parity_reward, run_args

    monkeypatch.setattr(train, "score", parity_reward)
    seen = evaluated_problems(monkeypatch)
    eval_file = additions_file(tmp_path / "eval.jsonl", 10, long_rows={1})
    options = ("--eval-data", str(eval_file), "--eval-problems", "4", "--no-eval-sample",
               "--max-prompt-tokens", "200", "--steps", "1", "--eval-every", "1")
    train.main(run_args(char_run_setup, tmp_path / "run", *options))
    assert seen == [["0+0=", "2+2=", "3+3="]] * 2  # steps 0 and 1
    assert "evaluation: dropped 1 of 4 prompts longer than --max-prompt-tokens 200" in capsys.readouterr().out


def test_eval_sample_evaluates_the_same_problems_for_every_seed(char_run_setup, tmp_path, monkeypatch):
    from conftest import parity_reward, run_args

    monkeypatch.setattr(train, "score", parity_reward)
    seen = evaluated_problems(monkeypatch)
    eval_file = additions_file(tmp_path / "eval.jsonl", 40)
    for seed in (1, 2):
        train.main(run_args(char_run_setup, tmp_path / f"seed-{seed}", "--eval-data", str(eval_file),
                            "--eval-problems", "4", "--eval-sample", "--seed", str(seed), "--steps", "1",
                            "--eval-every", "1"))
    assert len(seen) == 4 and all(problems == seen[0] for problems in seen)
    assert seen[0] != ["0+0=", "1+1=", "2+2=", "3+3="]  # a sample, not the first rows


def test_read_problems_reports_bad_lines_and_skips_empty_answers(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"problem": "1+1", "answer": "2"}, {"problem": "p", "solution": "so \\boxed{\\frac12}."},
            {"problem": "q", "answer": ""}, {"problem": "r", "solution": "no box"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    problems, skipped = data.read_problems(path)
    assert problems == [{"problem": "1+1", "answer": "2"},
                        {"problem": "p", "answer": "\\frac12"}] and skipped == 2
    path.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"data.jsonl:2: not valid JSON"):
        data.read_problems(path)
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"question": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"data.jsonl:2: expected an object with 'problem'.*\['question'\]"):
        data.read_problems(path)


def parquet_bytes(rows):
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


def math_rows(split, count):
    """MATH-lighteval-like rows whose file order is not any sorted order; train has MATH's two empty boxes and
    a "Level ?"."""
    rows = [{"problem": f"{split} problem {(i * 7919) % count}", "level": f"Level {1 + i % 5}",
             "type": "Algebra",
             "solution": f"so \\boxed{{{(i * 7919) % count}}}"} for i in range(count)]
    if split == "train":
        rows[5]["solution"] = rows[9]["solution"] = "so \\boxed{}"
        rows[7]["level"] = "Level ?"
    return rows


def gsm8k_rows(count):
    return [{"question": f"question {i}",
             "answer": f"{i} + 1000 = {i + 1000:,}\n#### {i + 1000:,}"} for i in range(count)]


def lay_out_hub_cache(cache, dataset, files, revision=None):
    """files {path in the repo: bytes}, where huggingface_hub's cache keeps a dataset at a commit (a local hub
    cache)."""
    repository = cache / f"datasets--{dataset['id'].replace('/', '--')}"
    snapshot = repository / "snapshots" / (revision or dataset["revision"])
    for name, content in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(content)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache and an empty ARCA_CACHE, for this process (huggingface_hub read HF_HUB_CACHE at
    import)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "arca")
    return tmp_path / "hub"


class LoopbackHub(http.server.ThreadingHTTPServer):
    """A Hugging Face hub on 127.0.0.1 for huggingface_hub's own client: it serves `files` {url path: bytes}
    at the revision in the path, answers other revisions as the hub does (`errors` {revision: (status,
    X-Error-Code)}) and logs every request."""

    def __init__(self, files, errors):
        self.files, self.errors, self.requests = files, errors, []

        class Handler(http.server.BaseHTTPRequestHandler):
            def answer(handler, body):
                self.requests.append((handler.command, handler.path))
                revision = next((r for r in self.errors if f"/{r}/" in handler.path), None)
                content = self.files.get(handler.path)
                if revision:
                    status, code = self.errors[revision]
                else:
                    status, code = (200, None) if content is not None else (404, "EntryNotFound")
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
config = types.SimpleNamespace(task={task!r}, data=None, eval_data=None, data_revision=None, eval_set="test",
                               eval_problems=200, seed=0)
train, held_out = data.load_data(config)
print(json.dumps({{"train": train, "eval": held_out}}))
"""


def load_in_a_child(env, task="math"):
    result = subprocess.run([sys.executable, "-c", LOAD_DATA.format(repo=str(REPO), task=task)],
                            capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_a_hub_dataset_is_fetched_once_in_file_order_and_then_read_offline(tmp_path):
    lighteval = data.MATH_LIGHTEVAL
    base = f"/datasets/{lighteval['id']}/resolve/{lighteval['revision']}/"
    files = {base + lighteval["files"][split]: parquet_bytes(math_rows(split, lighteval["rows"][split]))
             for split in ("train", "test")}
    hub = LoopbackHub(files, {})
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hub"),
           "ARCA_CACHE": str(tmp_path / "arca")}
    try:
        first = load_in_a_child(env)
    finally:
        hub.shutdown()
    fetched = hub.file_requests()
    assert sorted({path for _, path in fetched}) == sorted(files)
    assert [method for method, _ in fetched].count("GET") == 2  # each file downloaded once
    # the file's own order, the two empty boxes skipped, and the cache names the dataset and revision
    expected = [row for row in math_rows("train", 7500) if row["solution"] != "so \\boxed{}"]
    assert [r["answer"] for r in first["train"]] == [row["solution"][10:-1] for row in expected]
    assert len(first["train"]) == 7498
    first_eval = [r["problem"] for r in first["eval"][:3]]
    assert first_eval == ["test problem 0", "test problem 2919", "test problem 838"]
    cache = tmp_path / "arca" / "datasets" / "DigitalLearningGmbH--MATH-lighteval" / lighteval["revision"]
    cached = [json.loads(line) for line in (cache / "train.jsonl").read_text().splitlines()]
    assert len(cached) == 7500 and cached[0] == {"problem": "train problem 0", "solution": "so \\boxed{0}",
                                                 "subject": "Algebra", "level": 1}
    assert cached[7]["level"] is None
    assert sorted(p.name for p in cache.iterdir()) == ["test.jsonl", "train.jsonl"]
    # a second run reads the cache: no hub at all (its address now refuses connections), the same rows
    assert load_in_a_child({**env, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}) == first
    assert hub.file_requests() == fetched


def test_the_dataset_cache_is_kept_per_revision(hub_cache, monkeypatch):
    """A cache filled at the pinned revision is not read for --data-revision B: B's own rows are fetched
    (here from the hub cache) and cached apart; with the network cut, a revision nowhere yet stops with
    the offline message that names it."""
    import huggingface_hub.constants

    lighteval, test_file = data.MATH_LIGHTEVAL, data.MATH_LIGHTEVAL["files"]["test"]
    other, missing = "b" * 40, "c" * 40
    rows_b = math_rows("test", 5000)
    rows_b[0]["problem"] = "revision b's first problem"
    lay_out_hub_cache(hub_cache, lighteval, {test_file: parquet_bytes(math_rows("test", 5000))})
    lay_out_hub_cache(hub_cache, lighteval, {test_file: parquet_bytes(rows_b)}, other)
    first_problem = lambda path: json.loads(path.read_text().splitlines()[0])["problem"]
    pinned = data.cached_split("math", "test")
    assert first_problem(pinned) == "test problem 0"
    assert first_problem(data.cached_split("math", "test", other)) == "revision b's first problem"
    assert first_problem(data.cached_split("math", "test")) == "test problem 0" and pinned.exists()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit, match=f"revision {missing}.*HF_HUB_OFFLINE is set"):
        data.cached_split("math", "test", missing)


def test_a_bad_hub_file_names_the_file_and_what_was_expected(hub_cache, tmp_path):
    revisions = {name: f"{i}" * 40 for i, name in enumerate(("short", "column", "garbage", "gsm8k"), 1)}
    lighteval, test_file = data.MATH_LIGHTEVAL, data.MATH_LIGHTEVAL["files"]["test"]
    lay_out_hub_cache(hub_cache, lighteval, {test_file: parquet_bytes(math_rows("test", 4999))},
                      revisions["short"])
    rows = [{k: v for k, v in row.items() if k != "solution"} for row in math_rows("test", 5000)]
    lay_out_hub_cache(hub_cache, lighteval, {test_file: parquet_bytes(rows)}, revisions["column"])
    lay_out_hub_cache(hub_cache, lighteval, {test_file: b"<html>rate limited</html>"}, revisions["garbage"])
    rows = gsm8k_rows(1319)
    rows[41]["answer"] = "the answer is 3"
    lay_out_hub_cache(hub_cache, data.GSM8K, {data.GSM8K["files"]["test"]: parquet_bytes(rows)},
                      revisions["gsm8k"])
    with pytest.raises(SystemExit,
                       match=r"test-00000-of-00001.parquet: 4,999 rows, expected 5,000 .*--data-revision"):
        data.cached_split("math", "test", revisions["short"])
    with pytest.raises(SystemExit, match=r"test-00000-of-00001.parquet: no column 'solution' .*expected "
                                         r"\['problem', 'level', 'type', 'solution'\]"):
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
    errors = {"1" * 40: (404, "RevisionNotFound"), "2" * 40: (403, "GatedRepo"),
              "3" * 40: (401, "RepoNotFound"), "4" * 40: (500, None)}
    hub = LoopbackHub({}, errors)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "ARCA_CACHE": str(tmp_path / "arca")}
    script = HUB_ERRORS.format(repo=str(REPO), revisions=[*errors, "5" * 40])
    cli = [sys.executable, "train.py", "--preset", "paper", "--model", str(tmp_path / "no-such-model"),
           "--out", str(tmp_path / "run")]
    started = time.monotonic()
    children = [subprocess.Popen([sys.executable, "-c", script], env={**env, "HF_ENDPOINT": hub.url},
                                 cwd=REPO, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True),
                subprocess.Popen(cli, env={**env, "HF_HUB_OFFLINE": "1"}, cwd=REPO, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True),
                subprocess.Popen(cli, env={**env, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"},
                                 cwd=REPO, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)]
    (statuses, _), (_, offline), (_, unreachable) = (child.communicate(timeout=60) for child in children)
    seconds = time.monotonic() - started
    hub.shutdown()
    messages = [json.loads(line) for line in statuses.splitlines()]
    where = f"could not fetch {lighteval['id']} (revision "
    assert all(m.startswith(where) for m in messages)
    assert all(f"Hub cache: {tmp_path / 'hub'}" in m and "--data train.jsonl" in m for m in messages)
    assert "has no revision 1111111111111111111111111111111111111111; pass an existing commit" in messages[0]
    dataset = "DigitalLearningGmbH/MATH-lighteval"
    assert f"is gated: accept its terms at https://huggingface.co/datasets/{dataset}" in messages[1]
    assert f"the hub refused {dataset}: it does not exist, or it is private" in messages[2]
    assert f"the hub ({hub.url}) answered HTTP 500" in messages[3]
    assert f"has no file data/train-00000-of-00001.parquet at revision {'5' * 40}" in messages[4]
    # offline or unreachable: one message naming the dataset, its revision, the hub cache and the local-file
    # alternative,
    # before the model is touched (no such model directory) and before anything is written
    for stderr, reason in ((offline, "HF_HUB_OFFLINE is set, and the file is not in the hub cache"),
                           (unreachable, "could not be reached (ConnectError")):
        what = f"{lighteval['id']} (revision {lighteval['revision']}, file data/train-00000-of-00001.parquet)"
        assert f"could not fetch {what}" in stderr
        assert reason in stderr
        assert f"Hub cache: {tmp_path / 'hub'}" in stderr
        assert '"problem" and an "answer"' in stderr
        assert "no-such-model" not in stderr and "Traceback" not in stderr, stderr[-2000:]
    assert not (tmp_path / "run").exists() and seconds < 30


def test_gsm8k_golds_and_both_rewards_follow_the_reference(hub_cache):
    from math_reward import gsm8k_answer, gsm8k_reward, gsm8k_strict_match

    cases = {"Final answer: 1234": 1.0, "\\boxed{1,234}": 1.0, "1000 + 234 = 1234.00": 1.0, "12340": 0.0,
             "no number at all": 0.0}
    for completion, expected in cases.items():
        assert gsm8k_strict_match(completion, "1234") == expected, completion
        assert gsm8k_reward(completion, "1234") == expected, completion
    assert gsm8k_strict_match("Final answer: 7, then 9 more", "7") == 1.0
    assert gsm8k_answer("3 apples, then 5") == "5"
    assert gsm8k_answer("\\boxed{12} so the answer is 5") == "12"  # a box wins over the final-answer pattern
    # "so N" is a final-answer pattern of the reference's, as written
    assert gsm8k_answer("so 2 + 2 = 4 and 1234") == "2"
    assert gsm8k_strict_match("so 3/4", "0.75") == 1.0
    assert gsm8k_strict_match("\\boxed{\\frac{3}{4}}", "0.75") == 0.0
    assert gsm8k_reward("Final answer: $18.50", "18.5") == 1.0
    started = time.monotonic()
    # linear on hostile text
    assert gsm8k_strict_match("answer" + " " * 200_000 + "x" + "9" * 100_000, "1") == 0.0
    assert time.monotonic() - started < 2
    assert data.gsm8k_gold("Natalia sold 48/2 = 24 clips.\n#### 1,234") == "1234"
    assert data.gsm8k_gold("no marker") is None
    sizes = (("train", 7473), ("test", 1319))
    splits = {data.GSM8K["files"][split]: parquet_bytes(gsm8k_rows(n)) for split, n in sizes}
    lay_out_hub_cache(hub_cache, data.GSM8K, splits)
    config, _, _ = train.parse_args(["--preset", "paper", "--task", "gsm8k"])
    train_rows, eval_rows = data.load_data(config)
    assert len(train_rows) == 7473 and len(eval_rows) == 1319
    assert eval_rows[1234] == {"problem": "question 1234", "answer": "2234"}
    assert config.prompt_template.format(problem="q").startswith("You are a careful math solver.")
    assert config.out == "runs/paper-gsm8k-arca-r64"


@pytest.mark.skipif(not (SHARED_DATA / "math" / "test500.jsonl").exists(), reason="needs ../shared/data")
def test_math500_is_an_eval_set_of_its_own_rows_and_answers(hub_cache):
    math500 = (SHARED_DATA / "math" / "test500.jsonl").read_bytes()
    lay_out_hub_cache(hub_cache, data.MATH_500, {"test.jsonl": math500})
    lay_out_hub_cache(hub_cache, data.MATH_LIGHTEVAL,
                      {data.MATH_LIGHTEVAL["files"]["train"]: parquet_bytes(math_rows("train", 7500))})
    config, _, _ = train.parse_args(["--preset", "paper", "--eval-set", "math500"])
    _, eval_rows = data.load_data(config)
    expected = [json.loads(line) for line in math500.decode().splitlines()]
    assert config.eval_problems == 500
    assert [(r["problem"], r["answer"]) for r in eval_rows] == [(r["problem"], r["answer"]) for r in expected]
    config, _, _ = train.parse_args(["--preset", "paper", "--eval-set", "math500", "--eval-problems", "50"])
    assert data.select_eval_rows(eval_rows, config) == eval_rows[:50]
