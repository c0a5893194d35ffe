"""The `flora` command: configs, the run folder, and one clear error line for bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import tiny_config

FLORA = [sys.executable, "-m", "flora"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*FLORA, *args], env=ENV, capture_output=True, text=True, cwd=cwd, timeout=600)


def _fit_here(cfg: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """``flora fit`` in this process: for a run that a test only needs as its starting point."""
    from flora.cli import main

    monkeypatch.setenv("WANDB_MODE", "disabled")
    return main(["fit", "--config", str(cfg)])


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("flora: error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


def test_fit_writes_the_run_folder(tmp_path: Path, tiny_root: Path) -> None:
    cfg = tiny_config(tmp_path, tiny_root, rounds=2)
    proc = _run("fit", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "runs" / "t"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["class_path"] == "flora.methods.PromptFL"
    assert config["trainer"]["rounds"] == 2
    summary = json.loads((run / "summary.json").read_text())
    for part in ("final", "best"):
        assert set(summary[part]) >= {
            "round",
            "local_acc_mean",
            "local_acc_std",
            "local_acc_worst10",
            "local_acc_pooled",
            "local_f1_mean",
            "bytes_up_total",
            "bytes_down_total",
            "wall_time_s",
        }
    # 4 clients upload a 4 x 128 float32 prompt every round
    assert summary["final"]["bytes_up_total"] == 2 * 4 * 4 * 128 * 4
    assert (run / "accuracy.png").stat().st_size > 1000
    assert (run / "csv" / "metrics.csv").exists()


def test_validate_from_checkpoint(tmp_path: Path, tiny_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config(tmp_path, tiny_root, rounds=1)
    assert _fit_here(cfg, monkeypatch) == 0
    proc = _run("validate", "--config", str(cfg), "--ckpt_path", "last")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "runs" / "t" / "validate.json").read_text())
    summary = json.loads((tmp_path / "runs" / "t" / "summary.json").read_text())
    assert result["local_acc_mean"] == summary["final"]["local_acc_mean"]


SYNTHETIC = REPO / "configs" / "synthetic"
# configs/synthetic/<file>.yaml -> the method it selects (composed with configs/synthetic/base.yaml)
SYNTHETIC_METHODS = {
    "cmfl": "flora.methods.CMFL",
    "fedotp": "flora.methods.FedOTP",
    "fedpgp": "flora.methods.FedPGP",
    "flora": "flora.methods.FLORA",
    "pfedmoap": "flora.methods.PFedMoAP",
    "pfedprompt": "flora.methods.PFedPrompt",
    "promptamp": "flora.methods.PromptAMP",
    "promptfl": "flora.methods.PromptFL",
    "promptfl_ft": "flora.methods.PromptFLFT",
    "promptper": "flora.methods.PromptPer",
    "promptprox": "flora.methods.PromptProx",
}
# what configs/synthetic/base.yaml gives every method (the base-to-novel protocol)
SYNTHETIC_DATA = {
    "root": "data/synthetic-base-novel",
    "dataset": {
        "class_path": "flora.data.SyntheticShapes",
        "init_args": {
            "num_colors": 6,
            "num_shapes": 6,
            "train_per_class": 40,
            "test_per_class": 20,
            "image_size": 32,
            "seed": 0,
        },
    },
    "partition": {
        "class_path": "flora.data.Dirichlet",
        "init_args": {"num_clients": 10, "alpha": 0.1, "min_size": 10, "seed": 0},
    },
    "base_novel": True,
    "batch_size": 32,
    "feature_cache": "memory",
}
SYNTHETIC_TRAINER = {"rounds": 10, "local_epochs": 1, "seed": 0, "eval_every": 1, "zero_shot_reference": True}


def _shipped_runs() -> list[list[Path]]:
    """Every config set that a shipped run uses: the single files, and base.yaml + each synthetic method.

    Sweep files (configs/sweeps/) are wandb's, not flora's: tests/test_sweeps.py checks them.
    """
    sweeps = REPO / "configs" / "sweeps"
    singles = [[p] for p in sorted((REPO / "configs").rglob("*.yaml")) if p.parent not in (SYNTHETIC, sweeps)]
    composed = [[SYNTHETIC / "base.yaml", SYNTHETIC / f"{name}.yaml"] for name in sorted(SYNTHETIC_METHODS)]
    return singles + composed


def _config_args(files: list[Path]) -> list[str]:
    return [arg for f in files for arg in ("--config", str(f))]


def _print_config(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    from flora.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def _assert_contains(resolved: object, expected: object, where: str) -> None:
    """Every value of ``expected`` is in ``resolved`` (which also holds the defaults)."""
    if isinstance(expected, dict):
        assert isinstance(resolved, dict), where
        for key, value in expected.items():
            assert key in resolved, f"{where}.{key}"
            _assert_contains(resolved[key], value, f"{where}.{key}")
    else:
        assert resolved == expected, f"{where}: {resolved!r} != {expected!r}"


@pytest.mark.parametrize(
    "files", _shipped_runs(), ids=lambda fs: "+".join(f"{f.parent.name}/{f.stem}" for f in fs)
)
def test_print_config_of_shipped_configs(files: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    printed = _print_config(capsys, *_config_args(files))
    assert printed["model"]["class_path"].startswith("flora.methods."), files
    assert printed["data"]["partition"]["class_path"].startswith("flora.data."), files
    assert printed["trainer"]["name"] not in (None, "", "default"), files


def test_synthetic_folder_is_base_plus_one_model_file_per_method() -> None:
    assert {p.stem for p in SYNTHETIC.glob("*.yaml")} == {"base", *SYNTHETIC_METHODS}
    base = yaml.safe_load((SYNTHETIC / "base.yaml").read_text())
    assert set(base) == {"data", "trainer"}
    assert "name" not in base["trainer"]  # each method names its own run folder
    names = []
    for name in SYNTHETIC_METHODS:
        cfg = yaml.safe_load((SYNTHETIC / f"{name}.yaml").read_text())
        assert set(cfg) == {"model", "trainer"}, name  # no data: that comes from base.yaml
        # CMFL's file also samples fewer clients (it generates images on every client turn)
        assert set(cfg["trainer"]) == {"name"} | ({"clients_per_round"} if name == "cmfl" else set()), name
        names.append(cfg["trainer"]["name"])
    assert len(set(names)) == len(names), names


@pytest.mark.parametrize("name", sorted(SYNTHETIC_METHODS))
def test_synthetic_method_composed_with_base(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    method = yaml.safe_load((SYNTHETIC / f"{name}.yaml").read_text())
    printed = _print_config(capsys, *_config_args([SYNTHETIC / "base.yaml", SYNTHETIC / f"{name}.yaml"]))
    assert printed["model"]["class_path"] == SYNTHETIC_METHODS[name]
    _assert_contains(printed["model"], method["model"], "model")
    _assert_contains(printed["data"], SYNTHETIC_DATA, "data")
    _assert_contains(printed["trainer"], {**SYNTHETIC_TRAINER, **method["trainer"]}, "trainer")
    # the order of the two files does not matter: they set disjoint keys
    swapped = _print_config(capsys, *_config_args([SYNTHETIC / f"{name}.yaml", SYNTHETIC / "base.yaml"]))
    assert swapped == printed


def test_command_line_overrides_a_composed_config(capsys: pytest.CaptureFixture[str]) -> None:
    printed = _print_config(
        capsys,
        *_config_args([SYNTHETIC / "base.yaml", SYNTHETIC / "flora.yaml"]),
        "--data.partition.init_args.alpha",
        "0.5",
        "--model.init_args.mu",
        "5",
    )
    assert printed["data"]["partition"]["init_args"]["alpha"] == 0.5
    assert printed["model"]["init_args"]["mu"] == 5.0
    assert printed["model"]["init_args"]["rank"] == 2  # the rest of the method file stays
    assert printed["data"]["partition"]["init_args"]["num_clients"] == 10


def test_error_method_file_without_data(capsys: pytest.CaptureFixture[str]) -> None:
    from flora.cli import main

    assert main(["fit", "--config", str(SYNTHETIC / "flora.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flora: error: no `data` section") and "configs/synthetic/base.yaml" in err


def test_composed_synthetic_config_runs(tmp_path: Path) -> None:
    proc = _run(
        "fit",
        *_config_args([SYNTHETIC / "base.yaml", SYNTHETIC / "promptfl.yaml"]),
        "--trainer.rounds",
        "1",
        "--trainer.output_dir",
        str(tmp_path / "runs"),
        "--trainer.progress",
        "false",
        "--data.root",
        str(tmp_path / "data"),
        # a small world so that the run takes seconds
        "--data.dataset.init_args.num_colors",
        "3",
        "--data.dataset.init_args.num_shapes",
        "3",
        "--data.dataset.init_args.train_per_class",
        "12",
        "--data.dataset.init_args.test_per_class",
        "6",
        "--data.partition.init_args.num_clients",
        "4",
        "--data.partition.init_args.alpha",
        "0.5",
        "--data.partition.init_args.min_size",
        "3",
    )
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "runs" / "synthetic-promptfl"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["class_path"] == "flora.methods.PromptFL"
    assert config["model"]["init_args"]["n_ctx"] == 4
    assert config["data"]["base_novel"] is True
    assert config["data"]["partition"]["init_args"]["num_clients"] == 4
    assert config["trainer"]["rounds"] == 1 and config["trainer"]["zero_shot_reference"] is True
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final"]["round"] == 1
    assert {"local_acc_mean", "base_acc_mean", "novel_acc_mean", "hm"} <= set(summary["final"])


def test_prepare_writes_manifest(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, tmp_path / "prepared")
    proc = _run("prepare", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    assert manifest["num_clients"] == 4 and len(manifest["class_names"]) == 9
    assert "4 clients" in proc.stdout


def test_error_unknown_method(tmp_path: Path, tiny_root: Path) -> None:
    cfg = tiny_config(tmp_path, tiny_root, method="flora.methods.NoSuchMethod")
    line = _one_error_line(_run("fit", "--config", str(cfg)))
    assert "unknown method class 'flora.methods.NoSuchMethod'" in line and "PromptFL" in line


def test_error_missing_manifest(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, tmp_path / "nowhere")
    line = _one_error_line(_run("fit", "--config", str(cfg), "--data.prepare", "false"))
    assert "manifest not found" in line and "nowhere" in line


def test_error_corrupt_shard(tmp_path: Path, tiny_root: Path) -> None:
    root = tmp_path / "fed"
    shutil.copytree(tiny_root, root)
    shard = sorted((root / "train").glob("client-00001-*.tar"))[0]
    data = bytearray(shard.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    shard.write_bytes(bytes(data))
    line = _one_error_line(_run("fit", "--config", str(tiny_config(tmp_path, root))))
    assert shard.name in line and "corrupt" in line


def test_error_impossible_dirichlet(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, tmp_path / "d")
    line = _one_error_line(
        _run("prepare", "--config", str(cfg), "--data.partition.init_args.min_size", "500")
    )
    assert "min_size" in line
    assert not (tmp_path / "d" / "manifest.json").exists()


def test_error_checkpoint_from_other_method(
    tmp_path: Path, tiny_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(tmp_path, tiny_root, rounds=1)
    assert _fit_here(cfg, monkeypatch) == 0
    ckpt = tmp_path / "runs" / "t" / "checkpoints" / "last.ckpt"
    other = tiny_config(tmp_path / "o", tiny_root, method="flora.methods.LocalCoOp", rounds=1)
    line = _one_error_line(_run("fit", "--config", str(other), "--ckpt_path", str(ckpt)))
    assert "flora.methods.promptfl.PromptFL" in line and "LocalCoOp" in line
    # the original run folder is untouched
    assert json.loads((tmp_path / "runs" / "t" / "summary.json").read_text())["final"]["round"] == 1


def test_flora_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    from flora.cli import COMMANDS, main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert listed == list(COMMANDS)
    # every listed command is dispatched: its own --help exits 0
    for name in COMMANDS:
        with pytest.raises(SystemExit) as stop:
            main([name, "--help"])
        assert stop.value.code == 0, name
    capsys.readouterr()
    assert main([]) == 2 and "commands:" in capsys.readouterr().out


def test_progress_bar_counts_turns_on_a_terminal_and_stays_quiet_otherwise(tmp_path: Path) -> None:
    import io

    from rich.console import Console

    from flora.reporting import RunReporter

    terminal = RunReporter(tmp_path, progress=True)
    terminal.console = Console(file=io.StringIO(), force_terminal=True)
    terminal.round_start(3, turns=4)
    for cid in (5, 1, 7):
        terminal.client_done(cid)
    (task,) = terminal._bar.tasks
    assert (task.description, task.completed, task.total) == ("round 3: client turns", 3, 4)
    terminal.activity("evaluating clients", 2)  # a new activity replaces the round's bar
    assert terminal._bar.tasks[0].total == 2
    terminal.done()
    assert terminal._bar is None
    for reporter in (RunReporter(tmp_path, progress=False), RunReporter(tmp_path, progress=True)):
        reporter.console = Console(file=io.StringIO(), force_terminal=reporter.progress is False)
        reporter.round_start(1, turns=4)  # progress off, or not a terminal: no bar
        assert reporter._bar is None
