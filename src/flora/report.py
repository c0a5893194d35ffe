"""``flora report RUN_DIR_OR_GLOB...``: compare finished runs (a sweep, seeds, methods) in one report.

``report.md`` / ``report.html`` hold the final and best metrics per run with the options that
differ between runs as columns (shared ones listed once), the mean ± std over seeds of runs
that differ only by seed, local accuracy per round (``accuracy.png``) and the final per-client
accuracy (``clients.png``). Options come from ``summary.json`` (``hparams``, ``trainer``, ``data``,
``seed``), else from ``config.yaml``; a run with neither is compared by its method (and says so).
"""

from __future__ import annotations

import glob
import html as html_lib
import json
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flora.errors import FloraConfigError
from flora.fileio import atomic_write, atomic_write_text

#: options that name where or how a run was written, not what it computed: never compared
IGNORED = {
    "ckpt_path", "model.class_path", "model.class_names", "trainer.name", "trainer.output_dir",
    "trainer.overwrite", "trainer.progress", "trainer.loggers", "trainer.wandb_project",
    "trainer.checkpoint_every", "data.root", "data.prepare", "data.verify_shards",
}  # fmt: skip
#: options that are the run's seed: runs that differ only in these form one group
SEED_KEYS = {"trainer.seed", "data.partition.seed", "seed_everything"}
#: metric columns: key, title, scale, decimals (percentages as summary.json stores them)
METRICS = (
    ("round", "round", 1, 0), ("local_acc_mean", "Local", 1, 2), ("local_acc_std", "Local std", 1, 2),
    ("local_acc_worst10", "Worst10%", 1, 2), ("local_acc_pooled", "Pooled", 1, 2),
    ("local_f1_mean", "F1", 1, 2), ("global_acc", "Global", 1, 2), ("base_acc_mean", "Base", 1, 2),
    ("novel_acc_mean", "Novel", 1, 2), ("novel_global_acc_mean", "Novel-G", 1, 2), ("hm", "HM", 1, 2),
    ("bytes_up_total", "up MiB", 2**-20, 2), ("bytes_down_total", "down MiB", 2**-20, 2),
    ("wall_time_s", "time s", 1, 1),
)  # fmt: skip
TERMINAL = ("Local", "Worst10%", "F1", "Global", "Base", "Novel", "Novel-G", "HM")
_OVER_SEEDS = "mean ± std over seeds (population std)"
TITLES = {
    "groups_final": f"Final round, {_OVER_SEEDS}", "runs_final": "Final round per run",
    "groups_best": f"Best round, {_OVER_SEEDS}", "runs_best": "Best round per run (by HM under base/novel, else Local)",
}  # fmt: skip
REPORT_FILES = ("report.md", "report.html", "report.json", "accuracy.png", "clients.png")
_SEED_SUFFIX = re.compile(r"[-_.]?(?:s|seed)(\d+)$")
_RUN_FILES = ("summary.json", "metrics.jsonl")
_STYLE = (
    "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;"
    "padding:3px 8px;text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
)


@dataclass
class Run:
    path: Path
    name: str
    summary: dict[str, Any]
    history: list[dict[str, Any]]
    options: dict[str, Any]  # flattened (``model.lr``, ``trainer.rounds``, ...); always has ``method``
    recorded: bool  # whether options beyond the method are known
    seed: int | None
    notes: list[str] = field(default_factory=list)
    stem: str = ""  # the folder name without a ``-s<N>`` seed suffix


@dataclass
class Group:
    runs: list[Run]
    options: dict[str, Any]  # the differing options (seeds aside) its runs share
    label: str = ""


def _check_run(path: Path) -> Path:
    if len(present := {n for n in _RUN_FILES if (path / n).is_file()}) == 1:
        why = f"it has no {(set(_RUN_FILES) - present).pop()} (did the run stop early?)"
        raise FloraConfigError(f"{path} is not a finished run: {why}")
    if not present:
        why = f"no summary.json or metrics.jsonl; for the runs inside it give '{path}/*'"
        raise FloraConfigError(f"{path} is not a run folder ({why})")
    return path


def find_runs(patterns: Sequence[str]) -> tuple[list[Path], list[Path]]:
    """The run folders that ``patterns`` (folders, or globs that skip folders with neither file) name."""
    found: list[Path] = []
    skipped: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = [Path(p) for p in sorted(glob.glob(pattern)) if Path(p).is_dir()]
            runs = [p for p in matches if any((p / n).exists() for n in _RUN_FILES)]
            skipped += [p for p in matches if p not in runs]
            if not runs:
                what = "no run folder (one with summary.json and metrics.jsonl)" if matches else "no folder"
                raise FloraConfigError(f"{pattern!r} matches {what}")
        elif not Path(pattern).is_dir():
            raise FloraConfigError(f"run folder {pattern} does not exist")
        else:
            runs = [Path(pattern)]
        found += [_check_run(p) for p in runs if p.resolve() not in {q.resolve() for q in found}]
    if not found:
        raise FloraConfigError("flora report needs at least one run folder or glob")
    return found, skipped


def _read(path: Path, kind: str) -> Any:
    """``path`` parsed as json, jsonl or yaml; a one-line error naming the file if it cannot be."""
    try:
        text = path.read_text(encoding="utf-8")
        if kind == "jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return yaml.safe_load(text) if kind == "yaml" else json.loads(text)
    except OSError as err:
        raise FloraConfigError(f"cannot read {path}: {err.strerror}") from None
    except (ValueError, yaml.YAMLError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise FloraConfigError(f"{path} is not valid {kind}: {' '.join(str(err).split())}") from None


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested options as ``a.b.c`` keys; ``init_args`` levels dropped, a ``class_path`` kept as ``.class``."""
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if key == "init_args":
            out.update(flatten(value, prefix))
        elif key == "class_path" and prefix not in ("", "model"):
            out[f"{prefix}.class"] = str(value).rsplit(".", 1)[-1]
        else:
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def load_run(path: Path) -> Run:
    """One run folder: its summary, history and options (from summary.json, else config.yaml)."""
    summary = _read(path / "summary.json", "json")
    if not isinstance(summary, dict) or "method" not in summary:
        raise FloraConfigError(f"{path / 'summary.json'} is not a flora run summary (it has no 'method')")
    history = _read(path / "metrics.jsonl", "jsonl")
    if not all(isinstance(r, dict) and "round" in r for r in history):
        raise FloraConfigError(f"{path / 'metrics.jsonl'} is corrupt: a line is not a round's record")
    notes: list[str] = []
    if isinstance(summary.get("hparams"), dict):
        parts = {"model": summary["hparams"], "trainer": summary.get("trainer"), "data": summary.get("data")}
        options = flatten({k: v for k, v in parts.items() if isinstance(v, dict)})
    elif (path / "config.yaml").is_file():
        options = flatten(_read(path / "config.yaml", "yaml") or {})
        notes.append("options read from config.yaml (summary.json records none)")
    else:
        options = {}
        notes.append("no options recorded (no hparams in summary.json, no config.yaml): compared by method")
    recorded = bool(options)
    options = {k: v for k, v in options.items() if k not in IGNORED}
    options["method"] = str(summary["method"]).rsplit(".", 1)[-1]
    seed = summary.get("seed", options.get("trainer.seed"))
    if not isinstance(seed, int) or isinstance(seed, bool):
        match = _SEED_SUFFIX.search(path.name)
        seed = int(match.group(1)) if match else None
        notes.append("seed taken from the folder name" if match else "seed not recorded")
    stem = _SEED_SUFFIX.sub("", path.name) or path.name
    return Run(path, path.name, summary, history, options, recorded, seed, notes, stem)


def compare(runs: list[Run]) -> tuple[dict[str, Any], list[str]]:
    """The options the runs that record them share, and the keys whose values differ (``method`` first)."""
    known = [r for r in runs if r.recorded]
    shared: dict[str, Any] = {}
    differing: list[str] = []
    for key in dict.fromkeys(k for r in runs for k in r.options):
        pool = runs if key == "method" else known
        values = {json.dumps(r.options.get(key, "<missing>"), default=str, sort_keys=True) for r in pool}
        if len(values) == 1 and key in pool[0].options:
            shared[key] = pool[0].options[key]
        else:
            differing.append(key)
    return shared, sorted(differing, key=lambda k: k != "method")


def group_runs(runs: list[Run], differing: list[str]) -> list[Group]:
    """Runs whose options differ only by seed (runs without options: by method and folder name), labelled
    by method and the options that tell a group from the others of its method, else by folder name."""
    keys = [k for k in differing if k not in SEED_KEYS]
    groups: dict[str, Group] = {}
    for run in runs:
        values = {k: run.options[k] for k in keys if k in run.options and (run.recorded or k == "method")}
        ident = json.dumps([run.recorded or run.stem, values], default=str, sort_keys=True)
        groups.setdefault(ident, Group([], values)).runs.append(run)
    for g in groups.values():
        same = [h for h in groups.values() if h.options.get("method") == g.options.get("method")]
        peers = [h for h in same if h.runs[0].recorded]
        varying = [k for k in keys if k != "method" and len({_value(h.options.get(k)) for h in peers}) > 1]
        parts = [_value(g.options["method"])] if "method" in keys else []
        parts += [f"{k.rsplit('.', 1)[-1]}={_value(g.options[k])}" for k in varying if k in g.options]
        stems = {r.stem for r in g.runs}  # runs that differ only by seed: the folder name without it
        fallback = stems.pop() if len(stems) == 1 else ", ".join(parts) or g.runs[0].options["method"]
        g.label = ", ".join(parts) if g.runs[0].recorded and parts else fallback
    return list(groups.values())


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population std (as ``flora.bench.common.mean_std``)."""
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _value(value: Any) -> str:
    """An option's value as a table cell (YAML-like: ``null``, ``true``, ``0.001``)."""
    if isinstance(value, float):
        return f"{value:g}"
    plain = isinstance(value, str | int) and not isinstance(value, bool)
    return str(value) if plain else json.dumps(value, default=str)


def _metric_columns(runs: list[Run], part: str) -> list[tuple[str, str, float, int]]:
    present = {k for r in runs for k in r.summary.get(part, {})}
    extra = sorted(present - {m[0] for m in METRICS})
    return [m for m in METRICS if m[0] in present] + [(k, k, 1, 2) for k in extra]


def run_table(runs: list[Run], columns: list[str], part: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the ``final`` or ``best`` metrics per run, with the option ``columns``."""
    metrics = _metric_columns(runs, part)
    rows = []
    for r in runs:
        options = [_value(r.options[k]) if k in r.options else "-" if r.recorded else "?" for k in columns]
        values = r.summary.get(part, {})
        numbers = [f"{values[k] * s:.{d}f}" if _is_number(values.get(k)) else "-" for k, _, s, d in metrics]
        rows.append([r.name, *options, _value(r.seed), *numbers])
    return ["run", *columns, "seed", *[m[1] for m in metrics]], rows


def group_table(groups: list[Group], differing: list[str], part: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of each group's mean ± std over its runs (seeds)."""
    keys = [k for k in differing if k not in SEED_KEYS]
    metrics = [m for m in _metric_columns([r for g in groups for r in g.runs], part) if m[0] != "round"]
    rows = []
    for g in groups:
        cells = [g.label, *[_value(g.options[k]) if k in g.options else "-" for k in keys]]
        cells += [str(len(g.runs)), ", ".join(_value(r.seed) for r in g.runs)]
        for key, _, scale, digits in metrics:
            values = [v * scale for r in g.runs if _is_number(v := r.summary.get(part, {}).get(key))]
            mean, std = _mean_std(values) if values else (None, None)
            cells.append("-" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}")
        rows.append(cells)
    return ["group", *keys, "runs", "seeds", *[m[1] for m in metrics]], rows


def to_markdown(blocks: list[tuple]) -> str:
    """A report's blocks, ``("h", level, text)``, ``("p", text)``, ``("ul", items)``, ``("table", header, rows)``
    or ``("img", file)``, as markdown; text may hold `code`."""
    row = lambda cells: "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"  # noqa: E731
    out = []
    for kind, *args in blocks:
        if kind == "h":
            out.append("#" * args[0] + " " + args[1])
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in args[0]))
        elif kind == "table":
            out.append("\n".join([row(args[0]), "|" + "---|" * len(args[0]), *map(row, args[1])]))
        else:
            out.append(f"![{args[0][:-4]}]({args[0]})" if kind == "img" else args[0])
    return "\n\n".join(out) + "\n"


def to_html(blocks: list[tuple], title: str) -> str:
    esc = lambda t: re.sub(r"`([^`]+)`", r"<code>\1</code>", html_lib.escape(t, quote=False))  # noqa: E731
    row = lambda tag, cells: "<tr>" + "".join(f"<{tag}>{esc(c)}</{tag}>" for c in cells) + "</tr>"  # noqa: E731
    out = []
    for kind, *args in blocks:
        if kind == "h":
            out.append(f"<h{args[0]}>{esc(args[1])}</h{args[0]}>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in args[0]) + "</ul>")
        elif kind == "table":
            body = "".join(row("td", r) for r in args[1])
            out.append(f"<table><thead>{row('th', args[0])}</thead><tbody>{body}</tbody></table>")
        else:
            src = html_lib.escape(args[0])
            out.append(f'<p><img src="{src}" alt="{src}"></p>' if kind == "img" else f"<p>{esc(args[0])}</p>")
    head = f'<meta charset="utf-8"><title>{html_lib.escape(title)}</title><style>{_STYLE}</style>'
    return f"<!DOCTYPE html>\n<html><head>{head}</head>\n<body>\n" + "\n".join(out) + "\n</body></html>\n"


def plot(groups: list[Group], out: Path) -> list[str]:
    """``accuracy.png`` (local accuracy per round, mean ± std per group), ``clients.png`` (final round per client)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig: Any, name: str, **labels: str) -> None:
        fig.axes[0].set(**labels)
        fig.axes[0].grid(alpha=0.3)
        fig.tight_layout()
        atomic_write(out / name, lambda tmp: fig.savefig(tmp, format="png"))
        written.append(name)

    written: list[str] = []
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for g in groups:
        per_round: dict[int, list[float]] = {}
        for rec in (rec for r in g.runs for rec in r.history if _is_number(rec.get("local_acc_mean"))):
            per_round.setdefault(int(rec["round"]), []).append(rec["local_acc_mean"])
        rounds = sorted(per_round)
        stats = [_mean_std(per_round[x]) for x in rounds]
        if rounds:
            label = f"{g.label} (n={len(g.runs)})"
            line = ax.plot(rounds, [m for m, _ in stats], marker="o", ms=3, label=label)
            lo, hi = [m - s for m, s in stats], [m + s for m, s in stats]
            ax.fill_between(rounds, lo, hi, alpha=0.15, color=line[0].get_color())
    if ax.lines:
        ax.legend(fontsize="small")
        ax.xaxis.get_major_locator().set_params(integer=True)
        save(fig, "accuracy.png", xlabel="round", ylabel="local accuracy (%)", title="mean ± std over runs")

    data, labels = [], []
    for g in groups:
        last = [[rec for rec in r.history if "local_acc_clients" in rec][-1:] for r in g.runs]
        values = [float(v) for records in last for rec in records for v in rec["local_acc_clients"]]
        if values:
            data.append(values)
            labels.append(g.label if len(g.label) <= 40 else g.label[:39] + "…")
    if data:
        fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(data) + 2), 4), dpi=120)
        ax.boxplot(data, tick_labels=labels)
        plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
        save(fig, "clients.png", ylabel="final local accuracy per client (%)", title="clients of all runs")
    plt.close("all")
    return written


def run_report(
    paths: list[str], out: str | None = None, html: bool = True, overwrite: bool = False, quiet: bool = False
) -> dict[str, Any]:
    """Write a report on the runs that ``paths`` (run folders or globs) name into ``out``; returns its content.

    ``out`` defaults to ``reports/<date>-<time>``; a report already there is replaced only with
    ``overwrite``. Prints the final-round tables unless ``quiet``.
    """
    folders, skipped = find_runs(paths)
    runs = [load_run(p) for p in folders]
    names = [r.name for r in runs]
    for r in runs:  # folders of the same name in different parents are named by their path
        r.name = str(r.path) if names.count(r.name) > 1 else r.name
    out_dir = Path(out) if out else Path("reports") / time.strftime("%Y%m%d-%H%M%S")
    if (existing := [n for n in REPORT_FILES if (out_dir / n).exists()]) and not overwrite:
        raise FloraConfigError(
            f"report folder {out_dir} already holds a report ({', '.join(existing)}); "
            "choose another --out or replace it with --overwrite true"
        )
    shared, differing = compare(runs)
    groups = group_runs(runs, differing)
    seeded = any(len(g.runs) > 1 for g in groups)
    # the seed column is the trainer's seed; another seed option is a column where it differs from that
    columns = [
        k for k in differing
        if k not in SEED_KEYS or (k != "trainer.seed" and any(r.options.get(k, r.seed) != r.seed for r in runs))
    ]  # fmt: skip
    tables = {f"runs_{part}": run_table(runs, columns, part) for part in ("final", "best")}
    if seeded:
        tables.update({f"groups_{part}": group_table(groups, differing, part) for part in ("final", "best")})
    notes = {n: [r.name for r in runs if n in r.notes] for r0 in runs for n in r0.notes}
    recorded = sum(r.recorded for r in runs)

    blocks: list[tuple] = [("h", 1, f"flora report: {len(runs)} runs")]
    blocks.append(("p", "Run folders: " + ", ".join(f"`{r.path}`" for r in runs)))
    if skipped:
        blocks.append(("p", "Skipped (not run folders): " + ", ".join(f"`{p}`" for p in skipped)))
    if notes:
        blocks += [("h", 2, "Notes"), ("ul", [f"{n}: {', '.join(names)}" for n, names in notes.items()])]
    if shared:
        whose = "every run shares" if recorded == len(runs) else f"of the {recorded} runs that record them"
        blocks += [("h", 2, f"Options {whose}"), ("ul", [f"`{k}`: {_value(v)}" for k, v in shared.items()])]
    if not recorded:
        blocks.append(("p", "No run records its options: the runs are compared by method (and seed) only."))
    blocks += [b for key in TITLES if key in tables for b in (("h", 2, TITLES[key]), ("table", *tables[key]))]
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = plot(groups, out_dir)
    blocks += [("h", 2, "Plots"), *[("img", f) for f in figures]] if figures else []
    atomic_write_text(out_dir / "report.md", to_markdown(blocks))
    if html:
        atomic_write_text(out_dir / "report.html", to_html(blocks, f"flora report: {len(runs)} runs"))
    written = [*figures, "report.md", "report.json", *(["report.html"] if html else [])]
    for stale in set(REPORT_FILES) - set(written):
        (out_dir / stale).unlink(missing_ok=True)
    result = {
        "out": str(out_dir), "files": written, "shared": shared, "differing": differing, "notes": notes,
        "runs": [{"path": str(r.path), "name": r.name, "seed": r.seed, "options": r.options,
                  "final": r.summary.get("final"), "best": r.summary.get("best")} for r in runs],
        "groups": [{"label": g.label, "options": g.options, "runs": [r.name for r in g.runs]} for g in groups],
        "tables": {k: {"header": h, "rows": rows} for k, (h, rows) in tables.items()},
    }  # fmt: skip
    atomic_write_text(out_dir / "report.json", json.dumps(result, indent=1, default=str))
    if not quiet:
        _print_report(result, groups)
    return result


def _print_report(result: dict[str, Any], groups: list[Group]) -> None:
    """The final-round tables (per run, per group) in the terminal, the notes and where the report is."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(highlight=False)
    console = console if console.is_terminal else Console(highlight=False, width=240)  # whole rows in a file
    label = {r.name: g.label for g in groups for r in g.runs}
    runs = result["tables"]["runs_final"]
    printed = [("runs_final", [*runs["header"], "group"], [[*row, label[row[0]]] for row in runs["rows"]])]
    if "groups_final" in result["tables"]:
        printed.append(("groups_final", *result["tables"]["groups_final"].values()))
    for key, header, rows in printed:
        keep = ["run", "group", "runs", "seed", "seeds", *TERMINAL]
        cols = [header.index(h) for h in keep if h in header]
        table = Table(title=TITLES[key], title_justify="left")
        for i in cols:
            metric = header[i] in TERMINAL
            table.add_column(escape(header[i]), justify="right" if metric else "left", no_wrap=metric)
        for row in rows:
            table.add_row(*[escape(row[i]) for i in cols])
        console.print(table)
    for note, names in result["notes"].items():
        which = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        console.print(f"note: {note}: {len(names)} run(s) ({which})", soft_wrap=True, markup=False)
    done = f"flora report: {len(result['runs'])} runs, {len(groups)} groups -> {result['out']}/report.md"
    console.print(done, soft_wrap=True, markup=False)


def report_main(argv: Sequence[str]) -> int:
    """``flora report RUN_DIR_OR_GLOB...``: compare finished runs (tables, mean ± std over seeds, plots)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="flora report", description=report_main.__doc__)
    parser.add_argument("runs", type=str, nargs="+", help="run folders or globs (quote globs)")
    parser.add_argument("--out", type=str | None, default=None, help="report folder (reports/<date>-<time>)")
    parser.add_argument("--html", type=bool, default=True, help="also write report.html")
    parser.add_argument("--overwrite", type=bool, default=False, help="replace an existing report in --out")
    cfg = parser.parse_args(list(argv))
    run_report(list(cfg.runs), out=cfg.out, html=cfg.html, overwrite=cfg.overwrite)
    return 0
