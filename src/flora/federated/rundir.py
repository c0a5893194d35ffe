"""The run folder ``<output_dir>/<name>/`` (``<name>-<wandb run id>`` under a sweep agent): claimed and locked by the process that writes it (rank 0)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flora.errors import FloraConfigError, FloraRunError
from flora.fileio import is_temporary

# what a finished or started run leaves in its folder: a new run never replaces these silently
RUN_FILES = ("metrics.jsonl", "summary.json", "checkpoints", "csv", "client_states", "config.yaml")
LOCK_NAME = ".lock"


def agent_run_id() -> str | None:
    """The wandb run id when a wandb sweep agent started this process, else ``None``.

    An agent sets ``WANDB_SWEEP_ID`` and, for every run it starts, ``WANDB_RUN_ID``; the run
    folder is then ``<output_dir>/<name>-<run id>``, so the runs of a sweep never share a
    folder, and a run the agent restarts (same id) finds its folder again.
    """
    run_id = os.environ.get("WANDB_RUN_ID", "")
    if not os.environ.get("WANDB_SWEEP_ID") or not run_id:
        return None
    if not run_id.replace("-", "").replace("_", "").isalnum():
        raise FloraConfigError(f"WANDB_RUN_ID must be letters, digits, '-' or '_', got {run_id!r}")
    return run_id


def check_run_name(name: str) -> None:
    """Refuse a run name that is not a folder inside the output folder."""
    if not str(name).strip() or Path(str(name)).is_absolute() or ".." in Path(str(name)).parts:
        raise FloraConfigError(f"trainer.name must be a relative folder name inside output_dir, got {name!r}")


class RunLock:
    """An exclusive lock on a run folder, held by the process that writes it (rank 0)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self._fh: Any = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - platforms without flock run unlocked
            return
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise FloraRunError(
                f"run folder {self.path.parent} is in use by another flora process (pid {holder}); "
                "wait for it to finish or choose another --trainer.name"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing drops the flock
            self._fh = None


def claim_run_dir(run_dir: Path, *, resuming: bool, ckpt: Path | None, overwrite: bool) -> RunLock:
    """Create and lock ``run_dir``; refuse (or, with ``overwrite``, clear) a folder holding another run.

    A run that resumes from this folder's own checkpoint (or from none) keeps its files.
    Temporary files of a process killed mid-write are removed either way: they are never
    valid data.
    """
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(run_dir)
        lock.acquire()
    except OSError as err:
        raise FloraRunError(f"cannot write the run folder {run_dir}: {err.strerror or err}") from None
    try:
        if not os.access(run_dir, os.W_OK):
            raise FloraRunError(f"cannot write the run folder {run_dir}: permission denied")
        found = [n for n in RUN_FILES if (run_dir / n).exists()]
        same_run = resuming and (ckpt is None or ckpt.resolve().is_relative_to(run_dir.resolve()))
        if found and not same_run:
            if not overwrite:
                raise FloraRunError(
                    f"run folder {run_dir} already holds a run ({', '.join(found)}); resume it with "
                    "--ckpt_path last, choose another --trainer.name, or replace it with "
                    "--trainer.overwrite true"
                )
            for entry in run_dir.iterdir():
                if entry.name == LOCK_NAME:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        for tmp in run_dir.rglob("*.tmp*"):
            if tmp.is_file() and is_temporary(tmp):
                tmp.unlink()
    except BaseException:
        lock.release()
        raise
    return lock


@contextmanager
def run_dir_claimed(run_dir: Path, *, resuming: bool, ckpt: Path | None, overwrite: bool) -> Iterator[None]:
    """Hold ``run_dir`` (see :func:`claim_run_dir`) while the block runs.

    If the block fails before the run wrote a file, the folders it created are removed.
    """
    missing = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    created = missing[-1] if missing else None  # the topmost folder this run creates
    lock = claim_run_dir(run_dir, resuming=resuming, ckpt=ckpt, overwrite=overwrite)
    try:
        yield
    except BaseException:
        if created is not None and not any(p.is_file() and p.name != LOCK_NAME for p in created.rglob("*")):
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        lock.release()
