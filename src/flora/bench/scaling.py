"""``flora bench scaling``: memory and time against the number of clients; docs/scaling-bench.md and its figure.

One world (10,800 training images of 100 classes) is split over more and more clients
(Dirichlet(1.0), at least 2 training images each). Each federation size is prepared with
``flora prepare`` and trained with ``flora fit`` in a process of its own, so its peak memory
is its own: FLORA, 10 % of the clients per round, client states on disk, intermediate
evaluations on a seeded sample of clients and the last one on every client with test
samples. The table and figure are whatever those runs record.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from flora.bench.accuracy import _save_png
from flora.bench.common import machine, weights_digest, write_report
from flora.errors import FloraRunError
from flora.methods import REGISTRY

#: the world every federation size splits: 100 classes (10 colours x 10 shapes), photo style; as
#: many test as training images, so each client's matched test split mirrors its training split
WORLD = {
    "num_colors": 10,
    "num_shapes": 10,
    "train_per_class": 108,
    "test_per_class": 108,
    "image_size": 32,
    "styles": ["photo"],
    "seed": 0,
}


def scaling_config(
    num_clients: int,
    work: Path,
    rounds: int,
    eval_clients: int,
    client_fraction: float,
    world: dict[str, Any],
    method: str = "FLORA",
) -> dict[str, Any]:
    """The ``flora fit`` config of one federation size (what the benchmark writes and runs)."""
    partition = {"num_clients": num_clients, "alpha": 1.0, "min_size": 2, "seed": 0}
    digest = hashlib.sha256(json.dumps([world, partition], sort_keys=True).encode()).hexdigest()[:10]
    cls = REGISTRY[method]
    model_args = {"clip_model": "flora-tiny", "clip_pretrained": "shipped", **cls.budget_options(8, 4, 0.001)}
    return {
        "model": {"class_path": f"{cls.__module__}.{cls.__name__}", "init_args": model_args},
        "data": {
            "root": str(work / "data" / f"clients{num_clients}-{digest}"),
            "dataset": {"class_path": "flora.data.SyntheticShapes", "init_args": world},
            "partition": {"class_path": "flora.data.Dirichlet", "init_args": partition},
            "batch_size": 32,
            "feature_cache": "disk",
        },
        "trainer": {
            "rounds": rounds,
            "local_epochs": 1,
            "client_fraction": client_fraction,
            "eval_every": 1,
            "eval_clients": eval_clients,
            "state_store": "disk",
            "seed": 0,
            "output_dir": str(work / "runs"),
            "name": f"clients{num_clients}",
            "overwrite": True,
            "progress": False,
            "loggers": [],
        },
    }


def _flora(args: list[str], what: str, log: Path) -> float:
    """Run ``python -m flora ARGS`` in its own process (output kept in ``log``); its wall time.

    A failure is one line: the child's last line and where its whole output is.
    """
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flora", *args], capture_output=True, text=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        lines = (proc.stdout + proc.stderr).strip().splitlines() or ["(no output)"]
        last = next((x for x in reversed(lines) if x.startswith("flora: error:")), lines[-1])
        raise FloraRunError(
            f"flora bench scaling: {what} failed (exit {proc.returncode}): {last.strip()} (output: {log})"
        )
    return time.perf_counter() - t0


def _folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20 if path.is_dir() else 0.0


def measure(num_clients: int, work: Path, **options: Any) -> dict[str, Any]:
    """Prepare and fit one federation size in processes of their own; the row of the table."""
    cfg = scaling_config(num_clients, work, **options)
    path = work / "configs" / f"clients{num_clients}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    logs = work / "logs"
    prepare_s = _flora(
        ["prepare", "--config", str(path)],
        f"preparing {num_clients} clients",
        logs / f"prepare-{num_clients}.log",
    )
    fit_s = _flora(
        ["fit", "--config", str(path)], f"training {num_clients} clients", logs / f"fit-{num_clients}.log"
    )
    run = Path(cfg["trainer"]["output_dir"]) / cfg["trainer"]["name"]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    later = records[1:] or records  # round 1 also encodes every image into the feature cache
    sampled = [r["time_eval_s"] for r in records if r.get("eval_sampled")]
    last = records[-1]

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else float("nan")

    return {
        "clients": num_clients,
        "clients_per_round": len(last["clients"]),
        "clients_without_test": last["clients_without_test"],
        "clients_evaluated_last": last["clients_evaluated"],
        "clients_evaluated_sampled": mean([r["clients_evaluated"] for r in records if r.get("eval_sampled")]),
        "prepare_s": prepare_s,
        "fit_s": fit_s,
        "first_round_train_s": records[0]["time_train_s"],
        "train_s": mean([r["time_train_s"] for r in later]),
        "eval_sampled_s": mean(sampled),
        "eval_full_s": last["time_eval_s"],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in records),
        "client_states_mb": _folder_mb(run / "client_states"),
        "checkpoint_mb": _folder_mb(run / "checkpoints"),
        "local_acc_mean": summary["final"]["local_acc_mean"],
        "rounds": len(records),
    }


def run_scaling(
    out_dir: str = "docs",
    work_dir: str = "runs/bench-scaling",
    clients: list[int] | None = None,
    rounds: int = 3,
    eval_clients: int = 100,
    client_fraction: float = 0.1,
    train_per_class: int = 108,
    test_per_class: int = 108,
) -> dict[str, Any]:
    """Peak memory, round and evaluation time of FLORA against the number of clients; writes ``scaling-bench.*``.

    Args:
        out_dir: where ``scaling-bench.md``, ``scaling-bench.json`` and ``figures/scaling.png`` go.
        work_dir: data, configs and runs of the benchmark.
        clients: the federation sizes (default 10, 100, 300, 1000).
        rounds: rounds per run (the last evaluates every client with test samples).
        eval_clients: clients in each intermediate (sampled) evaluation.
        client_fraction: fraction of the clients trained per round.
        train_per_class: training images per class (100 classes).
        test_per_class: test images per class (as many as training images: each client's
            matched test split mirrors its training split).
    """
    from rich.console import Console

    console = Console(highlight=False)
    sizes = clients or [10, 100, 300, 1000]
    world = {**WORLD, "train_per_class": train_per_class, "test_per_class": test_per_class}
    options = dict(rounds=rounds, eval_clients=eval_clients, client_fraction=client_fraction, world=world)
    start = time.perf_counter()
    rows = []
    for n in sizes:
        rows.append(measure(n, Path(work_dir), **options))
        r = rows[-1]
        console.print(
            f"{n:5d} clients: {r['train_s']:.1f} s training/round, evaluation {r['eval_sampled_s']:.1f} s "
            f"(sample) / {r['eval_full_s']:.1f} s (all), peak {r['peak_rss_mb']:.0f} MiB",
            soft_wrap=True,
        )
    result = {
        "command": "flora bench scaling",
        "machine": machine(),
        "weights": weights_digest("shipped"),
        "seconds": time.perf_counter() - start,
        "world": world,
        "options": {k: v for k, v in options.items() if k != "world"},
        "rows": rows,
    }
    _plot(result, Path(out_dir) / "figures" / "scaling.png")
    write_report(out_dir, "scaling-bench", result, _markdown)
    return result


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    n = [r["clients"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    left.plot(n, [r["peak_rss_mb"] for r in rows], marker="o")
    left.set_ylim(0, 1.2 * max(r["peak_rss_mb"] for r in rows))
    left.set_ylabel("peak resident memory (MiB)")
    left.set_title("memory of the training process")
    for key, label in (
        ("train_s", "training per round"),
        ("eval_sampled_s", f"evaluation, sample of {result['options']['eval_clients']}"),
        ("eval_full_s", "evaluation, all clients"),
    ):
        right.plot(n, [r[key] for r in rows], marker="o", label=label)
    right.set_ylabel("seconds")
    right.set_title("time")
    right.legend()
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("clients in the federation")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)


def _markdown(result: dict[str, Any]) -> str:
    w, o = result["world"], result["options"]
    images = w["num_colors"] * w["num_shapes"] * w["train_per_class"]
    lines = [
        "# Scaling: memory and time against the number of clients",
        "",
        "Generated by `flora bench scaling`, as measured:",
        "",
        f"- machine: {result['machine']}",
        f"- CLIP weights: {result['weights']}",
        f"- run time: {result['seconds']:.0f} s",
        f"- world: {images:,} training and {w['num_colors'] * w['num_shapes'] * w['test_per_class']:,} test "
        f"images of {w['num_colors'] * w['num_shapes']} classes, split by Dirichlet(1.0) with at least 2 "
        "training images per client (test images matched to each client's classes)",
        f"- each size: `flora prepare`, then `flora fit` (FLORA, {o['rounds']} rounds, "
        f"{o['client_fraction']:.0%} of the clients per round, 1 local epoch, client states on disk, "
        f"feature cache on disk, 1 process on the CPU); rounds before the last evaluate a seeded sample of "
        f"{o['eval_clients']} clients (where more have test samples; otherwise all, shown as -), the last "
        "evaluates every client with test samples",
        "- training per round averages rounds 2..; it includes encoding the images of clients trained for "
        "the first time into the feature cache (most clients of a round at 10 % sampling, about 1,080 images "
        "per round at every size), so what grows with the clients per round is the per-client overhead; "
        "peak memory is the training process's maximum resident set",
        "",
        "| clients | per round | without test | prepare s | round 1 training s | training s / round | "
        "evaluation s (sample) | evaluation s (all) | evaluated (all) | peak MiB | client states MiB | "
        "final local acc |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        # no sampled evaluation when the sample would hold every client with test samples
        sample = "-" if r["eval_sampled_s"] != r["eval_sampled_s"] else f"{r['eval_sampled_s']:.1f}"
        lines.append(
            f"| {r['clients']:,} | {r['clients_per_round']} | {r['clients_without_test']} | {r['prepare_s']:.1f} | "
            f"{r['first_round_train_s']:.1f} | {r['train_s']:.1f} | {sample} | "
            f"{r['eval_full_s']:.1f} | {r['clients_evaluated_last']} | {r['peak_rss_mb']:.0f} | "
            f"{r['client_states_mb']:.1f} | {r['local_acc_mean']:.1f} |"
        )
    lines += ["", "![memory and time against clients](figures/scaling.png)", ""]
    return "\n".join(lines) + "\n"
