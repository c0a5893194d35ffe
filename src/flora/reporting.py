"""What a run shows and writes: progress, the per-round table, metrics.jsonl, summary.json, plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from flora.fileio import atomic_write_text

SUMMARY_KEYS = (
    "round",
    "local_acc_mean",
    "local_acc_std",
    "local_acc_worst10",
    "local_acc_pooled",
    "local_f1_mean",
    "global_acc",
    "base_acc_mean",
    "novel_acc_mean",
    "novel_global_acc_mean",
    "hm",
    "clients_evaluated",
    "clients_without_test",
    "bytes_up_total",
    "bytes_down_total",
    "wall_time_s",
)

_COLUMNS = (
    ("round", "round", "{:>5}"),
    ("clients", "clients", "{:>7}"),
    ("train_loss", "loss", "{:>7.4f}"),
    ("local_acc_mean", "local acc", "{:>9.2f}"),
    ("local_acc_worst10", "worst10%", "{:>8.2f}"),
    ("local_f1_mean", "macro-F1", "{:>8.2f}"),
    ("base_acc_mean", "base", "{:>6.2f}"),
    ("novel_acc_mean", "novel", "{:>6.2f}"),
    ("hm", "HM", "{:>6.2f}"),
    ("bytes_up", "up KiB", "{:>8.1f}"),
    ("time_round_s", "time s", "{:>7.2f}"),
)


def _options(config_text: str) -> Any:
    """A run's options as parsed YAML, without the checkpoint it was started from."""
    import yaml

    try:
        options = yaml.safe_load(config_text)
    except yaml.YAMLError:
        return config_text
    if isinstance(options, dict):
        options.pop("ckpt_path", None)
    return options


def json_safe(value: Any) -> Any:
    """``value`` with only JSON types: mappings and sequences recursively, paths and other objects as text."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v) for v in value]
    describe = getattr(value, "describe", None)
    if callable(describe):
        return json_safe(describe())
    return str(value)


def _init_options(obj: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The constructor arguments of ``obj`` that it keeps as attributes of the same name, JSON-safe."""
    import inspect

    names = [n for n in inspect.signature(type(obj).__init__).parameters if n != "self" and n not in skip]
    return {n: json_safe(getattr(obj, n)) for n in names if hasattr(obj, n)}


def run_info(trainer: Any, module: Any, dm: Any) -> dict[str, Any]:
    """What ``summary.json`` records of the run's options (``flora report`` compares runs by them).

    ``seed``: the trainer's seed; ``hparams``: the method's hyperparameters; ``trainer``: the
    trainer options; ``data``: the data module's options, its dataset and partition as described
    in the shards' manifest.
    """
    hparams = getattr(module, "hparams", {}) or {}
    data = _init_options(dm, skip=("dataset", "partition"))
    for part in ("dataset", "partition"):
        value = getattr(dm, part, None)
        data[part] = json_safe(value) if value is not None else None
    return {
        "seed": json_safe(getattr(trainer, "seed", None)),
        "hparams": {k: json_safe(v) for k, v in dict(hparams).items() if not str(k).startswith("_")},
        "trainer": _init_options(trainer),
        "data": data,
    }


def _numeric(record: dict[str, Any]) -> dict[str, float]:
    return {
        k: v
        for k, v in record.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and k != "round"
    }


def build_summary(
    history: list[dict[str, Any]], method: str, name: str, zero_shot: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``final`` and ``best`` evaluated rounds, plus the last-5 mean/std.

    ``best`` is the round with the highest HM under the base/novel protocol, otherwise
    the highest mean local accuracy. ``best`` and ``last5`` read the rounds that evaluated
    every client (not a ``trainer.eval_clients`` sample), so they compare like with like.
    """
    evaluated = [r for r in history if "local_acc_mean" in r]
    full = [r for r in evaluated if not r.get("eval_sampled")] or evaluated
    summary: dict[str, Any] = {
        "name": name,
        "method": method,
        "rounds": len([r for r in history if r["round"] > 0]),
    }
    if zero_shot:
        summary["zero_shot"] = {k: v for k, v in zero_shot.items() if k in SUMMARY_KEYS}
    if not evaluated:
        return summary
    pick = lambda r: {k: r[k] for k in SUMMARY_KEYS if k in r}  # noqa: E731
    summary["final"] = pick(evaluated[-1])
    key = "hm" if "hm" in evaluated[-1] else "local_acc_mean"
    summary["best"] = pick(max(full, key=lambda r: r[key]))
    # in Python floats, not metrics.mean_std: numpy's std of the same values can differ in the last bit
    last = [r["local_acc_mean"] for r in full[-5:]]
    mean = sum(last) / len(last)
    summary["last5"] = {
        "local_acc_mean": mean,
        "local_acc_mean_std": (sum((x - mean) ** 2 for x in last) / len(last)) ** 0.5,
        "rounds": [r["round"] for r in full[-5:]],
    }
    return summary


def plot_accuracy(history: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluated = [r for r in history if "local_acc_mean" in r]
    if not evaluated:
        return
    rounds = [r["round"] for r in evaluated]
    mean = [r["local_acc_mean"] for r in evaluated]
    std = [r["local_acc_std"] for r in evaluated]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(rounds, mean, marker="o", label="local acc (mean over clients)")
    ax.fill_between(rounds, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    ax.plot(rounds, [r["local_acc_worst10"] for r in evaluated], linestyle="--", label="worst 10% of clients")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_evaluation(path: Path, result: dict[str, Any], progress: bool) -> None:
    """The result of ``flora validate`` / ``flora test`` (``<kind>.json``) and, with ``progress``, its line."""
    atomic_write_text(path, json.dumps(result, indent=2))
    if progress:
        print(
            f"{result['kind']}: local acc {result['local_acc_mean']:.2f} ± {result['local_acc_std']:.2f} "
            f"(worst 10% {result['local_acc_worst10']:.2f}, pooled {result['local_acc_pooled']:.2f}, "
            f"macro-F1 {result['local_f1_mean']:.2f}) -> {path}"
        )


class RunReporter:
    """Prints progress and the per-round table (rank 0) and writes the run folder."""

    def __init__(
        self, run_dir: Path, enabled: bool = True, progress: bool = True, fabric: Any = None
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.progress = progress and enabled
        self.fabric = fabric
        self.console = Console(highlight=False)
        self._header_done = False
        self.base_novel = False
        self.run_info: dict[str, Any] = {}  # options recorded in summary.json (set by start)
        self._bar: Any = None  # the rich progress bar of the current activity

    def note(self, text: str) -> None:
        if self.progress:
            self.console.print(f"[bold]flora[/bold] {text}", soft_wrap=True)

    def start(self, trainer: Any, module: Any, dm: Any, config_text: str | None, resumed: bool) -> None:
        self.base_novel = dm.has_novel
        self.run_info = run_info(trainer, module, dm)
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if config_text is not None:
            config = self.run_dir / "config.yaml"
            if resumed and config.is_file() and _options(config.read_text()) != _options(config_text):
                # a resume with other options keeps the config each part of the run ran with
                config.replace(self.run_dir / f"config.before-round{trainer.completed_rounds + 1}.yaml")
            atomic_write_text(config, config_text)
        for logger in self._wandb_loggers():
            # the resolved config when the CLI gave one (what a sweep compares runs by), else the recorded options
            config = yaml.safe_load(config_text) if config_text is not None else None
            logger.log_hyperparams(config if isinstance(config, dict) else self.run_info)
        # metrics.jsonl and the CSV always mirror the history (a resumed run drops rounds after its checkpoint)
        self._rewrite_metrics(trainer.history)
        self._rewrite_csv(trainer.history)
        if self.progress:
            n_params = sum(p.numel() for p in module.trainable_parameters())
            cache = "on" if trainer.clients.use_features else "off"
            self.note(
                f"{type(module).__name__} | {dm.num_clients} clients, {dm.num_classes} classes | "
                f"{trainer.sampler.per_round} clients/round x {trainer.rounds} rounds | "
                f"{n_params:,} trainable parameters | devices={self.fabric.world_size} "
                f"precision={trainer.precision} | feature cache {cache} | run dir {self.run_dir}"
            )
            if missing := dm.num_clients - len(dm.evaluable_clients):
                self.note(
                    f"{missing} of {dm.num_clients} clients have no test samples: they train, and "
                    "evaluation leaves them out (clients_without_test in every evaluated round)"
                )
            if trainer.eval_clients is not None:
                self.note(
                    f"intermediate evaluations cover a seeded sample of {trainer.eval_clients} clients; "
                    "the last round covers every client with test samples"
                )

    def activity(self, what: str, total: int) -> None:
        """Show a progress bar (done / total, elapsed, ETA) for ``total`` steps of ``what``.

        Only on an interactive terminal with progress on (rank 0); transient, so the per-round
        table stays clean. :meth:`tick` advances it, :meth:`done` removes it.
        """
        self.done()
        if not (self.progress and self.console.is_terminal) or total <= 0:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self._bar = Progress(*columns, TimeRemainingColumn(), console=self.console, transient=True)
        self._bar.start()
        self._bar.add_task(what, total=total)

    def tick(self) -> None:
        """One step of the current :meth:`activity` done."""
        if self._bar is not None:
            self._bar.advance(self._bar.task_ids[0])

    def done(self) -> None:
        """End the current :meth:`activity` (its bar disappears)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def round_start(self, round_no: int, turns: int) -> None:
        """Round ``round_no`` starts; this process trains ``turns`` client turns in it."""
        self.activity(f"round {round_no}: client turns", turns)

    def client_done(self, client_id: int) -> None:
        self.tick()

    def _columns(self) -> list[tuple[str, str, str]]:
        optional = {"base_acc_mean", "novel_acc_mean", "hm"}
        return [c for c in _COLUMNS if c[0] not in optional or self.base_novel]

    def _cells(self, record: dict[str, Any]) -> str:
        cells = []
        for key, title, fmt in self._columns():
            width = max(len(title), 5)
            value = record.get(key)
            if key == "clients":
                value = len(value) if value is not None else None
            if key == "bytes_up" and value is not None:
                value = value / 1024
            cells.append(f"{fmt.format(value):>{width}}" if value is not None else f"{'-':>{width}}")
        return " ".join(cells)

    def _csv_loggers(self) -> list[Any]:
        from lightning.fabric.loggers import CSVLogger

        return [
            lg for lg in (self.fabric.loggers if self.fabric is not None else []) if isinstance(lg, CSVLogger)
        ]

    def _wandb_loggers(self) -> list[Any]:
        from lightning.pytorch.loggers import WandbLogger

        return [
            lg
            for lg in (self.fabric.loggers if self.fabric is not None else [])
            if isinstance(lg, WandbLogger)
        ]

    def _wandb_finish(self, summary: dict[str, Any], plot: Path) -> None:
        """``final/*`` and ``best/*`` into each wandb run's summary, and the accuracy plot as an image."""
        for logger in self._wandb_loggers():
            for part in ("final", "best"):
                logger.experiment.summary.update(
                    {f"{part}/{k}": v for k, v in summary.get(part, {}).items() if isinstance(v, int | float)}
                )
            if plot.is_file():
                logger.log_image(key="accuracy", images=[str(plot)])

    def _rewrite_csv(self, history: list[dict[str, Any]]) -> None:
        for logger in self._csv_loggers():
            (Path(logger.log_dir) / "metrics.csv").unlink(missing_ok=True)
            for record in history:
                logger.log_metrics(_numeric(record), step=record["round"])
            logger.save()

    def round_done(self, record: dict[str, Any]) -> None:
        self.done()
        if not self.enabled:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.fabric is not None:
            self.fabric.log_dict(_numeric(record), step=record["round"])
            for logger in self._csv_loggers():
                logger.save()  # on disk after every round, so a killed run loses no logged round
        if self.progress:
            if not self._header_done:
                cols = self._columns()
                self.console.print(
                    " ".join(f"{title:>{max(len(title), 5)}}" for _, title, _ in cols), soft_wrap=True
                )
                self._header_done = True
            self.console.print(self._cells(record), soft_wrap=True)

    def _rewrite_metrics(self, history: list[dict[str, Any]]) -> None:
        atomic_write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))

    def zero_shot(self, metrics: dict[str, Any]) -> None:
        if self.progress:
            extra = (
                f", novel {metrics['novel_acc_mean']:.2f}, HM {metrics['hm']:.2f}" if "hm" in metrics else ""
            )
            self.note(f"zero-shot reference: local acc {metrics['local_acc_mean']:.2f}{extra}")

    def finish(
        self, history: list[dict[str, Any]], method: str, zero_shot: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        summary = {**build_summary(history, method, self.run_dir.name, zero_shot), **self.run_info}
        if not self.enabled:
            return summary
        atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))
        plot_accuracy(
            history, self.run_dir / "accuracy.png", f"{self.run_dir.name}: {method.rsplit('.', 1)[-1]}"
        )
        self._wandb_finish(summary, self.run_dir / "accuracy.png")
        if self.fabric is not None:
            for logger in self.fabric.loggers:
                logger.finalize("success")
        for logger in self._wandb_loggers():
            logger.experiment.finish()  # the wandb run is complete (and its files written) when fit returns
        if self.progress and "final" in summary:
            f, b = summary["final"], summary["best"]
            self.note(
                f"done: final local acc {f['local_acc_mean']:.2f} ± {f['local_acc_std']:.2f} "
                f"(round {f['round']}), best {b['local_acc_mean']:.2f} (round {b['round']}), "
                f"{f['wall_time_s']:.1f} s -> {self.run_dir / 'summary.json'}"
            )
        return summary
