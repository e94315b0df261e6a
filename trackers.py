"""--report-to: the run's curves in the tools people watch (TensorBoard, Weights & Biases, trackio), beside
metrics.jsonl, which stays the record the project reads back.

Every metrics line goes to the tracker under its own name (reward_mean, gini/arca, ...) at its step,
every evaluation's figures at their step, and at evaluation steps a table of a few sampled completions
with their rewards and ARCA's top tokens (TensorBoard, which has no tables, gets it as a Markdown
text). A tracker's package is imported only when asked for: a missing one stops the run before it
starts with one line that says what to install. Once the run is going, a tracker that fails is a
warning, once, and never ends the run: the metrics are on disk whatever it does. Under torchrun only
the first process writes.
"""

import sys

TRACKERS = ("none", "tensorboard", "wandb", "trackio")


class TensorBoard:
    """Scalars and texts in <out>/tensorboard, through torch.utils.tensorboard (the tensorboard package)."""

    def __init__(self, out, config):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))

    def log(self, values, step):
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def table(self, name, columns, rows, step):
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
        self.writer.add_text(name, "\n".join(lines), step)

    def close(self):
        self.writer.close()


class WandB:
    """A Weights & Biases run named after --out, with the resolved config."""

    def __init__(self, out, config):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project="arca", name=str(out), dir=str(out), config=config)

    def log(self, values, step):
        self.run.log(values, step=step)

    def table(self, name, columns, rows, step):
        self.run.log({name: self.wandb.Table(columns=columns, data=rows)}, step=step)

    def close(self):
        self.run.finish()


class Trackio(WandB):
    """A trackio run (Hugging Face's local-first tracker) named after --out: it speaks wandb's API at
    module level (trackio.log, trackio.Table, trackio.finish), so the module plays the run."""

    def __init__(self, out, config):
        import trackio

        trackio.init(project="arca", name=str(out), config=config)
        self.wandb = self.run = trackio


BACKENDS = {"tensorboard": TensorBoard, "wandb": WandB, "trackio": Trackio}


class Tracker:
    """What train.py calls: start(out, config) once the run directory is there, then log(values, step),
    table(...) and close(). The numbers among `values` are sent (a flag as 0 or 1; None and text are
    not), and any error of the backend becomes one warning, after which the tracker stays quiet. kind
    "none", or a process other than the first: nothing at all."""

    def __init__(self, kind, rank=0):
        self.kind, self.backend = kind if rank == 0 else "none", None
        if self.kind == "none":
            return
        try:
            __import__(kind)  # the package is named as the tracker
        except ImportError:
            raise SystemExit(f"--report-to {kind} needs the {kind} package: pip install {kind}") from None

    def start(self, out, config):
        if self.kind != "none":
            self.backend = self.call(lambda: BACKENDS[self.kind](out, config))

    def call(self, action):
        try:
            return action()
        except Exception as err:  # the run goes on: metrics.jsonl holds everything
            print(f"warning: --report-to {self.kind} failed ({type(err).__name__}: {err}); the run goes on "
                  "without it", file=sys.stderr, flush=True)
            self.backend = None

    def log(self, values, step):
        numbers = {name: float(value) for name, value in values.items() if isinstance(value, (int, float))}
        if self.backend is not None and numbers:
            self.call(lambda: self.backend.log(numbers, step))

    def table(self, name, columns, rows, step):
        if self.backend is not None and rows:
            self.call(lambda: self.backend.table(name, columns, rows, step))

    def close(self):
        if self.backend is not None:
            self.call(self.backend.close)
