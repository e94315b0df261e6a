"""The CPU demo: a tiny Qwen3 that half knows column addition, built on first use and cached.

`python train.py --preset demo` runs the real pipeline (loader, LoRA, sampler, GRPO, credit, math
reward) on a model small enough to train on a laptop CPU in a few minutes. This file makes that
model and its task; nothing else in the project knows it is a toy.

Task: `a+b=` with a, b in 10..99, answered by adding the columns with a scratchpad, then
`\\boxed{a+b}`, scored by `math_reward` on the last `\\boxed{}`:

    47+85=  ->  7+5=12,4+8+1=13,\\boxed{132}

Each column writes its two digits, the carry into it (the tens column always: +0 or +1) and its sum
as two digits (carry and digit). The 8,100 pairs are split once, by a fixed permutation, into
7,100 "train" and 1,000 "test" problems, so evaluation is on additions the model never saw.
Completions are 21 or 22 tokens with EOS. Every token is one of three kinds (`token_roles`):
- a copy: an operand digit (of the prompt), the carry (the tens digit of the ones column's sum),
  an answer digit (of the column sums);
- computed: a column sum's two digits, where the addition happens;
- format: `+`, `=`, `,`, `\\boxed{`, `}`, EOS.
A credit method that finds where the answer is decided puts its weight on the computed tokens:
each step logs that share (train.py's computed_mass/<method>).

Tokenizer (`tokenizers`, saved as tokenizer.json): one token per character of the task, plus
`\\boxed{` as a single token and `<|endoftext|>` (id 0) as EOS and pad, as in Qwen3. A word-level
model over a split into those pieces, fused back on decode; an unknown character is an error.

Model: Qwen3 with hidden 64, 2 layers, 4 query and 2 key/value heads of dim 16, MLP 256, tied
embeddings, fp32: 124,352 parameters. Initialised N(0, 0.02) from its own generator, norm weights 1.

Warm-up: supervised fine-tuning of the whole model on train problems (loss on the completion
tokens only), AdamW, batches of 128, constant lr 3e-3 after 20 warm-up steps, until the greedy
accuracy on 200 train problems held back from it first reaches 25% (checked every 5 steps).
Stopping on accuracy rather than after a fixed step count puts the start of RL at the same place
on every machine and seed: mid-way through learning the column sums, neither hopeless (GRPO needs
groups whose rewards differ) nor solved (it needs room to climb). The format is learnt long before
the arithmetic, so RL works on the sums. Everything draws from one seeded torch.Generator and no
global RNG is touched, and the warm-up runs on one CPU thread (how a matmul is split across threads
changes its rounding, and over hundreds of steps the checkpoint): two builds with the same seed are
bit-identical on a machine whatever its core count or load (same CPU kernels: the same instruction
set and torch version).

Files (the layout of a Hugging Face checkpoint, loaded by `Qwen3.from_pretrained` and
`load_tokenizer` like a real one): config.json, model.safetensors, tokenizer.json, and
recipe.json (the recipe's hash and how the warm-up went). A directory whose recipe.json carries
the current hash is reused; a build is written to a temporary sibling and renamed into place, so
an interrupted build never leaves a half checkpoint.
"""

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from math_reward import math_reward
from model import Qwen3, Qwen3Config
from sampling import generate

DEMO_PROMPT_TEMPLATE = "{problem}"  # train.py's --prompt-template for the demo
EOS = "<|endoftext|>"
BOXED = "\\boxed{"
VOCAB = [EOS, BOXED, *"0123456789+=,}"]  # id 0 is EOS (and pad)
OPERANDS = range(10, 100)  # two-digit a and b
TEST_SIZE = 1000
SPLIT_SEED = 0  # fixes which problems are held out; independent of every run's seed

MODEL = dict(
    vocab_size=len(VOCAB), hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rope_theta=10000.0,
    tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, torch_dtype="float32",
)
WARMUP = dict(batch_size=128, lr=1e-3, lr_warmup_steps=20, max_steps=3000, check_every=5,
              target_accuracy=0.25, validation_problems=200, init_std=0.02)
# bump when the code below changes what a build produces (3: column addition with a scratchpad)
RECIPE_VERSION = 3


# ----------------------------------------------------------------------------------------------
# The task


def _split_pairs():
    """{"train": [(a, b), ...], "test": [...]}: a fixed permutation of every pair, the first TEST_SIZE held
    out."""
    pairs = [(a, b) for a in OPERANDS for b in OPERANDS]
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    return {"test": [pairs[i] for i in order[:TEST_SIZE]], "train": [pairs[i] for i in order[TEST_SIZE:]]}


def demo_problems(split, count, seed):
    """`count` problems of `split` ("train" or "test"), drawn without replacement by `seed`.

    Example: demo_problems("test", 2, 0) -> [{"problem": "64+73=", "answer": "137"}, ...]
    Asking for more than the split holds is an error.
    """
    splits = _split_pairs()
    if split not in splits:
        raise ValueError(f"demo_problems: split {split!r}, expected 'train' or 'test'")
    pairs = splits[split]
    if not 0 < count <= len(pairs):
        raise ValueError(f"demo_problems: count {count} for split {split!r}, expected 1 to {len(pairs)}")
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    return [{"problem": f"{pairs[i][0]}+{pairs[i][1]}=", "answer": str(sum(pairs[i]))} for i in order]


def completion_text(problem):
    """What the warm-up teaches the model to write after the prompt (EOS follows).
    "47+85=" -> "7+5=12,4+8+1=13,\\boxed{132}"."""
    a, b = (int(operand) for operand in problem.removesuffix("=").split("+"))
    ones = a % 10 + b % 10
    tens = a // 10 + b // 10 + ones // 10
    return f"{a % 10}+{b % 10}={ones:02d},{a // 10}+{b // 10}+{ones // 10}={tens:02d},{BOXED}{a + b}}}"


# The scratchpad's tokens in order; a column sum's two digits are where the addition happens.
_COLUMNS = ("digit", "+", "digit", "=", "sum", "sum", ",",  # the units column
            "digit", "+", "digit", "+", "digit", "=", "sum", "sum", ",", BOXED)  # the tens, with the carry


def token_roles(problem, tokens):
    """Which completion tokens are computed: [True on a column sum's two digits, False on copies and format]
    for `tokens` (the completion's token texts, EOS included or not), or None when they do not follow the
    scratchpad's layout (`problem` is the prompt; the roles depend on the layout, not on the arithmetic).

        "7 + 5 = 1 2 , 4 + 8 + 1 = 1 3 , \\boxed{ 1 3 2 } EOS" -> True at the 5th, 6th, 14th and 15th tokens
    """
    if len(tokens) < len(_COLUMNS) + 2:
        return None
    for token, kind in zip(tokens, _COLUMNS):
        expected_digit = kind in ("digit", "sum")
        is_digit = len(token) == 1 and token.isdigit()
        if (expected_digit and not is_digit) or (not expected_digit and token != kind):
            return None
    rest = tokens[len(_COLUMNS) :]
    closing = rest.index("}") if "}" in rest else -1
    answer, after = rest[:closing], rest[closing + 1 :]
    if closing < 1 or not all(len(t) == 1 and t.isdigit() for t in answer) or after not in ([], [EOS]):
        return None
    return [kind == "sum" for kind in _COLUMNS] + [False] * len(rest)


# ----------------------------------------------------------------------------------------------
# Tokenizer and model


def build_tokenizer():
    """Character-level tokenizer over VOCAB, `\\boxed{` one token; decodes back to the exact text."""
    tokenizer = Tokenizer(models.WordLevel({token: i for i, token in enumerate(VOCAB)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"\\boxed\{|."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([EOS])
    return tokenizer


def init_model(config, generator, std):
    """Qwen3 with every weight matrix drawn N(0, std) from `generator` and norm weights 1 (fp32, CPU)."""
    with torch.device("meta"):
        model = Qwen3(config)
    model.to_empty(device="cpu")
    model.lm_head.weight = model.model.embed_tokens.weight  # to_empty may untie
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                nn.init.normal_(param, std=std, generator=generator)
    return model


def sft_batch(examples):
    """Right-padded input ids and targets (B, T) for (prompt ids, completion ids) pairs.

    Targets are the next token on completion positions and -100 elsewhere, so the loss is on the
    completion only. Example, prompt [5, 6], completion [7, 0] (0 = EOS = pad), T = 5:
        ids     [5, 6, 7, 0, 0]
        targets [-100, 7, 0, -100, -100]
    Right padding needs no attention mask: causal attention never lets a real token see a pad.
    """
    T = max(len(p) + len(c) for p, c in examples)
    ids = torch.zeros(len(examples), T, dtype=torch.long)  # (B, T)
    targets = torch.full((len(examples), T), -100, dtype=torch.long)  # (B, T)
    for row, (prompt, completion) in enumerate(examples):
        sequence = prompt + completion
        ids[row, : len(sequence)] = torch.tensor(sequence)
        targets[row, len(prompt) - 1 : len(sequence) - 1] = torch.tensor(completion)
    return ids, targets


def greedy_accuracy(model, tokenizer, problems):
    """Share of problems whose greedy completion's last \\boxed{} answer is right (math_reward)."""
    prompts = [tokenizer.encode(DEMO_PROMPT_TEMPLATE.format(problem=p["problem"])).ids for p in problems]
    tokens, mask = generate(model, prompts, 24, temperature=0.0, top_p=1.0, eos_token_id=0)  # (B, N)
    texts = [tokenizer.decode(row[valid].tolist(), skip_special_tokens=False)
             for row, valid in zip(tokens, mask)]
    return sum(math_reward(text, p["answer"]) for text, p in zip(texts, problems)) / len(problems)


def warm_up(model, tokenizer, generator):
    """Supervised fine-tuning until greedy accuracy on a validation slice of train reaches the target.

    Returns (steps taken, validation accuracy at the stop).
    """
    train = demo_problems("train", len(_split_pairs()["train"]), seed=0)
    validation, train = train[: WARMUP["validation_problems"]], train[WARMUP["validation_problems"] :]
    encode = lambda text: tokenizer.encode(text).ids
    examples = [(encode(DEMO_PROMPT_TEMPLATE.format(problem=p["problem"])),
                 encode(completion_text(p["problem"])) + [0]) for p in train]
    optimizer = torch.optim.AdamW(model.parameters(), lr=WARMUP["lr"], weight_decay=0.0, betas=(0.9, 0.98))
    accuracy = 0.0
    for step in range(1, WARMUP["max_steps"] + 1):
        rows = torch.randint(len(examples), (WARMUP["batch_size"],), generator=generator).tolist()
        ids, targets = sft_batch([examples[i] for i in rows])  # (B, T), (B, T)
        for group in optimizer.param_groups:
            group["lr"] = WARMUP["lr"] * min(1.0, step / WARMUP["lr_warmup_steps"])
        model.train()
        logits = model.lm_head(model(ids))  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % WARMUP["check_every"] == 0:
            model.eval()
            accuracy = greedy_accuracy(model, tokenizer, validation)
            if accuracy >= WARMUP["target_accuracy"]:
                return step, accuracy
    raise RuntimeError(f"demo warm-up: validation accuracy {accuracy:.2f} after {WARMUP['max_steps']} steps, "
                       f"expected {WARMUP['target_accuracy']:.2f}; the recipe in demo.py needs retuning")


# ----------------------------------------------------------------------------------------------
# Building and caching


def recipe_hash(seed):
    """Hash of everything that decides the checkpoint's bytes."""
    recipe = {"version": RECIPE_VERSION, "seed": seed, "vocab": VOCAB, "model": MODEL, "warmup": WARMUP,
              "operands": [OPERANDS.start, OPERANDS.stop], "test_size": TEST_SIZE, "split_seed": SPLIT_SEED,
              "template": DEMO_PROMPT_TEMPLATE, "torch": torch.__version__.split("+")[0]}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def is_built(directory, seed):
    """True when `directory` holds a complete checkpoint of the current recipe for `seed`."""
    directory = Path(directory)
    try:
        recipe = json.loads((directory / "recipe.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    files = ("config.json", "model.safetensors", "tokenizer.json")
    return recipe.get("hash") == recipe_hash(seed) and all((directory / name).is_file() for name in files)


def write_checkpoint(directory, model, tokenizer, record):
    """config.json, model.safetensors (HF names, lm_head tied so not stored), tokenizer.json, recipe.json
    last."""
    config = {**asdict(model.config), "architectures": ["Qwen3ForCausalLM"], "pad_token_id": 0}
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()
               if name != "lm_head.weight"}
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "recipe.json").write_text(json.dumps(record, indent=1))


def build_demo_checkpoint(directory, seed=0):
    """The demo checkpoint in `directory`, built (a warm-up of some seconds, once) unless already there.

    Returns the directory as a Path. Deterministic given the seed on a given machine.
    """
    directory = Path(directory).expanduser()
    if is_built(directory, seed):
        return directory
    print(f"building the demo checkpoint in {directory}: a tiny Qwen3 and a supervised warm-up on "
          f"column additions (once; cached)", flush=True)
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    config = Qwen3Config(**MODEL)
    model = init_model(config, generator, WARMUP["init_std"])
    tokenizer = build_tokenizer()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a CPU matmul's rounding depends on how many threads split it: one, always
    try:
        steps, accuracy = warm_up(model, tokenizer, generator)
    finally:
        torch.set_num_threads(threads)
    seconds = round(time.perf_counter() - started, 1)
    record = {"hash": recipe_hash(seed), "seed": seed, "warmup_steps": steps,
              "validation_greedy_accuracy": accuracy, "build_seconds": seconds}

    directory.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.building-"))
    try:
        write_checkpoint(staged, model, tokenizer, record)
        staged.chmod(0o755)  # mkdtemp's 0o700 would hide a shared cache from other users
        if directory.exists():  # a stale recipe or a broken build
            shutil.rmtree(directory)
        os.replace(staged, directory)
    except OSError:
        shutil.rmtree(staged, ignore_errors=True)
        if not is_built(directory, seed):  # a concurrent build that finished first is as good as ours
            raise
    print(f"demo checkpoint ready in {record['build_seconds']} s: {steps} warm-up steps, greedy accuracy "
          f"{accuracy:.0%} on train problems held back from the warm-up", flush=True)
    return directory
