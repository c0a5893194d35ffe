"""What every benchmark shares: the settings, the methods under one budget, one federated fit, the report files."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flora.data import Dirichlet, Domains, FederatedDataModule, SyntheticShapes
from flora.data.partition import Partitioner
from flora.data.synthetic import STYLES
from flora.federated import FederatedTrainer
from flora.fileio import atomic_write_text
from flora.methods import OPTIONAL_METHODS, REGISTRY, FederatedPromptModule

#: every method of the default benchmark runs, in the order of the tables (methods that need an
#: optional extra are left out; name them to run them)
METHODS = tuple(name for name in REGISTRY if name not in OPTIONAL_METHODS)
#: methods with a per-client model (compared with PromptFL on Local accuracy)
PERSONALISED = tuple(name for name, cls in REGISTRY.items() if cls.personalised and name in METHODS)
SETTINGS = {
    "label": "label skew: Dirichlet(0.1) over 10 clients, photo style only",
    "feature": "feature shift: one style per client (5 clients: photo, sketch, cartoon, noisy, dark)",
    "both": "feature + label shift: 2 clients per style, Dirichlet(0.1) within each style (10 clients)",
}


@dataclass
class BenchConfig:
    """Shared settings of every benchmark run (the same for all methods: nothing is tuned per method)."""

    rounds: int = 16
    local_epochs: int = 3
    eval_every: int = 2
    n_ctx: int = 8
    rank: int = 4
    lr: float = 0.001
    batch_size: int = 32
    num_colors: int = 10
    num_shapes: int = 10
    train_per_class: int = 20  # label skew: training images per class (photo style only)
    train_per_class_style: int = 4  # feature shift / both: training images per class and style
    clip_pretrained: str | None = "shipped"
    #: clients sampled per round (None: every client, as in the accuracy benchmark)
    clients_per_round: int | None = None


def _world(setting: str, cfg: BenchConfig) -> tuple[SyntheticShapes, type[Partitioner], dict[str, Any]]:
    if setting == "label":
        ds = SyntheticShapes(cfg.num_colors, cfg.num_shapes, cfg.train_per_class, 10, 32, ["photo"], seed=0)
        return ds, Dirichlet, {"num_clients": 10, "alpha": 0.1, "min_size": 10}
    styles = list(STYLES)
    ds = SyntheticShapes(cfg.num_colors, cfg.num_shapes, cfg.train_per_class_style, 4, 32, styles, seed=0)
    if setting == "feature":
        return ds, Domains, {"clients_per_domain": 1}
    if setting == "both":
        return ds, Domains, {"clients_per_domain": 2, "alpha": 0.1, "min_size": 10}
    raise ValueError(f"unknown setting {setting!r}; choose from {list(SETTINGS)}")


def make_datamodule(setting: str, seed: int, cfg: BenchConfig, root: Path) -> FederatedDataModule:
    ds, part_cls, kwargs = _world(setting, cfg)
    partition = part_cls(seed=seed, **kwargs)
    # the folder name carries a digest of the world, so a changed world (other sizes, or a
    # new renderer version) gets fresh shards instead of clashing with old ones
    world = json.dumps(
        {"dataset": ds.describe(), "partition": partition.describe()}, sort_keys=True, default=str
    )
    digest = hashlib.sha256(world.encode()).hexdigest()[:10]
    return FederatedDataModule(
        str(root / "data" / f"{setting}-s{seed}-{digest}"),
        ds,
        partition,
        batch_size=cfg.batch_size,
        feature_cache="disk",
        base_novel=True,
    )


def make_method(name: str, cfg: BenchConfig, **overrides: Any) -> FederatedPromptModule:
    """The benchmark's instance of method ``name``; ``overrides`` change its constructor arguments.

    Every method gets the same budget, mapped to its options by its
    :meth:`~flora.methods.FederatedPromptModule.budget_options`.
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose from {list(REGISTRY)}")
    cls = REGISTRY[name]
    options = {"clip_model": "flora-tiny", "clip_pretrained": cfg.clip_pretrained}
    options.update(cls.budget_options(cfg.n_ctx, cfg.rank, cfg.lr))
    return cls(**{**options, **overrides})


def weights_digest(clip_pretrained: str | None) -> str:
    """sha256 prefix of the weights a benchmark ran with (``random init`` without weights)."""
    from flora.clip.backbone import _shipped_weights

    if clip_pretrained is None:
        return "random init"
    path = _shipped_weights("flora-tiny") if clip_pretrained == "shipped" else Path(clip_pretrained)
    if path is None or not path.is_file():
        return str(clip_pretrained)
    return "sha256 " + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, torch {torch.__version__}"


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def fit_one(
    setting: str, seed: int, label: str, module: FederatedPromptModule, cfg: BenchConfig, work: Path
) -> dict[str, Any]:
    """One federated fit of ``module`` on ``setting`` with ``seed``; returns the record the tables read."""
    t0 = time.perf_counter()
    dm = make_datamodule(setting, seed, cfg, work)
    name = f"{setting}-{label.replace(' ', '_')}-s{seed}"
    trainer = FederatedTrainer(
        rounds=cfg.rounds,
        local_epochs=cfg.local_epochs,
        eval_every=cfg.eval_every,
        seed=seed,
        clients_per_round=cfg.clients_per_round,
        output_dir=str(work / "runs"),
        name=name,
        overwrite=True,  # a benchmark regenerates its runs
        progress=False,
        loggers=[],
    )
    summary = trainer.fit(module, dm)
    history = [json.loads(x) for x in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return {
        "setting": setting,
        "seed": seed,
        "method": label,
        "final": summary["final"],
        "curve": [(r["round"], r["local_acc_mean"]) for r in history if "local_acc_mean" in r],
        "clients": history[-1].get("local_acc_clients", []),
        "seconds": time.perf_counter() - t0,
        "data": str(dm.root),
    }


def run_variants(
    kind: str,
    variants: dict[str, tuple[str, dict[str, Any], str]],
    settings: list[str],
    seeds: int,
    cfg: BenchConfig,
    work: Path,
    progress: bool,
) -> list[dict[str, Any]]:
    """Fit every variant (``name -> (method, constructor overrides, description)``) per setting and seed.

    Each run's ``method`` is the variant's name; its run folder is ``{setting}-{kind}_{name}-s{seed}``.
    """
    from rich.console import Console

    for setting in settings:
        if setting not in SETTINGS:
            raise ValueError(f"unknown setting {setting!r}; choose from {list(SETTINGS)}")
    console = Console(highlight=False)
    runs: list[dict[str, Any]] = []
    total = len(settings) * seeds * len(variants)
    for setting in settings:
        for seed in range(seeds):
            for variant, (method, overrides, _) in variants.items():
                module = make_method(method, cfg, **overrides)
                runs.append(fit_one(setting, seed, f"{kind} {variant}", module, cfg, work))
                runs[-1]["method"] = variant
                if progress:
                    print_run(console, runs[-1], len(runs), total)
    return runs


def variant_bench(
    kind: str,
    catalogue: dict[str, tuple[str, dict[str, Any], str]],
    variants: list[str] | None,
    settings: list[str] | None,
    seeds: int,
    cfg: BenchConfig,
    work_dir: str,
    progress: bool,
    **extra: Any,
) -> dict[str, Any]:
    """``flora bench <kind>``: the chosen ``variants`` of ``catalogue`` (all by default) per setting and seed.

    Returns the report record (command, machine, weights, time, config, settings, variants,
    ``extra`` and the runs); ``settings`` default to label skew and feature shift.
    """
    settings = settings or ["label", "feature"]
    variants = variants or list(catalogue)
    unknown = [v for v in variants if v not in catalogue]
    if unknown:
        raise ValueError(f"unknown {kind} variant(s) {unknown}; choose from {list(catalogue)}")
    start = time.perf_counter()
    chosen = {v: catalogue[v] for v in variants}
    runs = run_variants(kind, chosen, settings, seeds, cfg, Path(work_dir), progress)
    return {
        "command": f"flora bench {kind}",
        "machine": machine(),
        "weights": weights_digest(cfg.clip_pretrained),
        "seconds": time.perf_counter() - start,
        "config": cfg.__dict__,
        "settings": {s: SETTINGS[s] for s in settings},
        "variants": describe_variants(chosen),
        **extra,
        "runs": runs,
    }


def describe_variants(variants: dict[str, tuple[str, dict[str, Any], str]]) -> dict[str, dict[str, Any]]:
    """The ``variants`` section of a report: each variant's method, overrides and description."""
    return {v: {"method": m, "overrides": o, "description": d} for v, (m, o, d) in variants.items()}


def variants_table(result: dict[str, Any], reference_method: str) -> list[str]:
    """Markdown lines: the table of variants (change, meaning); another method than ``reference_method`` is named."""
    lines = ["| variant | change | meaning |", "|---|---|---|"]
    for v, spec in result["variants"].items():
        change = ", ".join(f"`{k}={val}`" for k, val in spec["overrides"].items()) or "-"
        if spec["method"] != reference_method:
            change = f"`{spec['method']}` instead of {reference_method}"
        lines.append(f"| {v} | {change} | {spec.get('description', '')} |")
    return lines + [""]


def setting_table(result: dict[str, Any], setting: str, reference: str) -> tuple[list[str], dict[str, Any]]:
    """Markdown lines of one setting's accuracy table with an "HM vs ``reference``" column, and its rows."""
    variants, rows = table(result, setting)
    ref = rows.get(reference)
    lines = [
        f"| variant | Local | Base | Novel | Novel-G | HM | HM vs {reference} |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        cells = [cell(*rows[v][k]) for k in TABLE_KEYS]
        delta = "-" if ref is None or v == reference else f"{rows[v]['hm'][0] - ref['hm'][0]:+.1f}"
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {delta} |")
    return lines + [""], rows


def write_report(out_dir: str, stem: str, result: dict[str, Any], render: Any) -> Path:
    """Write ``{stem}.json`` and ``{stem}.md`` (``render(result)``) into ``out_dir``; returns the folder."""
    out = Path(out_dir)
    atomic_write_text(out / f"{stem}.json", json.dumps(result, indent=1))
    atomic_write_text(out / f"{stem}.md", render(result))
    return out


def print_run(console: Any, run: dict[str, Any], done: int, total: int) -> None:
    f = run["final"]
    console.print(
        f"[{done}/{total}] {run['setting']:8s} seed {run['seed']} {run['method']:13s} "
        f"local {f['local_acc_mean']:6.2f} base {f['base_acc_mean']:6.2f} novel {f['novel_acc_mean']:6.2f} "
        f"HM {f['hm']:6.2f} ({run['seconds']:.0f} s)",
        soft_wrap=True,
    )


#: the columns of every accuracy table: Local, Base, Novel, Novel-G, HM
TABLE_KEYS = ("local_acc_mean", "base_acc_mean", "novel_acc_mean", "novel_global_acc_mean", "hm")


def cell(mean: float, std: float) -> str:
    """A table cell ``mean ± std`` (``-`` for a metric the method does not report)."""
    return "-" if mean != mean else f"{mean:.1f} ± {std:.1f}"


def table(
    result: dict[str, Any], setting: str
) -> tuple[list[str], dict[str, dict[str, tuple[float, float]]]]:
    """The methods (or variants) run in ``setting``, in run order, and their seed mean ± std per column."""
    rows: dict[str, dict[str, tuple[float, float]]] = {}
    methods = []
    for run in result["runs"]:
        if run["setting"] != setting:
            continue
        if run["method"] not in methods:
            methods.append(run["method"])
    for m in methods:
        finals = [r["final"] for r in result["runs"] if r["setting"] == setting and r["method"] == m]
        rows[m] = {k: mean_std([f[k] for f in finals if k in f]) for k in TABLE_KEYS}
    return methods, rows
