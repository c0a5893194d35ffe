"""The Fabric a run uses and the work spread over its ranks.

Clients are dealt over the ranks round-robin (:func:`rank_share`); what each rank computed
is put back together with :func:`gather`. Work that may fail on some ranks only runs under
:func:`on_all_ranks` or :func:`on_rank_zero_for_all`, so that a failure stops every rank
instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from lightning.fabric import Fabric

from flora.errors import FloraConfigError, FloraRunError, check_range

if TYPE_CHECKING:
    from flora.data.datamodule import FederatedDataModule
    from flora.federated.trainer import FederatedTrainer
    from flora.methods.base import FederatedPromptModule

SUPPORTED_PRECISION = ("32-true", "32", "bf16-mixed", "16-mixed")


def check_fabric_options(*, num_nodes: int, devices: int | str, precision: str) -> None:
    """Refuse a number of nodes or devices, or a precision, that Fabric cannot run."""
    check_range("trainer.num_nodes", num_nodes, low=1)
    if isinstance(devices, int) and not isinstance(devices, bool):
        check_range("trainer.devices", devices, low=-1)
        if devices == 0:
            raise FloraConfigError("trainer.devices must be >= 1 (or -1 / 'auto' for all), got 0")
    if str(precision) not in SUPPORTED_PRECISION:
        raise FloraConfigError(
            f"trainer.precision must be one of {', '.join(SUPPORTED_PRECISION)}, got {precision!r}"
        )


def check_precision(precision: str, accelerator: str) -> None:
    """Refuse a precision that would not run as asked (before Fabric would silently change it)."""
    gpu = torch.cuda.is_available() or (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    )
    if precision == "16-mixed" and (accelerator == "cpu" or (accelerator == "auto" and not gpu)):
        raise FloraConfigError(
            "trainer.precision 16-mixed needs a GPU (on cpu it would run as bf16-mixed); "
            "use bf16-mixed or 32-true"
        )


def make_fabric(trainer: FederatedTrainer) -> Fabric:
    """The Fabric of a run with ``trainer``'s options; ``strategy="auto"`` is ``ddp`` on more than one device."""
    check_precision(trainer.precision, str(trainer.accelerator))
    strategy, devices = trainer.strategy, trainer.devices
    n_dev = devices if isinstance(devices, int) else None
    if strategy == "auto" and (n_dev is None or n_dev > 1 or trainer.num_nodes > 1):
        strategy = "ddp"
    loggers = []
    if "csv" in trainer.loggers:
        from lightning.fabric.loggers import CSVLogger

        loggers.append(CSVLogger(root_dir=str(trainer.run_dir), name="csv", version=""))
    if "wandb" in trainer.loggers:
        from lightning.pytorch.loggers import WandbLogger

        # under a sweep agent wandb.init picks the run id up from WANDB_RUN_ID; the sweep groups the runs
        group = os.environ.get("WANDB_SWEEP_ID") or None
        loggers.append(
            WandbLogger(
                project=trainer.wandb_project,
                name=trainer.run_dir.name,
                save_dir=str(trainer.run_dir),
                group=group,
            )
        )
    return Fabric(
        accelerator=trainer.accelerator,
        devices=devices,
        strategy=strategy,
        num_nodes=trainer.num_nodes,
        precision=trainer.precision,  # type: ignore[arg-type]
        loggers=loggers,
    )


def setup_rank(fabric: Fabric, module: FederatedPromptModule, dm: FederatedDataModule) -> None:
    """Set the data up (rank 0 prepares it first) and put the method, on the training task, on this rank's device.

    CPU ranks on one machine share its cores.
    """
    if fabric.device.type == "cpu" and fabric.world_size > 1:
        local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", fabric.world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_procs))
    on_rank_zero_for_all(fabric, dm.prepare_data)
    dm.setup("fit")
    module.set_task(dm.class_names)
    module.to(fabric.device)
    dm.set_transform(module.backbone.preprocess, module.backbone.image_size)


def rank_share(fabric: Fabric, client_ids: Sequence[int]) -> list[int]:
    """The clients of ``client_ids`` this rank works on (every ``world_size``-th, from its rank on)."""
    return list(client_ids[fabric.global_rank :: fabric.world_size])


def gather(fabric: Fabric, items: list[Any]) -> list[Any]:
    """Every rank's ``items``, concatenated in rank order (the same list on every rank)."""
    if fabric.world_size == 1:
        return items
    out: list[list[Any]] = [[] for _ in range(fabric.world_size)]
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def on_all_ranks(fabric: Fabric, fn: Callable[[], Any]) -> None:
    """Run ``fn`` on every rank; if it fails anywhere, every rank stops (the failing one reports)."""
    error: BaseException | None = None
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - re-raised below
        error = err
    if fabric.world_size == 1:
        if error is not None:
            raise error
        return
    failed: list[Any] = [None] * fabric.world_size
    dist.all_gather_object(failed, error is not None)
    if not any(failed):
        return
    first = failed.index(True)
    if error is None:
        error = FloraRunError(f"rank {first} failed (its error is printed above)")
    if fabric.global_rank != first:
        error.flora_raised_on_all_ranks = True  # type: ignore[attr-defined]
    raise error


def on_rank_zero_for_all(fabric: Fabric, fn: Callable[[], Any]) -> None:
    """Run ``fn`` on rank 0; if it fails, every rank raises that error (no rank left waiting)."""
    error: BaseException | None = None
    if fabric.is_global_zero:
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            error = err
    if fabric.world_size > 1:
        box = [error]
        try:
            dist.broadcast_object_list(box, src=0)
        except Exception:  # noqa: BLE001 - an error that cannot be pickled is sent as its message
            box = [FloraRunError(f"{type(error).__name__}: {error}")] if error is not None else [None]
            dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        if not fabric.is_global_zero:
            error.flora_raised_on_all_ranks = True  # type: ignore[attr-defined]
        raise error
