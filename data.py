"""The problems a run trains and evaluates on: MATH or GSM8K from the Hugging Face hub, MATH-500, the
demo's additions, or local JSON-lines files.

Where they come from (each pinned to a revision; `--data-revision` moves the task's):

    --task math          DigitalLearningGmbH/MATH-lighteval   data/{train,test}-00000-of-00001.parquet
                         7,500 train and 5,000 test rows
    --task gsm8k         openai/gsm8k (config main)           main/{train,test}-00000-of-00001.parquet
                         7,473 train and 1,319 test rows
    --eval-set math500   HuggingFaceH4/MATH-500               test.jsonl, 500 test rows

MATH-lighteval is what the paper's reference code loads (as verl, lighteval and inspect_evals do); the
original MATH archive on the Berkeley server is gone since the dataset was taken down in January 2025.

A split is fetched once with `huggingface_hub.hf_hub_download` (its cache, resumable downloads,
HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE work as everywhere else), read with pyarrow (imported only
here, when a parquet file is read), checked (its columns and its row count), and written in the file's
own row order as JSON lines to

    $ARCA_CACHE/datasets/<owner>--<name>/<revision>/<split>.jsonl      (ARCA_CACHE: ~/.cache/arca)

with each row's problem, gold (`solution` or `answer`), subject and level. A later run reads that file
and makes no network call. `read_problems` is the one reader, for these files and for `--data` /
`--eval-data` files alike. Rows keep their order: the evaluation set is the first `--eval-problems`
rows of the test split, the reference code's protocol.

Left out: the `datasets` library (a parquet file and pyarrow are all a split needs), and any parquet
reader of our own.
"""

import hashlib
import json
import os
import random
from pathlib import Path

import torch

from math_reward import extract_boxed
from runs import write_atomically

CACHE_DIR = Path(os.environ.get("ARCA_CACHE", Path.home() / ".cache" / "arca"))

# The tasks' prompts. MATH's and GSM8K's are the reference code's, exactly (experiment/hf/data.py).
MATH_PROMPT = ("Solve this math problem step by step. Put your final answer in \\boxed{{}}.\n\n"
               "Problem: {problem}\n")
GSM8K_PROMPT = ("You are a careful math solver. Work through the problem and end with a line of the form "
                "'Final answer: <number>'.\n\nQuestion: {problem}\nAnswer with reasoning, then finish with "
                "'Final answer: <number>'.")
DEMO_PROMPT = "{problem}"
PROMPTS = {"math": MATH_PROMPT, "gsm8k": GSM8K_PROMPT, "demo": DEMO_PROMPT}

# Hub datasets: id, pinned revision, and per split the file, its row count and the columns read from it.
MATH_LIGHTEVAL = dict(id="DigitalLearningGmbH/MATH-lighteval",
                      revision="0530c78699ea5e8eb5530600900e1f328b48acad",
                      files={"train": "data/train-00000-of-00001.parquet",
                             "test": "data/test-00000-of-00001.parquet"},
                      rows={"train": 7500, "test": 5000}, columns=("problem", "level", "type", "solution"))
GSM8K = dict(id="openai/gsm8k", revision="740312add88f781978c0658806c59bc2815b9866",
             files={"train": "main/train-00000-of-00001.parquet", "test": "main/test-00000-of-00001.parquet"},
             rows={"train": 7473, "test": 1319}, columns=("question", "answer"))
MATH_500 = dict(id="HuggingFaceH4/MATH-500", revision="6e4ed1a2a79af7d8630a6b768ec859cb5af4d3be",
                files={"test": "test.jsonl"}, rows={"test": 500},
                columns=("problem", "answer", "subject", "level"))
HUB_DATASETS = {"math": MATH_LIGHTEVAL, "gsm8k": GSM8K}

LOCAL_FILES_HINT = ("Or pass local files: --data train.jsonl --eval-data test.jsonl, JSON lines with a "
                    "\"problem\" and an \"answer\" (or a \"solution\" whose last \\boxed{} is the answer) "
                    "per line.")


# ----------------------------------------------------------------------------------------------
# The one reader


def read_problems(path):
    """Rows {problem, answer} of a JSON-lines file; rows with an empty answer are skipped and counted.

    A row gives `answer`, or a `solution` whose last \\boxed{} is the answer. Returns (rows, skipped).
    """
    rows, skipped = [], 0
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{line_number}: not UTF-8 (byte {raw[err.start]:#04x} "
                                 f"at column {err.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({err.msg})") from None
            has_gold = isinstance(row, dict) and ("answer" in row or "solution" in row)
            if not has_gold or not isinstance(row.get("problem"), str):
                found = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(f"{path}:{line_number}: expected an object with 'problem' and 'answer' or "
                                 f"'solution', found {found}")
            answer = row["answer"] if "answer" in row else extract_boxed(str(row["solution"]))
            if not answer or not str(answer).strip():
                skipped += 1
                continue
            rows.append({"problem": row["problem"], "answer": str(answer)})
    if not rows:
        raise ValueError(f"{path}: no usable rows ({skipped} skipped for an empty answer)")
    return rows, skipped


# ----------------------------------------------------------------------------------------------
# Hub datasets -> JSON-lines caches


def hub_file(dataset, split, revision):
    """The local path of one of `dataset`'s files, from the hub cache or fetched by hf_hub_download.

    A cached file is returned without a network call. Otherwise one HEAD request without retries
    comes first, so that offline, unreachable or refused ends in seconds (hf_hub_download alone
    retries for up to minutes), then the download itself, with the hub's retries. A failure is a
    SystemExit whose sentence says what to do: offline or unreachable, no such revision, gated or
    refused, any other HTTP error.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError,
                                        LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    name, filename = dataset["id"], dataset["files"][split]
    what = f"{name} (revision {revision}, file {filename})"
    try:
        return Path(hf_hub_download(name, filename, repo_type="dataset", revision=revision,
                                    local_files_only=True))
    except LocalEntryNotFoundError:
        pass  # not cached: fetch it
    try:
        get_hf_file_metadata(hf_hub_url(name, filename, repo_type="dataset", revision=revision), timeout=10)
        return Path(hf_hub_download(name, filename, repo_type="dataset", revision=revision))
    except GatedRepoError:
        reason = (f"{name} is gated: accept its terms at https://huggingface.co/datasets/{name} and log in "
                  "(`hf auth login`, or set HF_TOKEN)")
    except RevisionNotFoundError:
        reason = (f"{name} has no revision {revision}; pass an existing commit, branch or tag with "
                  "--data-revision")
    except RepositoryNotFoundError:
        reason = (f"the hub refused {name}: it does not exist, or it is private and HF_TOKEN does not give "
                  "access to it")
    except EntryNotFoundError:
        reason = f"{name} has no file {filename} at revision {revision}"
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else "no status"
        reason = f"the hub ({constants.ENDPOINT}) answered HTTP {status}: {str(err).splitlines()[0]}"
    except OfflineModeIsEnabled:
        reason = "HF_HUB_OFFLINE is set, and the file is not in the hub cache"
    except Exception as err:  # the transport's errors (connection refused, timeout, DNS, proxy, TLS)
        reason = f"the hub ({constants.ENDPOINT}) could not be reached ({type(err).__name__}: {err})"
    raise SystemExit(f"could not fetch {what}: {reason}.\nHub cache: {constants.HF_HUB_CACHE}. "
                     f"{LOCAL_FILES_HINT}")


def read_table(path, columns):
    """The given columns of a parquet file as a list of row dicts, in file order (pyarrow, imported here
    only)."""
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as err:  # not parquet, truncated, ...
        raise SystemExit(f"{path}: not a readable parquet file ({type(err).__name__}: {err})") from None
    missing = [column for column in columns if column not in names]
    if missing:
        raise SystemExit(f"{path}: no column {missing[0]!r} (it has {names}); expected {list(columns)}")
    return pq.read_table(path, columns=list(columns)).to_pylist()


def read_jsonl_table(path, columns):
    """The given keys of every line of a JSON-lines file, in file order; a missing key names the file, the
    line and the key."""
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        row = json.loads(line)
        missing = [column for column in columns if column not in row]
        if missing:
            raise SystemExit(f"{path}:{number}: no key {missing[0]!r} (it has {sorted(row)}); "
                             f"expected {list(columns)}")
        rows.append({column: row[column] for column in columns})
    return rows


def math_level(text):
    """MATH's "Level 3" -> 3; "Level ?" (two train problems) -> None."""
    digits = str(text).removeprefix("Level ").strip()
    return int(digits) if digits.isdigit() else None


def gsm8k_gold(answer):
    """GSM8K's gold: the number after `####`, thousands separators removed.
    "... so she has 1,234 left.\\n#### 1,234" -> "1234"."""
    _, marker, gold = answer.rpartition("####")
    return gold.strip().replace(",", "") if marker else None


def cache_rows(task_or_set, raw_rows, path):
    """Our row layout for a dataset's raw rows: problem, the gold (solution or answer), subject, level."""
    if task_or_set == "math":
        return [{"problem": r["problem"], "solution": r["solution"], "subject": r["type"],
                 "level": math_level(r["level"])} for r in raw_rows]
    if task_or_set == "math500":
        return [{"problem": r["problem"], "answer": r["answer"], "subject": r["subject"], "level": r["level"]}
                for r in raw_rows]
    rows = []
    for number, r in enumerate(raw_rows, 1):
        gold = gsm8k_gold(r["answer"])
        if not gold:
            raise SystemExit(f"{path}: row {number}'s answer has no '#### <number>' line: "
                             f"{r['answer'][-80:]!r}")
        rows.append({"problem": r["question"], "answer": gold, "solution": r["answer"]})
    return rows


def cached_split(task_or_set, split, revision=None, cache_dir=None):
    """The JSON-lines cache of one split of a hub dataset (math, gsm8k or math500), fetched and written on
    first use, kept per dataset and revision.

    The file is written whole under a temporary name and renamed into place, so a run stopped
    mid-way leaves no partial file; once it exists, no network call is made. Returns its path.
    """
    dataset = MATH_500 if task_or_set == "math500" else HUB_DATASETS[task_or_set]
    revision = revision or dataset["revision"]
    folder = Path(cache_dir or CACHE_DIR) / "datasets" / dataset["id"].replace("/", "--") / revision
    path = folder / f"{split}.jsonl"
    if path.exists():
        return path
    source = hub_file(dataset, split, revision)
    read = read_jsonl_table if source.suffix == ".jsonl" else read_table
    raw_rows = read(source, dataset["columns"])
    if len(raw_rows) != dataset["rows"][split]:
        raise SystemExit(f"{source}: {len(raw_rows):,} rows, expected {dataset['rows'][split]:,} "
                         f"({dataset['id']} {split} at revision {revision}); another revision has other "
                         "rows: check --data-revision")
    rows = cache_rows(task_or_set, raw_rows, source)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, "".join(json.dumps(row) + "\n" for row in rows))
    return path


# ----------------------------------------------------------------------------------------------
# What a run trains and evaluates on


def data_sources(config):
    """{"train": ..., "eval": ...}: where each side's problems come from, as config.json and --report name
    them."""
    if config.task == "demo":
        hub = {"train": "demo additions (demo.py)", "eval": "demo additions, held out (demo.py)"}
    else:
        dataset = HUB_DATASETS[config.task]
        revision = config.data_revision or dataset["revision"]
        hub = {"train": f"{dataset['id']}@{revision} {dataset['files']['train']}",
               "eval": f"{dataset['id']}@{revision} {dataset['files']['test']}"}
        if config.eval_set == "math500":
            hub["eval"] = f"{MATH_500['id']}@{MATH_500['revision']} {MATH_500['files']['test']}"
    return {"train": config.data or hub["train"], "eval": config.eval_data or hub["eval"],
            "eval_set": config.eval_set, "eval_problems": config.eval_problems,
            "eval_sample": config.eval_sample}


def load_data(config):
    """(train rows, eval rows) for the config: --data / --eval-data files, else the demo's additions or the
    task's hub dataset (its test split, or MATH-500 with --eval-set math500), fetched once and cached."""
    sides = {}
    for side, given, split in (("train", config.data, "train"), ("eval", config.eval_data, "test")):
        if given is None and config.task == "demo":
            import demo

            if side == "train":
                sides[side] = demo.demo_problems(split, 2000, config.seed)
            else:  # the held-out additions, the same for every run and seed
                sides[side] = demo.demo_problems(split, config.eval_problems, 0)
            continue
        if given is None:
            dataset = "math500" if side == "eval" and config.eval_set == "math500" else config.task
            given = cached_split(dataset, split, config.data_revision if dataset == config.task else None)
        rows, skipped = read_problems(given)
        if skipped:
            print(f"{given}: skipped {skipped} rows with an empty answer")
        sides[side] = rows
    return sides["train"], sides["eval"]


def select_eval_rows(rows, config):
    """The evaluation problems: the first eval_problems rows in file order (the reference code's
    protocol), or with eval_sample a fixed sample (seed 0), the same for every run and seed. Taken
    before the prompt-length filter, so a run evaluates on those rows (less the ones too long), as
    the reference does (it truncates them instead)."""
    if len(rows) <= config.eval_problems:
        return rows
    if not config.eval_sample:
        return rows[: config.eval_problems]
    keep = sorted(random.Random(0).sample(range(len(rows)), config.eval_problems))
    return [rows[i] for i in keep]


def encode_prompts(rows, tokenizer, config, what, quiet=False):
    """Token ids of each row's prompt; rows whose prompt is longer than max_prompt_tokens are dropped and
    counted."""
    kept = []
    for row in rows:
        ids = tokenizer.encode(config.prompt_template.format(problem=row["problem"]))
        if len(ids) <= config.max_prompt_tokens:
            kept.append({**row, "prompt_ids": ids})
    if not kept:
        raise ValueError(f"every {what} prompt is longer than --max-prompt-tokens {config.max_prompt_tokens}")
    if len(kept) < len(rows) and not quiet:
        print(f"{what}: dropped {len(rows) - len(kept)} of {len(rows)} prompts longer than "
              f"--max-prompt-tokens {config.max_prompt_tokens}")
    return kept


# ----------------------------------------------------------------------------------------------
# What a step trains on


def step_prompts(train_rows, step, prompts_per_step, seed):
    """The prompts of one step: a fresh seeded permutation of the data each epoch."""
    rows = []
    for index in range(step * prompts_per_step, (step + 1) * prompts_per_step):
        epoch, offset = divmod(index, len(train_rows))
        order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(seed + epoch))
        rows.append(train_rows[order[offset]])
    return rows


def prompt_seed(*parts):
    """A 63-bit seed from (stream, seed, step, index): the randomness of one prompt's completions,
    the same whichever batch or rank samples it."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2**63 - 1)
