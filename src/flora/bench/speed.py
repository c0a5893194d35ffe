"""``flora bench speed``: where a round's time goes, with and without the feature cache; docs/performance.md."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from flora.bench.common import BenchConfig, machine, make_datamodule, make_method, write_report
from flora.errors import FloraConfigError
from flora.federated import FederatedTrainer
from flora.federated.distributed import SUPPORTED_PRECISION


def run_speed(
    out_dir: str = "docs",
    work_dir: str = "runs/bench-speed",
    rounds: int = 3,
    devices: list[int] | None = None,
    precision: str = "32-true",
    cfg: BenchConfig | None = None,
    client_batch: int = 10,
    together_rounds: int = 6,
    together_methods: list[str] | None = None,
    step_model: str = "flora-tiny",
    step_pretrained: str | None = "shipped",
    step_steps: int = 10,
    compile_methods: list[str] | None = None,
    together_precisions: list[str] | None = None,
) -> dict[str, Any]:
    """Per-round time split (image tower, text tower, optimiser, aggregation, evaluation) and images/s.

    Runs on the GPU when one is present (``precision`` e.g. ``bf16-mixed`` there), else on the CPU.
    Then the training throughput of clients trained one by one against ``client_batch`` of
    them together (``trainer.client_batch``; 1 leaves that part out), for ``together_methods``
    (default: every method that declares it), in the same run. Last, one FLORA client step
    on ``step_model`` (batch 32, 100 classes, n_ctx 16, rank 8; ``step_pretrained`` None: a
    random initialisation) as flora computes it and as the authors' code does
    (:mod:`flora.bench.step`), median of ``step_steps`` steps (0 leaves it out). Where
    ``compile_methods`` is not empty, those methods' one-by-one runs (and, with FLORA among
    them, flora's step) are also timed with the text tower through ``torch.compile``
    (``trainer.compile_text``). The comparison runs in each of ``together_precisions``
    (default: ``precision``, and ``bf16-mixed`` too where the device computes in bfloat16
    natively: :func:`native_bf16`), each against one by one in the same precision.

    Args:
        out_dir: where ``performance.md`` and ``performance.json`` go.
        work_dir: data and runs of the benchmark.
        rounds: rounds per run (the tables average rounds 2..).
        devices: device counts of the time-split table (default 1 and 2).
        precision: e.g. ``bf16-mixed`` on a GPU.
        cfg: the benchmark settings (world, n_ctx, rank, lr, ...).
        client_batch: clients trained together in the comparison (1: leave it out).
        together_rounds: rounds per run of that comparison (its table takes the median of
            rounds 2.., which a busy machine disturbs less than the mean).
        together_methods: methods of that comparison (default: every method that declares it).
        step_model: open_clip model of the client-step comparison (e.g. ``ViT-B-16``).
        step_pretrained: its weights (``shipped`` for flora-tiny, an open_clip tag, a file, or
            null for a seeded random initialisation).
        step_steps: timed steps per pattern (0: leave the comparison out).
        compile_methods: methods also run with a compiled text tower (default ``["FLORA"]``;
            ``[]``: nothing is compiled), in the first of ``together_precisions``.
        together_precisions: precisions of the one-by-one vs together comparison (default:
            ``precision``, and ``bf16-mixed`` where the device computes bfloat16 natively).
    """
    from rich.console import Console

    console = Console(highlight=False)
    devices = devices or [1, 2]
    cfg = cfg or BenchConfig()
    compile_methods = ["FLORA"] if compile_methods is None else compile_methods
    together_precisions = comparison_precisions(precision, together_precisions)
    cfg.rounds = rounds
    work = Path(work_dir)
    rows = []
    start = time.perf_counter()
    for cache in ("memory", "off"):
        for n_dev in devices:
            dm = make_datamodule("label", 0, cfg, work)
            dm.cache.mode = cache
            name = f"speed-cache_{cache}-dev{n_dev}"
            t0 = time.perf_counter()
            options = {"devices": n_dev, "strategy": "ddp_spawn" if n_dev > 1 else "auto", "profile": True}
            history = _fit(work, name, rounds, precision, make_method("FLORA", cfg), dm, **options)
            wall = time.perf_counter() - t0
            steady = history[1:] or history  # round 1 also fills the feature cache

            def mean(key: str, rows: list[dict[str, Any]] = steady) -> float:
                return statistics.fmean(r.get(key, 0.0) for r in rows)

            row = {
                "feature_cache": cache,
                "devices": n_dev,
                "round_s": mean("time_round_s"),
                "train_s": mean("time_train_s"),
                "image_s": mean("time_image_s"),
                "text_s": mean("time_text_s"),
                "optim_s": mean("time_optim_s"),
                "aggregate_s": mean("time_aggregate_s"),
                "eval_s": mean("time_eval_s"),
                "first_round_s": history[0]["time_round_s"],
                "images_per_s": statistics.fmean(
                    r["samples_trained_rank0"] * n_dev / r["time_train_s"] for r in steady
                ),
                "fit_wall_s": wall,
            }
            rows.append(row)
            console.print(
                f"cache {cache:6s} devices {n_dev}: {row['round_s']:.2f} s/round, {row['images_per_s']:.0f} img/s",
                soft_wrap=True,
            )
    together = []
    if client_batch > 1:
        for i, together_precision in enumerate(together_precisions):
            together += _together(
                work,
                together_rounds,
                together_precision,
                cfg,
                client_batch,
                together_methods,
                compile_methods if i == 0 else [],
                console,
                tag="" if i == 0 else f"-{together_precision}",
            )
    step = None
    if step_steps > 0:
        from flora.bench.step import run_step_bench

        step = run_step_bench(
            step_model, step_pretrained, steps=step_steps, compiled="FLORA" in compile_methods
        )
        for row in step["rows"]:
            console.print(f"step: {row['pattern']}: {row['ms_per_step']:.1f} ms", soft_wrap=True)
    result = {
        "command": "flora bench speed",
        "machine": machine(),
        "seconds": time.perf_counter() - start,
        "rounds": rounds,
        "precision": precision,
        "rows": rows,
        "together": together,
        "step": step,
    }
    write_report(out_dir, "performance", result, _performance_markdown)
    return result


def _fit(
    work: Path, name: str, rounds: int, precision: str, module: Any, dm: Any, **options: Any
) -> list[dict[str, Any]]:
    """One speed run (on the GPU when there is one) under ``work/runs/name``; its round records."""
    trainer = FederatedTrainer(
        rounds=rounds,
        seed=0,
        accelerator="cpu" if not torch.cuda.is_available() else "auto",
        precision=precision,
        output_dir=str(work / "runs"),
        name=name,
        overwrite=True,
        progress=False,
        loggers=[],
        **options,
    )
    trainer.fit(module, dm)
    return [json.loads(x) for x in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()]


def _together(
    work: Path,
    rounds: int,
    precision: str,
    cfg: BenchConfig,
    client_batch: int,
    methods: list[str] | None,
    compile_methods: list[str],
    console: Any,
    tag: str = "",
) -> list[dict[str, Any]]:
    """Training seconds per round and images/s, one client at a time vs ``client_batch`` together.

    ``compile_methods`` are also run one by one with the text tower compiled. ``tag`` ends
    the runs' names.
    """
    from flora.methods import REGISTRY

    if methods is None:
        methods = [m for m, cls in REGISTRY.items() if vars(cls).get("vectorised", False)]
    rows = []
    for method in methods:
        variants = [(1, False), (client_batch, False)] + ([(1, True)] if method in compile_methods else [])
        for batch, compiled in variants:
            name = f"speed-{method.replace('+', 'plus')}-batch{batch}{'-compiled' if compiled else ''}{tag}"
            dm = make_datamodule("label", 0, cfg, work)
            options = {"client_batch": batch, "eval_every": rounds, "compile_text": compiled}
            history = _fit(work, name, rounds, precision, make_method(method, cfg), dm, **options)
            steady = history[1:] or history  # round 1 also fills the feature cache
            train_s = statistics.median(r["time_train_s"] for r in steady)
            rows.append(
                {
                    "method": method,
                    "precision": precision,
                    "client_batch": batch,
                    "compiled": compiled,
                    "train_s": train_s,
                    "first_train_s": history[0]["time_train_s"],
                    "images_per_s": statistics.median(
                        r["samples_trained_rank0"] / r["time_train_s"] for r in steady
                    ),
                    "rounds": len(history),
                }
            )
            console.print(
                f"{method} client_batch {batch}{' compiled' if compiled else ''} {precision}: "
                f"{train_s:.2f} s training/round",
                soft_wrap=True,
            )
    return rows


def comparison_precisions(precision: str, given: list[str] | None = None) -> list[str]:
    """The precisions of the one-by-one vs together comparison: ``given``, or by default
    ``precision`` and, where the device computes in bfloat16 natively, ``bf16-mixed``."""
    if given is None:
        return [precision] + (["bf16-mixed"] if precision != "bf16-mixed" and native_bf16() else [])
    if not given:
        raise FloraConfigError("together_precisions must name at least one precision (e.g. [32-true])")
    wrong = [p for p in given if str(p) not in SUPPORTED_PRECISION]
    if wrong:
        raise FloraConfigError(
            f"together_precisions: {wrong} not among the trainer's precisions {list(SUPPORTED_PRECISION)}"
        )
    return list(dict.fromkeys(given))


def native_bf16() -> bool:
    """Whether the benchmark's device computes in bfloat16 natively (a CUDA GPU that supports
    it, or a CPU with AVX-512 BF16 / AMX); elsewhere bf16-mixed is emulated and only slower."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _performance_markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Performance",
        "",
        "Generated by `flora bench speed` (`make bench`), as measured:",
        "",
        f"- machine: {result['machine']}",
        f"- run time: {result['seconds']:.0f} s, precision {result.get('precision', '32-true')}",
        "- workload: FLORA on the label-skew synthetic setting (10 clients, 50 base classes, ~1,000",
        f"  training images, base-to-novel evaluation every round), {result['rounds']} rounds; the table",
        "  averages rounds 2.. (round 1 also encodes the images into the feature cache).",
        "- image / text / optimiser are the training phase of rank 0 (backward pass + step under",
        "  optimiser); with 2 devices each process trains half of the clients on one core.",
        "  Images/s counts training images processed per second over all devices.",
        "",
        "| feature cache | devices | s / round | train | image tower | text tower | optimiser | aggregation | evaluation | first round | images/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['feature_cache']} | {r['devices']} | {r['round_s']:.2f} | {r['train_s']:.2f} | {r['image_s']:.2f} | "
            f"{r['text_s']:.2f} | {r['optim_s']:.2f} | {r['aggregate_s']:.3f} | {r['eval_s']:.2f} | "
            f"{r['first_round_s']:.2f} | {r['images_per_s']:.0f} |"
        )
    if result.get("together"):
        main = result.get("precision", "32-true")
        base = {
            (r["method"], r.get("precision", main)): r["images_per_s"]
            for r in result["together"]
            if r["client_batch"] == 1 and not r.get("compiled")
        }
        precisions = list(dict.fromkeys(r.get("precision", main) for r in result["together"]))
        lines += [
            "",
            "## Clients trained together",
            "",
            "`trainer.client_batch`: a round's clients (all 10 here, 1 device, feature cache in memory)",
            "trained with their learned tensors stacked, one text-tower call per step, against one",
            "client after the other, for every method that declares it, in the same run; median of rounds",
            f"2..{result['together'][0].get('rounds', result['rounds'])} of each.",
            "A compiled text tower (`trainer.compile_text`) compiles during round 1 (its training time is",
            "the first-round column) and runs compiled from then on.",
        ]
        if len(precisions) > 1:
            lines += [
                f"The comparison runs in {', '.join(precisions[:-1])} and {precisions[-1]}: each row is compared "
                "with one by one",
                "in its own precision. Under bf16-mixed each matrix product also converts its inputs (more",
                "operations per step), which weighs on one client at a time; clients together run larger",
                "products, which gain from bfloat16 arithmetic where the device has it.",
            ]
        lines += [
            "",
            "| method | precision | client_batch | text tower | training s / round | images/s | vs one by one | round 1 training s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in result["together"]:
            tower = "compiled" if r.get("compiled") else "eager"
            first = f"{r['first_train_s']:.2f}" if "first_train_s" in r else "-"
            prec = r.get("precision", main)
            lines.append(
                f"| {r['method']} | {prec} | {r['client_batch']} | {tower} | {r['train_s']:.2f} | "
                f"{r['images_per_s']:.0f} | {r['images_per_s'] / base[(r['method'], prec)]:.2f}x | {first} |"
            )
    if result.get("step"):
        st = result["step"]
        rows = st["rows"]
        authors = {
            r["pattern"].split(", ", 1)[1]: r["ms_per_step"]
            for r in rows
            if r["pattern"].startswith("authors")
        }
        ref_name = (
            "fp16 autocast" if "fp16 autocast" in authors else "fp32"
        )  # their default precision on a GPU
        reference = authors[ref_name]
        lines += [
            "",
            "## One client step: flora against the authors' pattern",
            "",
            f"FLORA on {st['model']} ({st['weights']}, {st['device']}), batch {st['batch_size']}, "
            f"{st['num_classes']} classes, n_ctx {st['n_ctx']}, rank {st['rank']}: loss, backward and SGD step,",
            f"median of {st['steps']} steps. The authors' pattern runs the image tower every step and five",
            "text passes over the whole context (anchor, sigma, BA, sigma + BA, an unused prompt; three enter",
            "the loss); flora runs one truncated pass over sigma and sigma + BA, on cached features or on the",
            "raw images. Both compute the same loss (`flora.bench.step`).",
            "",
            "flora's text tower computes the start token and the context once per context, not once per",
            'class, and runs its last block from the EOT token alone (docs/architecture.md, "The text',
            'tower\'s cost"); the rows marked "every class\'s whole sequence" leave out the first, then both,',
            "as the plain open_clip tower runs. A compiled row runs the text tower through `torch.compile`;",
            "its first call compiles.",
            "",
            f"| step | ms / step | speed-up over the authors' pattern ({ref_name}) | first call ms |",
            "|---|---|---|---|",
        ]
        for r in rows:
            first = f"{r['first_ms']:.0f}" if "first_ms" in r else "-"
            lines.append(
                f"| {r['pattern']} | {r['ms_per_step']:.1f} | {reference / r['ms_per_step']:.1f}x | {first} |"
            )
    return "\n".join(lines) + "\n"
