"""``flora bench accuracy | ablation | speed``: the tables of docs/results.md, docs/ablation.md and docs/performance.md.

Everything runs offline on the synthetic captioned-shapes world with the shipped tiny
CLIP. Each run is an ordinary :class:`~flora.federated.FederatedTrainer` fit; the
tables are whatever the runs give.
"""

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
from flora.methods import (
    FLORA,
    FederatedPromptModule,
    FedOTP,
    FedPGP,
    LocalCoOp,
    PFedMoAP,
    PFedPrompt,
    PromptAMP,
    PromptFL,
    PromptFLFT,
    PromptPer,
    PromptProx,
    ZeroShotCLIP,
)

METHODS = (
    "zero-shot",
    "Local",
    "PromptFL",
    "PromptFL+FT",
    "PromptPer",
    "PromptProx",
    "PromptAMP",
    "pFedPrompt",
    "FedOTP",
    "pFedMoAP",
    "FedPGP",
    "FLORA",
)
#: methods with a per-client model (compared with PromptFL on Local accuracy)
PERSONALISED = (
    "Local",
    "PromptFL+FT",
    "PromptPer",
    "PromptAMP",
    "pFedPrompt",
    "FedOTP",
    "pFedMoAP",
    "FedPGP",
    "FLORA",
)
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
    """The benchmark's instance of method ``name``; ``overrides`` change its constructor arguments."""
    common = {"clip_model": "flora-tiny", "clip_pretrained": cfg.clip_pretrained}
    prompt = {**common, "n_ctx": cfg.n_ctx, "lr": cfg.lr}
    if name == "zero-shot":
        return ZeroShotCLIP(**common, **overrides)
    if name == "Local":
        return LocalCoOp(**prompt, **overrides)
    if name == "PromptFL":
        return PromptFL(**prompt, **overrides)
    if name == "PromptFL+FT":
        return PromptFLFT(**prompt, **overrides)
    if name == "PromptPer":
        split = {"n_global": cfg.n_ctx - cfg.n_ctx // 2, "n_local": cfg.n_ctx // 2}
        return PromptPer(**{**common, "lr": cfg.lr, **split, **overrides})
    if name == "PromptProx":
        return PromptProx(**prompt, **overrides)
    if name == "PromptAMP":
        return PromptAMP(**prompt, **overrides)
    if name == "pFedPrompt":
        return PFedPrompt(**prompt, **overrides)
    if name == "FedOTP":
        return FedOTP(**prompt, **overrides)
    if name == "pFedMoAP":
        return PFedMoAP(**prompt, **overrides)
    if name == "FedPGP":
        return FedPGP(**{"rank": cfg.rank, **prompt, **overrides})
    if name == "FLORA":
        return FLORA(**{"rank": cfg.rank, **prompt, **overrides})
    raise ValueError(f"unknown method {name!r}; choose from {list(METHODS)}")


# FLORA's components, one change at a time against the benchmark's FLORA (first row)
ABLATIONS: dict[str, tuple[str, dict[str, Any], str]] = {
    "FLORA": ("FLORA", {}, "as in the accuracy benchmark: global adapter, mu 1, ortho_weight 0.1"),
    "adapter local": ("FLORA", {"adapter": "local"}, "the image adapter stays on each client"),
    "adapter none": ("FLORA", {"adapter": "none"}, "no image adapter"),
    "mu 0": ("FLORA", {"mu": 0.0}, "no contrastive term"),
    "mu 10": ("FLORA", {"mu": 10.0}, "ten times the contrastive weight"),
    "ortho 0": ("FLORA", {"ortho_weight": 0.0}, "no orthogonality penalty on B"),
    "FedPGP": ("FedPGP", {}, "FedPGP: free U V, negative pair (zG, zP), no adapter, no orthogonality"),
}


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


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def _run(
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


def _write_report(out_dir: str, stem: str, result: dict[str, Any], render: Any) -> Path:
    """Write ``{stem}.json`` and ``{stem}.md`` (``render(result)``) into ``out_dir``; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(render(result))
    return out


def _print_run(console: Any, run: dict[str, Any], done: int, total: int) -> None:
    f = run["final"]
    console.print(
        f"[{done}/{total}] {run['setting']:8s} seed {run['seed']} {run['method']:13s} "
        f"local {f['local_acc_mean']:6.2f} base {f['base_acc_mean']:6.2f} novel {f['novel_acc_mean']:6.2f} "
        f"HM {f['hm']:6.2f} ({run['seconds']:.0f} s)",
        soft_wrap=True,
    )


def run_accuracy(
    out_dir: str = "docs",
    work_dir: str = "runs/bench",
    seeds: int = 3,
    settings: list[str] | None = None,
    methods: list[str] | None = None,
    cfg: BenchConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Every method x setting x seed; writes ``results.md``, ``results.json`` and figures into ``out_dir``."""
    from rich.console import Console

    cfg = cfg or BenchConfig()
    settings = settings or list(SETTINGS)
    methods = methods or list(METHODS)
    console = Console(highlight=False)
    work, out = Path(work_dir), Path(out_dir)
    runs: list[dict[str, Any]] = []
    start = time.perf_counter()
    total = len(settings) * seeds * len(methods)
    for setting in settings:
        for seed in range(seeds):
            for method in methods:
                runs.append(_run(setting, seed, method, make_method(method, cfg), cfg, work))
                if progress:
                    _print_run(console, runs[-1], len(runs), total)
    elapsed = time.perf_counter() - start
    result = {
        "command": "flora bench accuracy",
        "machine": machine(),
        "weights": weights_digest(cfg.clip_pretrained),
        "seconds": elapsed,
        "config": cfg.__dict__,
        "settings": {s: SETTINGS[s] for s in settings},
        "runs": runs,
    }
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    _plots(result, figures)
    _write_report(out_dir, "results", result, _results_markdown)
    return result


def _table(
    result: dict[str, Any], setting: str
) -> tuple[list[str], dict[str, dict[str, tuple[float, float]]]]:
    keys = ("local_acc_mean", "base_acc_mean", "novel_acc_mean", "novel_global_acc_mean", "hm")
    rows: dict[str, dict[str, tuple[float, float]]] = {}
    methods = []
    for run in result["runs"]:
        if run["setting"] != setting:
            continue
        if run["method"] not in methods:
            methods.append(run["method"])
    for m in methods:
        finals = [r["final"] for r in result["runs"] if r["setting"] == setting and r["method"] == m]
        rows[m] = {k: _mean_std([f[k] for f in finals if k in f]) for k in keys}
    return methods, rows


def run_ablation(
    out_dir: str = "docs",
    work_dir: str = "runs/bench",
    seeds: int = 3,
    settings: list[str] | None = None,
    variants: list[str] | None = None,
    cfg: BenchConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """FLORA with one component changed at a time; writes ``ablation.md`` and ``ablation.json`` into ``out_dir``.

    ``variants`` are names from :data:`ABLATIONS` (default: all); ``settings`` default to label skew and feature shift.
    """
    from rich.console import Console

    cfg = cfg or BenchConfig()
    settings = settings or ["label", "feature"]
    variants = variants or list(ABLATIONS)
    unknown = [v for v in variants if v not in ABLATIONS]
    if unknown:
        raise ValueError(f"unknown ablation variant(s) {unknown}; choose from {list(ABLATIONS)}")
    for setting in settings:
        if setting not in SETTINGS:
            raise ValueError(f"unknown setting {setting!r}; choose from {list(SETTINGS)}")
    console = Console(highlight=False)
    work = Path(work_dir)
    runs: list[dict[str, Any]] = []
    start = time.perf_counter()
    total = len(settings) * seeds * len(variants)
    for setting in settings:
        for seed in range(seeds):
            for variant in variants:
                method, overrides, _ = ABLATIONS[variant]
                module = make_method(method, cfg, **overrides)
                runs.append(_run(setting, seed, f"ablation {variant}", module, cfg, work))
                runs[-1]["method"] = variant
                if progress:
                    _print_run(console, runs[-1], len(runs), total)
    result = {
        "command": "flora bench ablation",
        "machine": machine(),
        "weights": weights_digest(cfg.clip_pretrained),
        "seconds": time.perf_counter() - start,
        "config": cfg.__dict__,
        "settings": {s: SETTINGS[s] for s in settings},
        "variants": {
            v: {"method": ABLATIONS[v][0], "overrides": ABLATIONS[v][1], "description": ABLATIONS[v][2]}
            for v in variants
        },
        "runs": runs,
    }
    _write_report(out_dir, "ablation", result, _ablation_markdown)
    return result


def _ablation_markdown(result: dict[str, Any]) -> str:
    seeds = sorted({r["seed"] for r in result["runs"]})
    cfg = result["config"]
    lines = [
        "# FLORA ablation (synthetic world, tiny CLIP)",
        "",
        "Generated by `flora bench ablation` (`make bench`); every number below is from that",
        "command, as measured. Each row changes one thing against the first row, which is FLORA",
        "exactly as run by `flora bench accuracy` (see results.md for the setting details).",
        "",
        f"- machine: {result['machine']}",
        f"- backbone: `flora-tiny`, {result.get('weights', 'weights not recorded')}",
        f"- run time: {result['seconds'] / 60:.1f} min for {len(result['runs'])} runs",
        f"- seeds: {seeds}; mean ± std over seeds",
        f"- every run: {cfg['rounds']} rounds, {cfg['local_epochs']} local epoch(s), batch {cfg['batch_size']}, "
        f"SGD lr {cfg['lr']} (momentum 0.9), n_ctx {cfg['n_ctx']}, rank {cfg['rank']}",
        "",
        "Local: each client's own test split; Base: the whole base-class test set; Novel: the",
        "novel-class test set with the personalised model (Novel-G: with the global prompt alone);",
        "HM: harmonic mean of Local, Base and Novel. All in percent, final round.",
        "",
        "| variant | change | meaning |",
        "|---|---|---|",
    ]
    for v, spec in result["variants"].items():
        change = ", ".join(f"`{k}={val}`" for k, val in spec["overrides"].items()) or "-"
        if spec["method"] != "FLORA":
            change = f"`{spec['method']}` instead of FLORA"
        lines.append(f"| {v} | {change} | {spec.get('description', '')} |")
    lines.append("")
    keys = ("local_acc_mean", "base_acc_mean", "novel_acc_mean", "novel_global_acc_mean", "hm")
    for setting, description in result["settings"].items():
        variants, rows = _table(result, setting)
        reference = rows.get("FLORA")
        lines += [
            f"## {setting}: {description}",
            "",
            "| variant | Local | Base | Novel | Novel-G | HM | HM vs FLORA |",
            "|---|---|---|---|---|---|---|",
        ]
        for v in variants:
            cells = []
            for k in keys:
                mean, std = rows[v][k]
                cells.append("-" if mean != mean else f"{mean:.1f} ± {std:.1f}")
            delta = (
                "-" if reference is None or v == "FLORA" else f"{rows[v]['hm'][0] - reference['hm'][0]:+.1f}"
            )
            lines.append(f"| {v} | " + " | ".join(cells) + f" | {delta} |")
        lines.append("")
        if reference is not None:
            # computed statements: a variant counts as above/below FLORA when the gap exceeds both stds
            ref_mean, ref_std = reference["hm"]
            margin = {v: max(ref_std, rows[v]["hm"][1]) for v in variants if v != "FLORA"}
            above = [v for v in margin if rows[v]["hm"][0] - ref_mean > margin[v]]
            below = [v for v in margin if ref_mean - rows[v]["hm"][0] > margin[v]]
            lines += [
                f"- HM above FLORA's by more than the std: {', '.join(above) or 'none'}.",
                f"- HM below FLORA's by more than the std: {', '.join(below) or 'none'}.",
                "",
            ]
    return "\n".join(lines) + "\n"


def _results_markdown(result: dict[str, Any]) -> str:
    seeds = sorted({r["seed"] for r in result["runs"]})
    cfg = result["config"]
    lines = [
        "# Benchmark results (synthetic world, tiny CLIP)",
        "",
        "Generated by `flora bench accuracy` (`make bench`); every number below is from that",
        "command, as measured. Nothing in the table is tuned per method.",
        "",
        f"- machine: {result['machine']}",
        f"- run time: {result['seconds'] / 60:.1f} min for {len(result['runs'])} runs",
        f"- seeds: {seeds} (partition, initialisation and sampling); mean ± std over seeds",
        f"- every run: {cfg['rounds']} rounds, {cfg['local_epochs']} local epoch(s), evaluation every "
        f"{cfg['eval_every']} rounds, batch {cfg['batch_size']}, "
        f"SGD lr {cfg['lr']} (momentum 0.9), n_ctx {cfg['n_ctx']}, rank {cfg['rank']} (FedPGP, FLORA), "
        "FLORA with a global adapter",
        f"- method defaults otherwise: PromptPer {cfg['n_ctx'] - cfg['n_ctx'] // 2} global + {cfg['n_ctx'] // 2} "
        "local tokens; PromptFL+FT 1 fine-tuning epoch before each evaluation; PromptProx mu 0.5; PromptAMP "
        "lam 1, self-weight 0.5, sigma the median distance; pFedPrompt alpha 1, beta 5.5, patch-feature "
        "memory; FedOTP gamma 0.8, eps 0.1; pFedMoAP 9 experts, lambda 0.5, gate lr 0.01; FedPGP "
        "and FLORA mu 1, tau 0.5",
        f"- world: {cfg['num_colors']} colours x {cfg['num_shapes']} shapes = "
        f"{cfg['num_colors'] * cfg['num_shapes']} classes; {cfg.get('train_per_class', 20)} training images per "
        f"class in label skew, {cfg.get('train_per_class_style', 8)} per class and style in the other two "
        "settings; base-to-novel protocol: clients train on the "
        f"first {(cfg['num_colors'] * cfg['num_shapes'] + 1) // 2} classes (Local and Base are over these), "
        "Novel is over the other half (chance: 2 %)",
        f"- backbone: `flora-tiny` with the shipped weights (`flora pretrain-tiny`; {result.get('weights', 'not recorded')})",
        "",
        "Local: each client's own test split; Base: the whole base-class test set; Novel: the",
        "novel-class test set with the personalised model (Novel-G: with the global part alone);",
        "HM: harmonic mean of Local, Base and Novel. All in percent, final round.",
        "",
    ]
    for setting, description in result["settings"].items():
        methods, rows = _table(result, setting)
        lines += [
            f"## {setting}: {description}",
            "",
            "| method | Local | Base | Novel | Novel-G | HM |",
            "|---|---|---|---|---|---|",
        ]
        best_hm = max(rows[m]["hm"][0] for m in methods)
        for m in methods:
            cells = []
            for k in ("local_acc_mean", "base_acc_mean", "novel_acc_mean", "novel_global_acc_mean", "hm"):
                mean, std = rows[m][k]
                cell = "-" if mean != mean else f"{mean:.1f} ± {std:.1f}"
                if k == "hm" and mean == best_hm:
                    cell = f"**{cell}**"
                cells.append(cell)
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines += ["", f"![local accuracy per round](figures/accuracy_{setting}.png)", ""]
        lines += [f"![per-client accuracy](figures/clients_{setting}.png)", ""]
        lines += [f"![partition](figures/partition_{setting}.png)", ""]
        lines += _checks(rows, methods)
        lines += _convergence(result, setting)
    return "\n".join(lines) + "\n"


def _seed_mean_curve(result: dict[str, Any], setting: str, method: str) -> list[tuple[int, float]]:
    """Local accuracy per evaluated round, averaged over the seeds that evaluated that round."""
    per_round: dict[int, list[float]] = {}
    for run in result["runs"]:
        if run["setting"] == setting and run["method"] == method:
            for rnd, acc in run["curve"]:
                per_round.setdefault(int(rnd), []).append(acc)
    return [(rnd, statistics.fmean(v)) for rnd, v in sorted(per_round.items())]


def _convergence(result: dict[str, Any], setting: str, tol: float = 1.0) -> list[str]:
    """Whether the seed-mean Local curves have flattened: change over the last evaluation interval."""
    deltas = {}
    for method in dict.fromkeys(r["method"] for r in result["runs"] if r["setting"] == setting):
        curve = _seed_mean_curve(result, setting, method)
        if len(curve) >= 2:
            deltas[method] = (curve[-2][0], curve[-1][0], curve[-1][1] - curve[-2][1])
    if not deltas:
        return []
    worst = max(deltas, key=lambda m: abs(deltas[m][2]))
    moving = [f"{m} ({d:+.1f})" for m, (_, _, d) in deltas.items() if abs(d) > tol]
    first, last, _ = deltas[worst]
    return [
        f"- convergence: between rounds {first} and {last} the seed-mean Local of every method moved by at "
        f"most {abs(deltas[worst][2]):.1f} points ({worst}); more than {tol:.0f} point: {', '.join(moving) or 'none'}.",
        "",
    ]


def _checks(rows: dict[str, dict[str, tuple[float, float]]], methods: list[str]) -> list[str]:
    """Plain statements of what the numbers show (computed, not written by hand)."""
    out = []
    if "zero-shot" in rows:
        zs = rows["zero-shot"]["local_acc_mean"][0]
        best = max(methods, key=lambda m: rows[m]["local_acc_mean"][0])
        out.append(
            f"- zero-shot Local {zs:.1f} % vs. best Local {rows[best]['local_acc_mean'][0]:.1f} % ({best})."
        )
    if "PromptFL" in rows:
        pfl = rows["PromptFL"]["local_acc_mean"][0]
        better = [m for m in PERSONALISED if m in rows and rows[m]["local_acc_mean"][0] > pfl]
        out.append(f"- personalised methods above PromptFL on Local: {', '.join(better) or 'none'}.")
        if "zero-shot" in rows:
            zs_base = rows["zero-shot"]["base_acc_mean"][0]
            pfl_base = rows["PromptFL"]["base_acc_mean"][0]
            verdict = "above" if pfl_base > zs_base else "not above"
            out.append(f"- PromptFL Base {pfl_base:.1f} % vs. zero-shot Base {zs_base:.1f} % ({verdict}).")
        if "FedOTP" in rows:
            gap = rows["FedOTP"]["local_acc_mean"][0] - pfl
            out.append(f"- FedOTP Local minus PromptFL Local: {gap:+.1f} points.")
    if "FLORA" in rows:
        hm = {m: rows[m]["hm"] for m in methods}
        best = max(methods, key=lambda m: hm[m][0])
        out.append(
            f"- best HM: {best} ({hm[best][0]:.1f} ± {hm[best][1]:.1f}); FLORA {hm['FLORA'][0]:.1f} ± {hm['FLORA'][1]:.1f}."
        )
        out.append(
            "- FLORA with one component changed at a time: [ablation.md](ablation.md) (`flora bench ablation`)."
        )
    return [*out, ""]


def _plots(result: dict[str, Any], figures: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    for setting in result["settings"]:
        runs = [r for r in result["runs"] if r["setting"] == setting]
        methods = list(dict.fromkeys(r["method"] for r in runs))
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for m in methods:
            curves = [r["curve"] for r in runs if r["method"] == m]
            rounds = [x for x, _ in curves[0]]
            acc = np.array([[y for _, y in c] for c in curves if len(c) == len(rounds)])
            if len(rounds) == 1:
                ax.axhline(acc.mean(), linestyle=":", label=m, color="gray")
            else:
                ax.plot(rounds, acc.mean(0), marker="o", markersize=3, label=m)
        ax.set_xlabel("round")
        ax.set_ylabel("local accuracy (%)")
        ax.set_title(f"{setting}: local accuracy (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(figures / f"accuracy_{setting}.png")
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        data = [[a for r in runs if r["method"] == m for a in r["clients"]] for m in methods]
        ax.boxplot(data, tick_labels=methods)
        ax.set_ylabel("final local accuracy per client (%)")
        ax.set_title(f"{setting}: per-client accuracy (all seeds)")
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        fig.savefig(figures / f"clients_{setting}.png")
        plt.close(fig)

        first = min(runs, key=lambda r: r["seed"])
        manifest = json.loads((Path(first["data"]) / "manifest.json").read_text())
        counts = np.array([c["train_counts"] for c in manifest["clients"]])
        fig, ax = plt.subplots(figsize=(8, 3), dpi=120)
        im = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xlabel("base class (label)")
        ax.set_ylabel("client")
        ax.set_title(f"{setting}: training samples per client and class (seed {first['seed']})")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(figures / f"partition_{setting}.png")
        plt.close(fig)


def run_speed(
    out_dir: str = "docs",
    work_dir: str = "runs/bench-speed",
    rounds: int = 3,
    devices: list[int] | None = None,
    precision: str = "32-true",
    cfg: BenchConfig | None = None,
) -> dict[str, Any]:
    """Per-round time split (image tower, text tower, optimiser, aggregation, evaluation) and images/s.

    Runs on the GPU when one is present (``precision`` e.g. ``bf16-mixed`` there), else on the CPU.
    """
    from rich.console import Console

    console = Console(highlight=False)
    devices = devices or [1, 2]
    cfg = cfg or BenchConfig()
    cfg.rounds = rounds
    work = Path(work_dir)
    rows = []
    start = time.perf_counter()
    for cache in ("memory", "off"):
        for n_dev in devices:
            dm = make_datamodule("label", 0, cfg, work)
            dm.cache.mode = cache
            name = f"speed-cache_{cache}-dev{n_dev}"
            trainer = FederatedTrainer(
                rounds=rounds,
                seed=0,
                accelerator="cpu" if not torch.cuda.is_available() else "auto",
                devices=n_dev,
                precision=precision,
                strategy="ddp_spawn" if n_dev > 1 else "auto",
                output_dir=str(work / "runs"),
                name=name,
                overwrite=True,
                progress=False,
                loggers=[],
                profile=True,
            )
            t0 = time.perf_counter()
            trainer.fit(make_method("FLORA", cfg), dm)
            wall = time.perf_counter() - t0
            history = [
                json.loads(x) for x in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()
            ]
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
    result = {
        "command": "flora bench speed",
        "machine": machine(),
        "seconds": time.perf_counter() - start,
        "rounds": rounds,
        "precision": precision,
        "rows": rows,
    }
    _write_report(out_dir, "performance", result, _performance_markdown)
    return result


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
    return "\n".join(lines) + "\n"
