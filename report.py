"""What a finished (or stopped) run shows: its metrics and evaluations read back, the paper's tables
(`python train.py --report runs/*`) and the plot (`--plot`).

The tables follow the paper's (arXiv 2606.00257, §4; README, "The paper's run"): greedy accuracy and
pass@k under both answer checkers, the training method's concentration (Gini, EffN/T) and every
credit signal's concentration on the run's own rollouts. matplotlib is an optional extra, imported
only by `plot`.
"""

import json
from pathlib import Path

from credit import METHODS


def read_metrics(out):
    """metrics.jsonl's rows; a torn last line (a kill or a full disk mid-write) is dropped, any other bad line is an error."""
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                print(f"{path}: dropped a torn last line ({len(line)} characters)")
                break
            raise SystemExit(f"{path}:{number}: not valid JSON; fix or remove that line to resume") from None
    return rows


def read_run(directory):
    """(info from config.json, evaluations, metrics rows) of a run directory, for --report and --plot."""
    directory = Path(directory)
    try:
        info = json.loads((directory / "config.json").read_text())
        evals = json.loads((directory / "eval.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"--report: {directory} is not a run directory ({err})") from None
    return info, evals, read_metrics(directory)


def step_mean(metrics, key):
    """A metric's mean over a run's steps, or None when no step logged it."""
    values = [m[key] for m in metrics if m.get(key) is not None]
    return sum(values) / len(values) if values else None


def mean_of(metrics, key):
    mean = step_mean(metrics, key)
    return "-" if mean is None else f"{mean:.3f}"


def mean_and_range(values):
    """A few runs' numbers as "mean (min-max)": 0.430 (0.410-0.455)."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = sum(values) / len(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ({min(values):.3f}-{max(values):.3f})"


def over_seeds(runs):
    """One row per (method, rank) that has several runs (seeds): greedy accuracy and pass@k at the first and the
    last evaluation, and the training method's Gini, EffN/T and computed mass (each run's mean over steps),
    as mean (min-max) over the runs. runs: [(config, evals, metrics)]."""
    groups = {}
    for config, evals, metrics in runs:
        groups.setdefault((config["credit"], config["rank"]), []).append((config, evals, metrics))
    rows = []
    for (method, rank), members in groups.items():
        if len(members) < 2:
            continue
        pass_k = f"pass@{members[0][0]['pass_k']}"
        rows.append({
            "method": method, "rank": rank, "seeds": len(members),
            "greedy acc, first": mean_and_range([e[0]["greedy_accuracy"] for _, e, _ in members]),
            "greedy acc, last": mean_and_range([e[-1]["greedy_accuracy"] for _, e, _ in members]),
            f"{pass_k}, first": mean_and_range([e[0][pass_k] for _, e, _ in members]),
            f"{pass_k}, last": mean_and_range([e[-1][pass_k] for _, e, _ in members]),
            "Gini G(w)": mean_and_range([step_mean(m, "weight_gini") for _, _, m in members]),
            "EffN/T": mean_and_range([step_mean(m, "effective_token_ratio") for _, _, m in members]),
            "computed mass": mean_and_range([step_mean(m, f"computed_mass/{method}") for _, _, m in members]),
        })
    if not rows:
        return ""
    columns = ["method", "rank", "seeds", "greedy acc, first", "greedy acc, last", f"{pass_k}, first", f"{pass_k}, last", "Gini G(w)",
               "EffN/T", "computed mass"]
    return ("\n\nOver seeds (each method's runs: mean (min-max); first and last evaluation; Gini, EffN/T and computed mass of the "
            "training method, mean over steps)\n\n" + markdown_table(rows, columns))


def report(directories):
    """Markdown tables of the runs in `directories` (the paper's, README "The paper's run"): accuracy under
    both checkers, concentration, the runs of a method over seeds, and all seven credit signals on
    each run's own rollouts.

    Each row names its run directory; a run whose last evaluation is before its --steps, or that
    has no adapter/ yet, is marked unfinished. Runs from before the strict checker show "-" there.
    """
    rows, signal_tables, runs = [], [], []
    for directory in directories:
        info, evals, metrics = read_run(directory)
        runs.append((info["config"], evals, metrics))
        config, final = info["config"], evals[-1]
        value = lambda key: f"{final[key]:.3f}" if key in final else "-"
        pass_k = f"pass@{config['pass_k']}"
        finished = final["step"] >= config["steps"] and (Path(directory) / "adapter").is_dir()
        run = f"`{directory}`" + ("" if finished else " (unfinished)")
        sources = info.get("data") or {}
        rows.append({
            "run": run, "method": config["credit"], "rank": config["rank"], "task": config.get("task", "math"),
            "train data": sources.get("train", config.get("data") or "-"), "eval data": sources.get("eval", config.get("eval_data") or "-"),
            "eval set": f"{config.get('eval_set', 'test')}, {'a seeded sample of ' if config.get('eval_sample') else 'the first '}{config['eval_problems']}",
            "trainable params": f"{info['trainable_parameters']:,}", "reward": config.get("reward", "symbolic"),
            "k": config["pass_k"], "greedy acc": value("greedy_accuracy"), "pass@k": value(pass_k),
            "greedy strict": value("greedy_accuracy_strict"), "pass@k strict": value(f"{pass_k}_strict"),
            "greedy symbolic": value("greedy_accuracy_symbolic"), "pass@k symbolic": value(f"{pass_k}_symbolic"),
            "avg train reward": mean_of(metrics, "reward_mean"), "Gini G(w)": mean_of(metrics, "weight_gini"),
            "EffN/T": mean_of(metrics, "effective_token_ratio"), "steps": final["step"],
            "arca precision": config.get("arca_precision", "bf16"), "ARCA exact corr": mean_of(metrics, "arca_exact_corr"),
            "ARCA floor ratio": mean_of(metrics, "arca_floor_ratio"),
        })
        signals = [{"signal": method + (" (trains)" if method == config["credit"] else ""), "Gini G(w)": mean_of(metrics, f"gini/{method}"),
                    "EffN/T": mean_of(metrics, f"effective_token_ratio/{method}"), "top-10% mass": mean_of(metrics, f"top10_mass/{method}"),
                    "computed mass": mean_of(metrics, f"computed_mass/{method}")} for method in METHODS]
        columns = ["signal", "Gini G(w)", "EffN/T", "top-10% mass"] + (["computed mass"] if any(m.get(f"computed_mass/{config['credit']}") is not None
                                                                                                 for m in metrics) else [])
        signal_tables.append(f"{run} ({config['credit']}, rank {config['rank']})\n\n" + markdown_table(signals, columns))

    return (
        "Data (hub dataset@revision and file, or the local file)\n\n"
        + markdown_table(rows, ["run", "task", "train data", "eval data", "eval set"])
        + "\n\nAccuracy (final evaluation; greedy acc and pass@k under the run's training reward)\n\n"
        + markdown_table(rows, ["run", "method", "rank", "trainable params", "reward", "greedy acc", "k", "pass@k", "avg train reward", "steps"])
        + "\n\nBoth checkers (strict: the reference code's string match, compare with the paper; symbolic: equivalent answers)\n\n"
        + markdown_table(rows, ["run", "method", "rank", "greedy strict", "pass@k strict", "greedy symbolic", "pass@k symbolic"])
        + "\n\nCredit concentration of the training method (mean over steps); for ARCA, how much of its score is the adapter\n"
        + "(mean over evaluation steps: Pearson of the training score with the exact fp32 one, mean bf16 score / exact score)\n\n"
        + markdown_table(rows, ["run", "method", "rank", "Gini G(w)", "EffN/T", "arca precision", "ARCA exact corr", "ARCA floor ratio"])
        + over_seeds(runs)
        + f"\n\nAll seven signals on this run's rollouts ({', '.join(METHODS)}; mean over steps; computed mass: the share of weight on "
        + "the tokens that compute the answer, for a task that marks them)\n\n" + "\n\n".join(signal_tables)
    )


def markdown_table(rows, columns):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(str(row.get(c, "-")) for c in columns) + " |" for row in rows])


def plot(directories, path):
    """--plot: per run, greedy accuracy and pass@k over steps, train reward over steps, the seven signals'
    Gini over steps (arca-shuffled's is ARCA's, by construction: one line), and, for a task that marks
    its computed tokens (the demo), each signal's weight on them, in one PNG (matplotlib, an optional
    extra that training never imports)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib, an optional extra: pip install matplotlib") from None
    runs = [(Path(directory).name, *read_run(directory)) for directory in directories]
    marked = any(m.get("computed_mass/uniform") is not None for _, _, _, metrics in runs for m in metrics)
    figure, panels = plt.subplots(1, 4 if marked else 3, figsize=(20 if marked else 15, 4.2))
    accuracy, reward, concentration = panels[:3]
    colors = dict(zip(METHODS, ("0.5", "tab:orange", "tab:green", "tab:purple", "tab:red", "tab:pink", "tab:olive")))
    styles = ["-", "--", ":", "-."]
    for index, (name, info, evals, metrics) in enumerate(runs):
        config, style = info["config"], styles[index % len(styles)]
        steps = [e["step"] for e in evals]
        pass_k = f"pass@{config['pass_k']}"
        line, = accuracy.plot(steps, [e["greedy_accuracy"] for e in evals], style, marker="o", label=f"{name} greedy")
        accuracy.plot(steps, [e[pass_k] for e in evals], style, marker="s", color=line.get_color(), alpha=0.5, label=f"{name} {pass_k}")
        window = max(1, len(metrics) // 20)  # a moving mean over 5% of the run
        rewards = [m["reward_mean"] for m in metrics]
        smooth = [sum(rewards[max(0, i - window + 1) : i + 1]) / len(rewards[max(0, i - window + 1) : i + 1]) for i in range(len(rewards))]
        reward.plot([m["step"] for m in metrics], smooth, style, label=name)
        suffix = f" ({name})" if len(runs) > 1 else ""
        for key, axes in (("gini", concentration), ("computed_mass", panels[3] if marked else None)):
            for method in METHODS:
                points = [(m["step"], m[f"{key}/{method}"]) for m in metrics if m.get(f"{key}/{method}") is not None]
                if axes is None or not points or (key == "gini" and method == "arca-shuffled"):
                    continue
                label = "arca and arca-shuffled" if key == "gini" and method == "arca" else method
                axes.plot(*zip(*points), style, color=colors[method], label=label + suffix)
    accuracy.set(title=f"evaluation ({config.get('reward', 'symbolic')} reward)", xlabel="step", ylabel="accuracy")
    reward.set(title="train reward (moving mean)", xlabel="step", ylabel="mean reward")
    concentration.set(title="Gini of each signal's weights, same rollouts", xlabel="step", ylabel="Gini G(w)", ylim=(0, 1))
    if marked:
        panels[3].set(title="weight on the computed tokens, same rollouts", xlabel="step", ylabel="computed mass", ylim=(0, 1))
    for axes in panels:
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    print(f"--plot: wrote {path}")
