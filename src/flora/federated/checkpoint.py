"""The federated checkpoint: everything a resumed run needs, in one file written atomically.

A checkpoint is a ``torch.save`` of a plain dict (tensors, numbers, strings, lists), read
back with ``weights_only=True``. It holds the method, the task (class names, number of
clients) and the seed it belongs to, the global and server state, every client's state,
the history of the rounds so far, the zero-shot reference and the run's totals: all a
trainer needs to go on after its completed rounds as if it had never stopped.

The file is written with ``torch.save`` under :func:`flora.fileio.atomic_write` rather than
with ``Fabric.save`` / ``Fabric.load``: both of those end with a barrier of all ranks, while a
checkpoint is written by rank 0 alone and read inside :func:`~flora.federated.distributed.on_all_ranks`
(so that a rank that cannot read it stops every rank instead of leaving them waiting), and
``Fabric.load`` does not map the tensors to the CPU.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from flora.federated.store import to_cpu_copy
from flora.fileio import atomic_write
from flora.methods.base import FederatedPromptModule

if TYPE_CHECKING:
    from flora.federated.trainer import FederatedTrainer

CHECKPOINT_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used for this run."""


def method_path(module: FederatedPromptModule) -> str:
    """The import path of ``module``'s class, as recorded in checkpoints and summaries."""
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def resolve_checkpoint(
    ckpt_path: str | os.PathLike | None, last: Path, fresh_ok: bool = False
) -> Path | None:
    """The checkpoint file to start from; ``"last"`` is the run's own ``last``.

    With ``fresh_ok`` (``fit``), ``"last"`` without a checkpoint means a fresh start (None).
    """
    if ckpt_path is None:
        return None
    if str(ckpt_path) == "last":
        if not last.is_file():
            if fresh_ok:
                return None
            raise CheckpointError(f"checkpoint not found: {last} (the run has not finished a round yet)")
        return last
    path = Path(ckpt_path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def save_checkpoint(trainer: FederatedTrainer) -> None:
    """Write ``trainer``'s run, as it stands after its completed rounds, to its ``last.ckpt`` atomically."""
    module = trainer.module
    payload = {
        "flora_checkpoint": CHECKPOINT_FORMAT,
        "method": method_path(module),
        "class_names": list(module.class_names),
        "num_clients": trainer.dm.num_clients,
        "completed_rounds": trainer.completed_rounds,
        "global_state": trainer.global_state,
        "server_state": to_cpu_copy(module.server_state_dict()),
        "clients": trainer.store.state_dict(),
        "history": trainer.history,
        "zero_shot": trainer.zero_shot,
        "totals": trainer.totals,
        "seed": trainer.seed,
    }
    atomic_write(trainer.checkpoint_path, lambda tmp: torch.save(payload, tmp))


def restore_checkpoint(trainer: FederatedTrainer, path: Path) -> None:
    """Continue ``trainer``'s run from the checkpoint at ``path``.

    Refuses a checkpoint of another method, task or seed, or one whose global state does
    not fit the method.
    """
    module, num_clients, seed = trainer.module, trainer.dm.num_clients, trainer.seed
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(
            f"cannot read checkpoint {path}: truncated, corrupt or not a checkpoint "
            f"({type(err).__name__}: {err})"
        ) from err
    if not isinstance(ckpt, dict) or ckpt.get("flora_checkpoint") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a flora federated checkpoint (format {CHECKPOINT_FORMAT})")
    method = method_path(module)
    if ckpt["method"] != method:
        raise CheckpointError(f"checkpoint {path} was written by {ckpt['method']}, but the model is {method}")
    if ckpt["class_names"] != module.class_names or ckpt["num_clients"] != num_clients:
        raise CheckpointError(
            f"checkpoint {path} belongs to another task ({ckpt['num_clients']} clients, "
            f"{len(ckpt['class_names'])} classes); this data has {num_clients} clients, "
            f"{len(module.class_names)} classes"
        )
    if int(ckpt.get("seed", seed)) != seed:
        raise CheckpointError(
            f"checkpoint {path} was written with trainer.seed {ckpt['seed']}, but this run has "
            f"trainer.seed {seed}; a resumed run keeps its seed (client sampling and data order follow it)"
        )
    try:
        module.load_global_state(ckpt["global_state"])
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {err}") from err
    trainer.global_state = ckpt["global_state"]
    module.load_server_state_dict(ckpt["server_state"])
    # exactly the checkpoint's clients: a state written after it (by a killed run) is dropped
    trainer.store.load_state_dict(ckpt["clients"], write=trainer.fabric.local_rank == 0)
    trainer.completed_rounds = int(ckpt["completed_rounds"])
    trainer.history = list(ckpt["history"])
    trainer.zero_shot = ckpt.get("zero_shot")
    trainer.totals = dict(ckpt["totals"])
