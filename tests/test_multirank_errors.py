"""A bad config or bad data in a 2-process run reaches the user as one line, from rank 0, first.

``--trainer.devices 2 --trainer.accelerator cpu`` runs the CLI's default ``ddp`` strategy on
gloo: Lightning re-launches the command for rank 1. Whatever fails, the user must see one
``flora: error: ...`` line as the first line on stderr after Lightning's start-up banner:
no traceback, no ``[rank1]:`` lines, and the other rank either quiet or saying in one line
that another process failed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import tiny_config

FLORA = [sys.executable, "-m", "flora"]
# one intra-op thread per rank: two ranks share this machine's cores with other work
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
TIMEOUT_S = 120


def _fit_two_ranks(cfg: Path, *extra: str) -> tuple[int, str, str]:
    """Run ``flora fit`` on 2 CPU ranks; a hang fails the test (and takes every rank down with it)."""
    cmd = [
        *FLORA,
        "fit",
        "--config",
        str(cfg),
        "--trainer.devices",
        "2",
        "--trainer.accelerator",
        "cpu",
        *extra,
    ]
    # its own process group, so a timeout also kills rank 1 (a child of rank 0)
    proc = subprocess.Popen(
        cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        # the pipes close only when every rank (they inherit them) has exited
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"`flora fit` on 2 ranks hung for {TIMEOUT_S} s\nstdout:\n{out}\nstderr:\n{err}")
    return proc.returncode, out, err


def _is_lightning_startup(line: str) -> bool:
    """Lightning's distributed start-up banner (and its blank lines)."""
    text = line.strip()
    return (
        not text
        or set(text) == {"-"}
        or text.startswith(
            ("distributed_backend=", "All distributed processes registered", "Initializing distributed:")
        )
    )


def _assert_one_error_line(rc: int, out: str, err: str, message: str) -> None:
    shown = f"\nstdout:\n{out}\nstderr:\n{err}"
    assert rc != 0, shown
    assert "Traceback" not in out + err, shown
    assert not [x for x in (out + err).splitlines() if x.lstrip().startswith("[rank")], shown
    assert err.count(message) == 1, shown
    lines = [x for x in err.splitlines() if not _is_lightning_startup(x)]
    assert lines, shown
    # rank 0 speaks first, without a rank tag
    assert lines[0].startswith("flora: error: ") and message in lines[0], shown
    # the other rank stays quiet or says, in one line, that another process failed
    others = lines[1:]
    assert len(others) <= 1 and all("another process" in x for x in others), shown


def test_corrupt_manifest_seen_on_rank0_only(tmp_path: Path, tiny_root: Path) -> None:
    root = tmp_path / "fed"
    shutil.copytree(tiny_root, root)
    manifest = root / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2])
    cfg = tiny_config(tmp_path, root, rounds=1)
    rc, out, err = _fit_two_ranks(cfg)
    _assert_one_error_line(rc, out, err, f"manifest {manifest} is not valid JSON")


def test_error_raised_on_every_rank_is_printed_once(tmp_path: Path, tiny_root: Path) -> None:
    cfg = tiny_config(tmp_path, tiny_root, rounds=1)
    rc, out, err = _fit_two_ranks(cfg, "--trainer.clients_per_round", "20")
    _assert_one_error_line(rc, out, err, "trainer.clients_per_round must be in [1, 4]")
