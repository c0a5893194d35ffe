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


def test_validate_from_checkpoint(tmp_path: Path, tiny_root: Path) -> None:
    cfg = tiny_config(tmp_path, tiny_root, rounds=1)
    assert _run("fit", "--config", str(cfg)).returncode == 0
    proc = _run("validate", "--config", str(cfg), "--ckpt_path", "last")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "runs" / "t" / "validate.json").read_text())
    summary = json.loads((tmp_path / "runs" / "t" / "summary.json").read_text())
    assert result["local_acc_mean"] == summary["final"]["local_acc_mean"]


@pytest.mark.parametrize("cfg", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.stem)
def test_print_config_of_shipped_configs(cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flora.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(cfg), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("flora.methods."), cfg
    assert printed["data"]["partition"]["class_path"].startswith("flora.data."), cfg
    assert printed["trainer"]["name"], cfg


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


def test_error_checkpoint_from_other_method(tmp_path: Path, tiny_root: Path) -> None:
    cfg = tiny_config(tmp_path, tiny_root, rounds=1)
    assert _run("fit", "--config", str(cfg)).returncode == 0
    ckpt = tmp_path / "runs" / "t" / "checkpoints" / "last.ckpt"
    other = tiny_config(tmp_path / "o", tiny_root, method="flora.methods.LocalCoOp", rounds=1)
    line = _one_error_line(_run("fit", "--config", str(other), "--ckpt_path", str(ckpt)))
    assert "flora.methods.promptfl.PromptFL" in line and "LocalCoOp" in line
    # the original run folder is untouched
    assert json.loads((tmp_path / "runs" / "t" / "summary.json").read_text())["final"]["round"] == 1
