"""``flora report``: the seed mean of a benchmark's runs, options that differ as columns, plots, one-line errors."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml

from flora.bench import BenchConfig, run_accuracy
from flora.errors import FloraConfigError
from flora.report import report_main, run_report

SEEDS = 3
# the miniature benchmark world; one local epoch and two clients a round keep three fits short
MINI = BenchConfig(
    rounds=2, num_colors=4, num_shapes=5, clip_pretrained=None, local_epochs=1, clients_per_round=2
)
COLUMNS = {"local_acc_mean": "Local", "base_acc_mean": "Base", "novel_acc_mean": "Novel", "hm": "HM"}


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A tiny ``flora bench accuracy``: PromptFL in the label-skew setting, three seeds."""
    root = tmp_path_factory.mktemp("bench")
    run_accuracy(
        str(root / "docs"),
        str(root / "work"),
        seeds=SEEDS,
        settings=["label"],
        methods=["PromptFL"],
        cfg=MINI,
        progress=False,
    )
    return root / "work" / "runs", json.loads((root / "docs" / "results.json").read_text())


def _markdown_table(text: str, title: str) -> list[dict[str, str]]:
    """The rows (column -> cell) of the markdown table under the heading that starts with ``title``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"## {title}"))
    table = [line for line in lines[start + 1 :] if line.strip()]
    table = table[: next((i for i, line in enumerate(table) if not line.startswith("|")), len(table))]
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in table]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


def _printed_table(out: str, title: str) -> list[dict[str, str]]:
    """The rows of the terminal table printed under ``title`` (rich box characters)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    header = [c.strip() for c in lines[start + 2].split("┃")[1:-1]]
    rows = []
    for line in lines[start + 4 :]:
        if not line.startswith("│"):
            break
        rows.append(dict(zip(header, [c.strip() for c in line.split("│")[1:-1]])))
    return rows


def _seed_mean(finals: list[dict], key: str) -> str:
    values = [f[key] for f in finals]
    return f"{statistics.fmean(values):.2f} ± {statistics.pstdev(values):.2f}"


def test_report_of_a_benchmarks_seeds_is_the_seed_mean_of_its_results(
    bench: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs_dir, results = bench
    out = tmp_path / "report"
    assert report_main([str(runs_dir / "label-PromptFL-s*"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    text = (out / "report.md").read_text()
    finals = [r["final"] for r in results["runs"] if r["setting"] == "label" and r["method"] == "PromptFL"]
    assert len(finals) == SEEDS

    [group] = _markdown_table(text, "Final round, mean ± std over seeds")
    [printed_group] = _printed_table(printed, "Final round, mean ± std over seeds")
    assert group["runs"] == printed_group["runs"] == "3" and group["seeds"] == "0, 1, 2"
    for key, column in COLUMNS.items():
        assert group[column] == printed_group[column] == _seed_mean(finals, key), column

    per_run = _markdown_table(text, "Final round per run")
    assert [r["run"] for r in per_run] == [f"label-PromptFL-s{s}" for s in range(SEEDS)]
    for row, final in zip(per_run, finals):
        assert row["HM"] == f"{final['hm']:.2f}" and row["Local"] == f"{final['local_acc_mean']:.2f}"
    # runs that differ only by seed: no option column, the shared options listed once
    assert [k for k in per_run[0] if "." in k] == []
    assert "- `model.n_ctx`: 8" in text and "- `trainer.rounds`: 2" in text
    assert text.count("`model.n_ctx`") == 1


def test_benchmark_runs_record_their_seed_and_options(bench: tuple[Path, dict]) -> None:
    runs_dir, _ = bench
    for seed in range(SEEDS):
        summary = json.loads((runs_dir / f"label-PromptFL-s{seed}" / "summary.json").read_text())
        assert {"name", "method", "rounds", "final", "best", "last5"} <= set(summary)  # as before
        assert summary["seed"] == summary["trainer"]["seed"] == seed
        assert summary["hparams"]["n_ctx"] == MINI.n_ctx and summary["hparams"]["lr"] == MINI.lr
        assert summary["trainer"]["rounds"] == 2 and summary["trainer"]["clients_per_round"] == 2
        assert summary["data"]["partition"]["seed"] == seed
        assert summary["data"]["dataset"]["num_colors"] == MINI.num_colors


def test_report_writes_plots_html_and_json(bench: tuple[Path, dict], tmp_path: Path) -> None:
    runs_dir, _ = bench
    result = run_report([str(runs_dir / "label-*")], out=str(tmp_path / "r"), quiet=True)
    for name in ("accuracy.png", "clients.png"):
        assert (tmp_path / "r" / name).read_bytes()[:4] == b"\x89PNG"
        assert (tmp_path / "r" / name).stat().st_size > 5000
        assert f"![{name[:-4]}]({name})" in (tmp_path / "r" / "report.md").read_text()
    html = (tmp_path / "r" / "report.html").read_text()
    assert (
        html.count("<table>") == 4
        and '<img src="accuracy.png"' in html
        and "<code>model.n_ctx</code>" in html
    )
    assert json.loads((tmp_path / "r" / "report.json").read_text())["groups"] == result["groups"]
    assert [g["label"] for g in result["groups"]] == ["label-PromptFL"]


def _fake_run(
    root: Path, name: str, seed: int, final: dict[str, float], *, lr: float = 0.01, recorded: bool = True
) -> Path:
    """A finished run folder with two evaluated rounds (its options in summary.json, or none)."""
    run = root / name
    run.mkdir(parents=True)
    rounds = [
        {"round": 1, "local_acc_mean": final["local_acc_mean"] - 10, "local_acc_clients": [50.0, 60.0]},
        {
            "round": 2,
            **final,
            "local_acc_clients": [final["local_acc_mean"] - 5, final["local_acc_mean"] + 5],
        },
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    summary: dict = {"name": name, "method": "flora.methods.coop.PromptFL", "rounds": 2}
    summary.update(final={"round": 2, **final}, best={"round": 2, **final})
    if recorded:
        summary.update(
            seed=seed,
            hparams={"n_ctx": 8, "lr": lr, "clip_model": "flora-tiny"},
            trainer={"rounds": 2, "seed": seed, "name": name, "output_dir": str(root)},
            data={"root": str(root / f"data-s{seed}"), "partition": {"class": "Dirichlet", "seed": seed}},
        )
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_options_that_differ_are_columns_and_seeds_are_grouped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    local = {(0.01, 0): 60.0, (0.01, 1): 70.0, (0.1, 0): 80.0, (0.1, 1): 84.0}
    for (lr, seed), acc in local.items():
        _fake_run(tmp_path / "runs", f"lr{lr}-s{seed}", seed, {"local_acc_mean": acc, "hm": acc / 2}, lr=lr)
    result = run_report([str(tmp_path / "runs" / "*")], out=str(tmp_path / "r"))
    text = (tmp_path / "r" / "report.md").read_text()
    per_run = _markdown_table(text, "Final round per run")
    # the learning rate differs: a column; n_ctx, rounds, the partition do not; the run's name and
    # folders are not options, and the seed has its own column
    assert [k for k in per_run[0] if k not in ("run", "round", "Local", "HM")] == ["model.lr", "seed"]
    assert [(r["model.lr"], r["seed"]) for r in per_run] == [
        ("0.01", "0"),
        ("0.01", "1"),
        ("0.1", "0"),
        ("0.1", "1"),
    ]
    for shared in (
        "`model.n_ctx`: 8",
        "`trainer.rounds`: 2",
        "`data.partition.class`: Dirichlet",
        "`method`: PromptFL",
    ):
        assert f"- {shared}" in text
    assert "trainer.name" not in text and "data.root" not in text
    groups = _markdown_table(text, "Final round, mean ± std over seeds")
    assert [(g["group"], g["model.lr"], g["seeds"], g["Local"]) for g in groups] == [
        ("lr=0.01", "0.01", "0, 1", "65.00 ± 5.00"),
        ("lr=0.1", "0.1", "0, 1", "82.00 ± 2.00"),
    ]
    assert [g["label"] for g in result["groups"]] == ["lr=0.01", "lr=0.1"]
    printed = _printed_table(capsys.readouterr().out, "Final round, mean ± std over seeds")
    assert [(r["group"], r["HM"]) for r in printed] == [
        ("lr=0.01", "32.50 ± 2.50"),
        ("lr=0.1", "41.00 ± 1.00"),
    ]


def test_runs_without_recorded_options_are_reported_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # an older benchmark folder (no options anywhere) and two `flora fit` folders with config.yaml
    _fake_run(tmp_path, "label-PromptFL-s4", 0, {"local_acc_mean": 50.0}, recorded=False)
    for epochs in (1, 2):
        run = _fake_run(tmp_path, f"fit{epochs}", 0, {"local_acc_mean": 60.0 + epochs}, recorded=False)
        config = {
            "seed_everything": False,
            "trainer": {"rounds": 2, "local_epochs": epochs, "seed": 7, "name": f"fit{epochs}"},
            "model": {"class_path": "flora.methods.PromptFL", "init_args": {"n_ctx": 4, "lr": 0.01}},
            "data": {"partition": {"class_path": "flora.data.Dirichlet", "init_args": {"alpha": 0.5}}},
        }
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    paths = [str(tmp_path / n) for n in ("label-PromptFL-s4", "fit1", "fit2")]
    result = run_report(paths, out=str(tmp_path / "r"))
    text = (tmp_path / "r" / "report.md").read_text()
    per_run = {r["run"]: r for r in _markdown_table(text, "Final round per run")}
    assert per_run["fit1"]["trainer.local_epochs"] == "1" and per_run["fit2"]["trainer.local_epochs"] == "2"
    assert per_run["label-PromptFL-s4"]["trainer.local_epochs"] == "?"
    assert [per_run[n]["seed"] for n in ("label-PromptFL-s4", "fit1", "fit2")] == ["4", "7", "7"]
    assert "- `model.n_ctx`: 4" in text and "- `data.partition.class`: Dirichlet" in text
    assert "Options of the 2 runs that record them" in text
    notes = result["notes"]
    assert notes["seed taken from the folder name"] == ["label-PromptFL-s4"]
    assert notes["options read from config.yaml (summary.json records none)"] == ["fit1", "fit2"]
    assert any(n.startswith("no options recorded") for n in notes)
    printed = capsys.readouterr().out
    assert "note: no options recorded" in printed and "1 run(s) (label-PromptFL-s4)" in printed


def _error(argv: list[str]) -> str:
    with pytest.raises(FloraConfigError) as err:
        report_main(argv)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_bad_inputs_get_one_line_errors(tmp_path: Path) -> None:
    out = ["--out", str(tmp_path / "r")]
    assert "matches no folder" in _error([str(tmp_path / "nothing-*"), *out])
    assert "does not exist" in _error([str(tmp_path / "missing"), *out])
    (tmp_path / "empty").mkdir()
    message = _error([str(tmp_path / "empty"), *out])
    assert f"{tmp_path / 'empty'} is not a run folder" in message and "empty/*" in message
    assert "matches no run folder" in _error([str(tmp_path / "emp*"), *out])
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "metrics.jsonl").write_text('{"round": 1}\n')
    assert "is not a finished run: it has no summary.json" in _error([str(unfinished), *out])
    corrupt = _fake_run(tmp_path, "corrupt", 0, {"local_acc_mean": 1.0})
    (corrupt / "summary.json").write_text('{"name": "corrupt", "final": {')
    message = _error([str(corrupt), *out])
    assert message.startswith(f"{corrupt / 'summary.json'} is not valid json")
    (corrupt / "summary.json").write_text("[1, 2]")
    assert "is not a flora run summary" in _error([str(corrupt), *out])
    assert not (tmp_path / "r").exists()  # nothing written


def test_an_existing_report_is_replaced_only_with_overwrite(tmp_path: Path) -> None:
    _fake_run(tmp_path / "runs", "a-s0", 0, {"local_acc_mean": 10.0})
    out = tmp_path / "r"
    assert report_main([str(tmp_path / "runs" / "a-s0"), "--out", str(out)]) == 0
    before = (out / "report.md").read_text()
    _fake_run(tmp_path / "runs", "a-s1", 1, {"local_acc_mean": 20.0})
    message = _error([str(tmp_path / "runs" / "*"), "--out", str(out)])
    assert "already holds a report" in message and "--overwrite true" in message
    assert (out / "report.md").read_text() == before
    argv = [str(tmp_path / "runs" / "*"), "--out", str(out), "--overwrite", "true", "--html", "false"]
    assert report_main(argv) == 0
    assert "15.00 ± 5.00" in (out / "report.md").read_text()
    assert not (out / "report.html").exists()  # the earlier report's html is not left behind
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
