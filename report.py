"""What a finished (or stopped) run shows: its metrics and evaluations read back, the paper's tables
(`python train.py --report runs/*`) and the plot (`--plot`).

The tables follow the paper's (arXiv 2606.00257, §4; README, "The paper's run"): greedy accuracy and
pass@k under both answer checkers, the training method's concentration (Gini, EffN/T) and every
credit signal's concentration on the run's own rollouts. Runs of one method and learning rate over
several seeds (a sweep) get a table of their means and ranges, with each method's weight on the
computed tokens (a task that marks them: the demo) over three windows of steps: the warm-up, the ten
steps after it (the peak learning rate) and the last third. matplotlib is an optional extra,
imported only by `plot`.
"""

import json
from pathlib import Path

from credit import METHODS


def read_metrics(out):
    """metrics.jsonl's rows; a torn last line (a kill or a full disk mid-write) is dropped, any other bad line
    is an error."""
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


# ----------------------------------------------------------------------------------------------
# Figures of a run, and of runs over seeds


def step_mean(metrics, key, first_step=1, last_step=None):
    """A metric's mean over a run's steps (first_step to last_step), or None when no such step logged it."""
    last_step = last_step or float("inf")
    values = [m[key] for m in metrics if m.get(key) is not None and first_step <= m["step"] <= last_step]
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


def step_windows(config):
    """The sweep's windows of steps, (first, last) each: early = the warm-up, peak = the ten steps after
    it (the learning rate at its highest), late = the last third of the run."""
    warmup, steps = config["warmup_steps"], config["steps"]
    return {"early": (1, max(warmup, 1)), "peak": (warmup + 1, warmup + 10),
            "late": (steps - steps // 3 + 1, steps)}


def sweep_key(config):
    """What tells the runs of a sweep apart, the seed aside: the method, its rank, its learning rate (and
    arca-recent's k; None for the other methods)."""
    recent = config.get("arca_recent_updates") if config["credit"] == "arca-recent" else None
    return config["credit"], config["rank"], config["lr"], recent


def over_seeds(runs):
    """One row per (method, rank, learning rate) with several runs (seeds): greedy accuracy and pass@k at
    the first and the last evaluation, the training method's Gini and EffN/T (each run's mean over its
    steps) and its computed mass in each step window (step_windows), as mean (min-max) over the runs.
    runs: [(config, evals, metrics)]."""
    groups = {}
    for config, evals, metrics in runs:
        groups.setdefault(sweep_key(config), []).append((config, evals, metrics))
    # the methods in credit.METHODS' order, each one's learning rates largest first, then its k
    order = lambda item: (METHODS.index(item[0][0]), -item[0][2], item[0][3] or 0)
    rows = []
    for (method, rank, lr, recent), members in sorted(groups.items(), key=order):
        if len(members) < 2:
            continue
        pass_k = f"pass@{members[0][0]['pass_k']}"
        windows = step_windows(members[0][0])
        name = method if recent is None else f"{method} (k {recent})"
        row = {"method": name, "rank": rank, "lr": f"{lr:g}", "seeds": len(members),
               "greedy acc, first": mean_and_range([e[0]["greedy_accuracy"] for _, e, _ in members]),
               "greedy acc, last": mean_and_range([e[-1]["greedy_accuracy"] for _, e, _ in members]),
               f"{pass_k}, first": mean_and_range([e[0][pass_k] for _, e, _ in members]),
               f"{pass_k}, last": mean_and_range([e[-1][pass_k] for _, e, _ in members]),
               "Gini G(w)": mean_and_range([step_mean(m, "weight_gini") for _, _, m in members]),
               "EffN/T": mean_and_range([step_mean(m, "effective_token_ratio") for _, _, m in members]),
               "computed mass": mean_and_range([step_mean(m, f"computed_mass/{method}")
                                                for _, _, m in members])}
        for name, (first, last) in windows.items():
            masses = [step_mean(m, f"computed_mass/{method}", first, last) for _, _, m in members]
            row[f"computed mass, {name} ({first}-{last})"] = mean_and_range(masses)
        rows.append(row)
    if not rows:
        return ""
    columns = ["method", "rank", "lr", "seeds", "greedy acc, first", "greedy acc, last", f"{pass_k}, first",
               f"{pass_k}, last", "Gini G(w)", "EffN/T", "computed mass"]
    window_columns = [column for column in rows[0] if column.startswith("computed mass, ")]
    return ("\n\nOver seeds (each method's runs at one learning rate: mean (min-max); first and last "
            "evaluation; Gini, EffN/T and computed mass of the training method, mean over steps)\n\n"
            + markdown_table(rows, columns)
            + "\n\nThe training method's computed mass over windows of steps (early: the warm-up; peak: the "
            "ten steps after it; late: the last third; mean (min-max) over seeds)\n\n"
            + markdown_table(rows, ["method", "rank", "lr", "seeds", "greedy acc, last", f"{pass_k}, last",
                                    *window_columns]))


# ----------------------------------------------------------------------------------------------
# The tables


def run_row(directory, info, evals, metrics):
    """One run's row of the tables: where its data come from, accuracy, concentration, ARCA's fidelity."""
    config, final = info["config"], evals[-1]
    pass_k = f"pass@{config['pass_k']}"
    finished = final["step"] >= config["steps"] and (Path(directory) / "adapter").is_dir()
    sources = info.get("data") or {}
    sample = "a seeded sample of " if config.get("eval_sample") else "the first "

    def value(key):
        return f"{final[key]:.3f}" if key in final else "-"

    return {
        "run": f"`{directory}`" + ("" if finished else " (unfinished)"), "method": config["credit"],
        "rank": config["rank"], "task": config.get("task", "math"),
        "train data": sources.get("train", config.get("data") or "-"),
        "eval data": sources.get("eval", config.get("eval_data") or "-"),
        "eval set": f"{config.get('eval_set', 'test')}, {sample}{config['eval_problems']}",
        "trainable params": f"{info['trainable_parameters']:,}", "reward": config.get("reward", "symbolic"),
        "k": config["pass_k"], "greedy acc": value("greedy_accuracy"), "pass@k": value(pass_k),
        "greedy strict": value("greedy_accuracy_strict"), "pass@k strict": value(f"{pass_k}_strict"),
        "greedy symbolic": value("greedy_accuracy_symbolic"), "pass@k symbolic": value(f"{pass_k}_symbolic"),
        "avg train reward": mean_of(metrics, "reward_mean"), "Gini G(w)": mean_of(metrics, "weight_gini"),
        "EffN/T": mean_of(metrics, "effective_token_ratio"), "steps": final["step"],
        "arca precision": config.get("arca_precision", "bf16"),
        "ARCA exact corr": mean_of(metrics, "arca_exact_corr"),
        "ARCA floor ratio": mean_of(metrics, "arca_floor_ratio"),
    }


def signal_table(run, config, metrics):
    """Every signal's concentration on this run's own rollouts (mean over steps); the one that trains is
    marked."""
    logged = [method for method in METHODS if any(m.get(f"gini/{method}") is not None for m in metrics)]
    signals = [{"signal": method + (" (trains)" if method == config["credit"] else ""),
                "Gini G(w)": mean_of(metrics, f"gini/{method}"),
                "EffN/T": mean_of(metrics, f"effective_token_ratio/{method}"),
                "top-10% mass": mean_of(metrics, f"top10_mass/{method}"),
                "computed mass": mean_of(metrics, f"computed_mass/{method}")} for method in logged]
    columns = ["signal", "Gini G(w)", "EffN/T", "top-10% mass"]
    if any(m.get(f"computed_mass/{config['credit']}") is not None for m in metrics):
        columns.append("computed mass")
    return f"{run} ({config['credit']}, rank {config['rank']})\n\n" + markdown_table(signals, columns)


def report(directories):
    """Markdown tables of the runs in `directories` (the paper's, README "The paper's run"): accuracy under
    both checkers, concentration, the runs of a method over seeds, and every credit signal on each run's
    own rollouts.

    Each row names its run directory; a run whose last evaluation is before its --steps, or that
    has no adapter/ yet, is marked unfinished. Runs from before the strict checker show "-" there.
    """
    rows, signal_tables, runs = [], [], []
    for directory in directories:
        info, evals, metrics = read_run(directory)
        runs.append((info["config"], evals, metrics))
        rows.append(run_row(directory, info, evals, metrics))
        signal_tables.append(signal_table(rows[-1]["run"], info["config"], metrics))
    return (
        "Data (hub dataset@revision and file, or the local file)\n\n"
        + markdown_table(rows, ["run", "task", "train data", "eval data", "eval set"])
        + "\n\nAccuracy (final evaluation; greedy acc and pass@k under the run's training reward)\n\n"
        + markdown_table(rows, ["run", "method", "rank", "trainable params", "reward", "greedy acc", "k",
                                "pass@k", "avg train reward", "steps"])
        + "\n\nBoth checkers (strict: the reference code's string match, compare with the paper; symbolic: "
          "equivalent answers)\n\n"
        + markdown_table(rows, ["run", "method", "rank", "greedy strict", "pass@k strict", "greedy symbolic",
                                "pass@k symbolic"])
        + "\n\nCredit concentration of the training method (mean over steps); for ARCA, how much of its "
          "score is the adapter\n(mean over evaluation steps: Pearson of the training score with the exact "
          "fp32 one, mean bf16 score / exact score)\n\n"
        + markdown_table(rows, ["run", "method", "rank", "Gini G(w)", "EffN/T", "arca precision",
                                "ARCA exact corr", "ARCA floor ratio"])
        + over_seeds(runs)
        + "\n\nAll signals on this run's rollouts (mean over steps; computed mass: the share of weight on "
          "the tokens that compute the answer, for a task that marks them)\n\n" + "\n\n".join(signal_tables)
    )


def markdown_table(rows, columns):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    cells = [[str(row.get(column, "-")) for column in columns] for row in rows]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


# ----------------------------------------------------------------------------------------------
# The plots


def moving_mean(values, window):
    """The mean of each value and the window - 1 before it: [1, 3, 5], 2 -> [1, 2, 4]."""
    return [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
            for i in range(len(values))]


def import_pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib, an optional extra: pip install matplotlib") from None
    return plt


def plot(directories, path):
    """--plot: one PNG (matplotlib, an optional extra that training never imports). Runs that repeat a
    method and learning rate over seeds (a sweep) are drawn by plot_sweep; otherwise, per run: greedy
    accuracy and pass@k over steps, train reward over steps, every signal's Gini over steps
    (arca-shuffled's is ARCA's, by construction: one line) and, for a task that marks its computed tokens
    (the demo), each signal's weight on them."""
    runs = [(Path(directory).name, *read_run(directory)) for directory in directories]
    keys = [sweep_key(info["config"]) for _, info, _, _ in runs]
    if len(set(keys)) < len(keys):
        return plot_sweep(runs, path)
    plt = import_pyplot()
    marked = any(m.get("computed_mass/uniform") is not None for _, _, _, metrics in runs for m in metrics)
    figure, panels = plt.subplots(1, 4 if marked else 3, figsize=(20 if marked else 15, 4.2))
    accuracy, reward, concentration = panels[:3]
    colors = dict(zip(METHODS, plt.get_cmap("tab10").colors))
    styles = ["-", "--", ":", "-."]
    for index, (name, info, evals, metrics) in enumerate(runs):
        config, style = info["config"], styles[index % len(styles)]
        steps = [e["step"] for e in evals]
        pass_k = f"pass@{config['pass_k']}"
        line, = accuracy.plot(steps, [e["greedy_accuracy"] for e in evals], style, marker="o",
                              label=f"{name} greedy")
        accuracy.plot(steps, [e[pass_k] for e in evals], style, marker="s", color=line.get_color(), alpha=0.5,
                      label=f"{name} {pass_k}")
        window = max(1, len(metrics) // 20)  # a moving mean over 5% of the run
        smooth = moving_mean([m["reward_mean"] for m in metrics], window)
        reward.plot([m["step"] for m in metrics], smooth, style, label=name)
        suffix = f" ({name})" if len(runs) > 1 else ""
        for key, axes in (("gini", concentration), ("computed_mass", panels[3] if marked else None)):
            for method in METHODS:
                points = [(m["step"], m[f"{key}/{method}"]) for m in metrics
                          if m.get(f"{key}/{method}") is not None]
                if axes is None or not points or (key == "gini" and method == "arca-shuffled"):
                    continue
                label = "arca and arca-shuffled" if key == "gini" and method == "arca" else method
                axes.plot(*zip(*points), style, color=colors[method], label=label + suffix)
    accuracy.set(title=f"evaluation ({config.get('reward', 'symbolic')} reward)", xlabel="step",
                 ylabel="accuracy")
    reward.set(title="train reward (moving mean)", xlabel="step", ylabel="mean reward")
    concentration.set(title="Gini of each signal's weights, same rollouts", xlabel="step", ylabel="Gini G(w)",
                      ylim=(0, 1))
    if marked:
        panels[3].set(title="weight on the computed tokens, same rollouts", xlabel="step",
                      ylabel="computed mass", ylim=(0, 1))
    save(figure, panels, path)


def plot_sweep(runs, path):
    """A sweep's figure: per (method, learning rate, arca-recent's k), the mean over seeds of greedy
    accuracy at each evaluation, and of the training method's weight on the computed tokens over steps
    (a moving mean over 5% of the run), one colour per method and one line style per learning rate and
    k."""
    plt = import_pyplot()
    groups = {}
    for _, info, evals, metrics in runs:
        groups.setdefault(sweep_key(info["config"]), []).append((evals, metrics))
    figure, panels = plt.subplots(1, 2, figsize=(15, 4.8))
    accuracy, mass = panels
    methods = sorted({key[0] for key in groups}, key=lambda m: METHODS.index(m) if m in METHODS else 99)
    variants = sorted({(key[2], key[3] or 0) for key in groups}, key=lambda v: (-v[0], v[1]))  # (lr, k)
    colors = dict(zip(methods, plt.get_cmap("tab10").colors))
    styles = dict(zip(variants, ["-", "--", ":", "-."] * 4))
    ordered = sorted(groups.items(), key=lambda item: (-item[0][2], item[0][0]))  # by lr, then by method
    for (method, rank, lr, recent), members in ordered:
        label = f"{method}{'' if recent is None else f' k {recent}'}, lr {lr:g} ({len(members)} seeds)"
        steps = [e["step"] for e in members[0][0]]
        greedy = [sum(evals[i]["greedy_accuracy"] for evals, _ in members) / len(members)
                  for i in range(len(steps))]
        style = styles[lr, recent or 0]
        accuracy.plot(steps, greedy, style, marker="o", color=colors[method], label=label)
        key = f"computed_mass/{method}"
        per_step = {}
        for _, metrics in members:
            for m in metrics:
                if m.get(key) is not None:
                    per_step.setdefault(m["step"], []).append(m[key])
        if per_step:
            x = sorted(per_step)
            y = moving_mean([sum(per_step[s]) / len(per_step[s]) for s in x], max(1, len(x) // 20))
            mass.plot(x, y, style, color=colors[method], label=label)
    accuracy.set(title="greedy accuracy (mean over seeds)", xlabel="step", ylabel="accuracy")
    mass.set(title="the training method's weight on the computed tokens (mean over seeds)", xlabel="step",
             ylabel="computed mass", ylim=(0, 1))
    save(figure, panels, path)


def save(figure, panels, path):
    for axes in panels:
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    print(f"--plot: wrote {path}")
