"""Rewards and the held-out evaluation: the answer checkers a run trains on and reports, greedy accuracy
and pass@k on the evaluation problems, and credit.html.

The reference code's protocol (README, This implementation and the reference code): greedy accuracy
and pass@k (k sampled completions at the training temperature and top-p) on the first 200 problems
of the test split, under its strict string check; this project also reports its symbolic checker
whatever trains. Each problem's k samples draw from a seed of (seed, step, the problem's index), so
the evaluation does not depend on the batch, the process count or the training rollouts.
"""

import itertools
import json
import math
from pathlib import Path

import torch
from tqdm import tqdm

from credit import credit_page, credit_section
from data import prompt_seed
from grpo import group_advantages
from lora import sampling_copies
from math_reward import gsm8k_reward, gsm8k_strict_match, math_reward, score_batch, strict_match
from ranks import gather, process_rank, world_size
from runs import write_atomically
from sampling import generate, sampling_options
from step_log import all_method_weights


# ----------------------------------------------------------------------------------------------
# Rewards


def score_strict(texts, golds, config):
    """The reference code's answer rule for the task (strict_match; GSM8K: gsm8k_strict_match):
    linear-time string work, scored in this process."""
    check = gsm8k_strict_match if config.task == "gsm8k" else strict_match
    return [check(text, gold) for text, gold in zip(texts, golds)], 0


def score_symbolic(texts, golds, config):
    """Symbolic equivalence of the task's answer (math_reward; GSM8K: gsm8k_reward), in worker processes
    bounded by --reward-timeout."""
    scorer = gsm8k_reward if config.task == "gsm8k" else math_reward
    return score_batch(texts, golds, timeout=config.reward_timeout, scorer=scorer)


def score(texts, golds, config):
    """(rewards, timeouts) under the run's --reward."""
    if config.reward == "strict":
        return score_strict(texts, golds, config)
    return score_symbolic(texts, golds, config)


def task_roles(config):
    """The task's function from (problem, completion token texts) to its computed tokens, or None: the
    demo's additions know theirs (demo.token_roles); MATH, GSM8K and --data files do not."""
    if config.task == "demo" and not config.data:
        import demo

        return demo.token_roles
    return None


# ----------------------------------------------------------------------------------------------
# The evaluation


def generate_texts(model, tokenizer, prompts, config, temperature, row_generators=None, samples_per_prompt=1):
    """Completions (ids, text), samples_per_prompt of each prompt in a row, in batches of about
    eval_batch_size sequences; row_generators: one per completion (sampling)."""
    results = []
    per_batch = max(1, config.eval_batch_size // samples_per_prompt)  # prompts per generate call
    for start in range(0, len(prompts), per_batch):
        batch = prompts[start : start + per_batch]
        rows = slice(start * samples_per_prompt, (start + per_batch) * samples_per_prompt)
        generators = None if row_generators is None else row_generators[rows]
        with sampling_copies(model):
            options = sampling_options(config, tokenizer)
            tokens, mask = generate(model, batch, temperature=temperature, row_generators=generators,
                                    samples_per_prompt=samples_per_prompt, **options)
        for row in range(len(tokens)):
            ids = tokens[row][mask[row]].tolist()
            results.append((ids, tokenizer.decode(ids)))
    return results


@torch.no_grad()
def evaluate(model, tokenizer, eval_rows, config, step, out):
    """Greedy accuracy and pass@k on the held-out rows under both rewards; writes credit.html for a few
    completions. Returns (the figures, those completions as rows for a tracker's table).

    greedy_accuracy and pass@k are under the run's --reward; the _strict and _symbolic keys give
    both checkers whatever trains (strict compares with the paper, symbolic counts right answers).
    The k samples of problem i draw from prompt_seed("eval", seed, step, i), apart from training's.
    Distributed: each rank evaluates a contiguous share of the problems, the scores are gathered,
    and rank 0 writes credit.html from its share (the first problems).
    """
    model.eval()
    device, k = model.lm_head.weight.device, config.pass_k
    share = math.ceil(len(eval_rows) / world_size())
    first = process_rank() * share
    rows = eval_rows[first : first + share]
    prompts = [row["prompt_ids"] for row in rows]
    golds = [row["answer"] for row in rows]
    greedy = generate_texts(model, tokenizer, prompts, config, 0.0)
    generators = [torch.Generator(device).manual_seed(prompt_seed("eval", config.seed, step, first + i))
                  for i in range(len(rows))]
    row_generators = [g for g in generators for _ in range(k)]
    sampled = generate_texts(model, tokenizer, prompts, config, config.temperature, row_generators, k)
    scores, timeouts = {}, 0  # {(greedy or sampled, reward): this share's scores}
    for reward, scorer in (("strict", score_strict), ("symbolic", score_symbolic)):
        scores["greedy", reward], greedy_timeouts = scorer([text for _, text in greedy], golds, config)
        sampled_golds = [g for g in golds for _ in range(k)]
        sampled_texts = [text for _, text in sampled]
        scores["sampled", reward], sampled_timeouts = scorer(sampled_texts, sampled_golds, config)
        timeouts += greedy_timeouts + sampled_timeouts
    shares = gather((scores, timeouts))  # in rank order: the problems in file order
    result = {"step": step}
    for reward in ("strict", "symbolic"):
        greedy_scores = [x for share_scores, _ in shares for x in share_scores["greedy", reward]]
        sampled_scores = [x for share_scores, _ in shares for x in share_scores["sampled", reward]]
        per_problem = torch.tensor(sampled_scores, dtype=torch.float64).view(-1, k)  # (problems, k)
        result[f"greedy_accuracy_{reward}"] = sum(greedy_scores) / len(eval_rows)
        result[f"pass@{k}_{reward}"] = per_problem.amax(dim=1).mean().item()
    result["greedy_accuracy"] = result[f"greedy_accuracy_{config.reward}"]
    result[f"pass@{k}"] = result[f"pass@{k}_{config.reward}"]
    result["reward_timeouts"] = sum(t for _, t in shares)

    samples = []
    if config.html_completions and process_rank() == 0 and rows:
        sampled_scores = scores["sampled", config.reward]
        samples = write_credit_page(model, tokenizer, rows, sampled, sampled_scores, config, step, out)
    return result, samples


SAMPLE_COLUMNS = ["problem", "completion", "reward", "advantage", "ARCA's top tokens"]


def write_credit_page(model, tokenizer, eval_rows, sampled, scores, config, step, out):
    """credit.html: the k sampled completions of the first evaluation problem whose rewards differ
    (else the first problem), right and wrong ones alternating, up to html_completions of them, each
    with its reward and the GRPO advantage its group gives it, and every method's weights. Returns
    those completions as rows of SAMPLE_COLUMNS."""
    k, device = config.pass_k, model.lm_head.weight.device
    groups = torch.tensor(scores).view(-1, k)  # (problems, k)
    spread = (groups.amax(dim=1) > groups.amin(dim=1)).nonzero().flatten().tolist()
    problem = spread[0] if spread else 0
    rewards = groups[problem]  # (k,)
    advantages = torch.zeros(k)  # (k,) one completion: no group baseline
    if k > 1:
        advantages = group_advantages(rewards, torch.zeros(k, dtype=torch.long), config.advantage)
    right, wrong = [i for i in range(k) if rewards[i] > 0], [i for i in range(k) if rewards[i] <= 0]
    order = [i for pair in itertools.zip_longest(right, wrong) for i in pair if i is not None]
    shown = [i for i in order if sampled[problem * k + i][0]][: config.html_completions]
    if not shown:
        return []
    completions = [sampled[problem * k + i][0] for i in shown]
    width = max(len(ids) for ids in completions)
    tokens = torch.zeros(len(shown), width, dtype=torch.long, device=device)  # (n, T)
    mask = torch.zeros(len(shown), width, dtype=torch.bool, device=device)  # (n, T)
    for row, ids in enumerate(completions):
        tokens[row, : len(ids)], mask[row, : len(ids)] = torch.tensor(ids, device=device), True
    prompt = eval_rows[problem]["prompt_ids"]
    weights = all_method_weights(model, [prompt] * len(shown), tokens, mask, config.power, config.credit_eps,
                                 tokenizer.vocab_size)
    sections, samples = [], []
    for row, (i, ids) in enumerate(zip(shown, completions)):
        facts = {"completion": f"{i + 1} of {k} sampled at temperature {config.temperature}",
                 "problem": eval_rows[problem]["problem"], "gold answer": eval_rows[problem]["answer"],
                 f"reward ({config.reward})": f"{rewards[i].item():g}",
                 f"advantage ({config.advantage})": f"{advantages[i].item():+.3f}"}
        row_weights = {method: w[row, : len(ids)] for method, w in weights.items()}
        pieces = [tokenizer.decode([t]) for t in ids]
        sections.append(credit_section(pieces, row_weights, facts))
        top = row_weights["arca"].topk(min(5, len(ids)))  # ARCA's five largest weights
        top_tokens = ", ".join(f"{pieces[t]!r} {w:.3f}" for w, t in zip(*(x.tolist() for x in top)))
        samples.append([eval_rows[problem]["problem"], tokenizer.decode(ids), rewards[i].item(),
                        advantages[i].item(), top_tokens])
    title = f"token credit: {out}, step {step} (training method: {config.credit}, rank {config.rank})"
    page = credit_page(title, sections, max(len(ids) for ids in completions))
    write_atomically(Path(out) / "credit.html", page)
    return samples


def record_eval(model, tokenizer, eval_rows, config, step, out, evals, rank, tracker=None):
    """evaluate() at this step (every rank takes part); rank 0 appends it to eval.json, prints it and hands
    it, with a few sampled completions, to the --report-to tracker."""
    result, samples = evaluate(model, tokenizer, eval_rows, config, step, out)
    if tracker is not None:
        tracker.log({f"eval/{key}": value for key, value in result.items() if key != "step"}, step)
        tracker.table("eval/samples", SAMPLE_COLUMNS, samples, step)
    if rank == 0:
        evals.append(result)
        write_atomically(out / "eval.json", json.dumps(evals, indent=1))
        k = config.pass_k
        if config.reward == "symbolic":
            shown = ("greedy_accuracy", f"pass@{k}")
        else:
            shown = ("greedy_accuracy_strict", f"pass@{k}_strict",
                     "greedy_accuracy_symbolic", f"pass@{k}_symbolic")
        tqdm.write(f"step {step}: " + ", ".join(f"{key} {result[key]:.3f}" for key in shown))
