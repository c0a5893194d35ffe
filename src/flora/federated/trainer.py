"""FederatedTrainer: the federated loop on Lightning Fabric.

One round reads top to bottom in :meth:`FederatedTrainer._run_round`:

1. the round's clients come from a seeded sampling stream fixed in advance;
2. they are dealt over the Fabric ranks; each rank trains its clients one after the
   other on the single client module (global state + that client's local state loaded
   in, a per-client optimiser, local epochs);
3. uploads (copies) are gathered from all ranks and aggregated by the method in
   client-id order, so results do not depend on the number of devices;
4. every ``eval_every`` rounds all clients are evaluated (sharded over ranks);
5. rank 0 logs and writes an atomic checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric import Fabric

from flora.data.datamodule import FederatedDataModule
from flora.errors import FloraConfigError, FloraRunError, check_choice, check_range
from flora.federated.metrics import ClientEval, evaluate_predictions, summarise
from flora.federated.sampling import ClientSampler, derive_seed
from flora.federated.store import ClientState, ClientStore, make_store, to_cpu_copy
from flora.methods.base import FederatedPromptModule, StateDict
from flora.reporting import RunReporter

CHECKPOINT_FORMAT = 1
_SUPPORTED_PRECISION = ("32-true", "32", "bf16-mixed", "16-mixed")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used for this run."""


# what a finished or started run leaves in its folder: a new run never replaces these silently
_RUN_FILES = ("metrics.jsonl", "summary.json", "checkpoints", "csv", "client_states", "config.yaml")
_LOCK_NAME = ".lock"


def _warn(text: str) -> None:
    print(f"flora: warning: {text}", file=sys.stderr, flush=True)


class _RunLock:
    """An exclusive lock on a run folder, held by the process that writes it (rank 0)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / _LOCK_NAME
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


@dataclass
class ClientResult:
    client_id: int
    num_samples: int
    upload: StateDict
    state: ClientState
    loss: float
    steps: int
    seconds: float
    samples_seen: int = 0
    phases: dict[str, float] = field(default_factory=dict)


class _DeviceBatches:
    """An iterable over a loader's batches moved to the Fabric device; iterates the loader only on demand."""

    def __init__(self, loader: Any, fabric: Fabric) -> None:
        self.loader, self.fabric = loader, fabric

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            yield self.fabric.to_device(batch)


def _state_bytes(state: StateDict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def _method_path(module: FederatedPromptModule) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


class FederatedTrainer:
    """Runs a federated prompt-learning experiment.

    Args:
        rounds: communication rounds.
        local_epochs: epochs over its training data per sampled client per round.
        client_fraction: fraction of clients sampled per round (ignored when
            ``clients_per_round`` is set).
        clients_per_round: exact number of clients per round.
        seed: seeds client sampling, initialisation and every client's data order.
        accelerator, devices, strategy, num_nodes: as in Lightning Fabric. Clients are
            sharded over devices; ``strategy`` defaults to ``ddp`` when ``devices > 1``.
        precision: ``32-true``, ``bf16-mixed`` or ``16-mixed`` (GPU).
        eval_every: evaluate every N rounds (the last round is always evaluated).
        eval_before_training: also evaluate the initial model (round 0).
        optimizer_state: ``persist`` (each client keeps its own optimiser state
            across its turns) or ``reset`` (a fresh optimiser every turn). Never shared.
        state_store: ``memory`` or ``disk`` (under the run folder) for client states.
        max_steps_per_round: cap on optimiser steps per client per round (None: no cap).
            Training only: evaluation fine-tuning (``eval_finetune_epochs`` of a method)
            always runs its full epochs.
        output_dir, name: the run writes ``<output_dir>/<name>/``.
        loggers: ``csv`` and/or ``wandb`` (wandb honours ``WANDB_MODE``, e.g. offline).
        wandb_project: project name of the wandb run.
        progress: show progress output.
        checkpoint_every: write a checkpoint every N rounds (always after the last).
        overwrite: replace the results of an earlier run with the same ``name``. Without it
            ``fit`` refuses to start in a folder that already holds a run (resume it with
            ``ckpt_path="last"`` instead, or choose another ``name``).
        zero_shot_reference: before training, evaluate zero-shot CLIP (the anchor
            template, no learned parts) with the same protocol; stored as ``zero_shot``
            in ``summary.json`` for comparison.
        profile: split each round's training time into image tower, text tower and
            optimiser (backward + step) in ``metrics.jsonl`` (synchronises CUDA).
    """

    def __init__(
        self,
        rounds: int = 10,
        local_epochs: int = 1,
        client_fraction: float = 1.0,
        clients_per_round: int | None = None,
        seed: int = 0,
        accelerator: str = "auto",
        devices: int | str = 1,
        strategy: str = "auto",
        num_nodes: int = 1,
        precision: str = "32-true",
        eval_every: int = 1,
        eval_before_training: bool = False,
        optimizer_state: str = "persist",
        state_store: str = "memory",
        max_steps_per_round: int | None = None,
        output_dir: str = "runs",
        name: str = "default",
        loggers: Sequence[str] = ("csv",),
        wandb_project: str = "flora",
        progress: bool = True,
        checkpoint_every: int = 1,
        zero_shot_reference: bool = False,
        profile: bool = False,
        overwrite: bool = False,
    ) -> None:
        check_range("trainer.rounds", rounds, low=0)
        check_range("trainer.local_epochs", local_epochs, low=1)
        check_range("trainer.client_fraction", client_fraction, low=0, low_open=True, high=1)
        check_range("trainer.clients_per_round", clients_per_round, low=1, allow_none=True)
        check_range("trainer.eval_every", eval_every, low=1)
        check_range("trainer.checkpoint_every", checkpoint_every, low=1)
        check_range("trainer.max_steps_per_round", max_steps_per_round, low=1, allow_none=True)
        check_range("trainer.num_nodes", num_nodes, low=1)
        if isinstance(devices, int) and not isinstance(devices, bool):
            check_range("trainer.devices", devices, low=-1)
            if devices == 0:
                raise FloraConfigError("trainer.devices must be >= 1 (or -1 / 'auto' for all), got 0")
        if str(precision) not in _SUPPORTED_PRECISION:
            raise FloraConfigError(
                f"trainer.precision must be one of {', '.join(_SUPPORTED_PRECISION)}, got {precision!r}"
            )
        check_choice("trainer.optimizer_state", optimizer_state, ("persist", "reset"))
        check_choice("trainer.state_store", state_store, ("memory", "disk"))
        unknown = set(loggers) - {"csv", "wandb"}
        if unknown:
            raise FloraConfigError(
                f"trainer.loggers: unknown logger(s) {sorted(unknown)}; use csv and/or wandb"
            )
        if not str(name).strip() or Path(str(name)).is_absolute() or ".." in Path(str(name)).parts:
            raise FloraConfigError(
                f"trainer.name must be a relative folder name inside output_dir, got {name!r}"
            )
        self.rounds = rounds
        self.local_epochs = local_epochs
        self.client_fraction = client_fraction
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.accelerator = accelerator
        self.devices = devices
        self.strategy = strategy
        self.num_nodes = num_nodes
        self.precision = str(precision)
        self.eval_every = eval_every
        self.eval_before_training = eval_before_training
        self.optimizer_state = optimizer_state
        self.state_store = state_store
        self.max_steps_per_round = max_steps_per_round
        self.output_dir = output_dir
        self.name = name
        self.loggers = list(loggers)
        self.wandb_project = wandb_project
        self.progress = progress
        self.checkpoint_every = checkpoint_every
        self.zero_shot_reference = zero_shot_reference
        self.profile = profile
        self.overwrite = overwrite
        self.config_text: str | None = None  # the resolved config, written into the run folder by the CLI

    # ------------------------------------------------------------------ paths
    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.ckpt"

    def _resolve_ckpt(self, ckpt_path: str | os.PathLike | None, fresh_ok: bool = False) -> Path | None:
        """The checkpoint file to start from. ``"last"`` is this run's ``last.ckpt``.

        With ``fresh_ok`` (``fit``), ``"last"`` without a checkpoint means a fresh start.
        """
        if ckpt_path is None:
            return None
        if str(ckpt_path) == "last":
            path = self.checkpoint_path
            if not path.is_file():
                if fresh_ok:
                    return None
                raise CheckpointError(f"checkpoint not found: {path} (the run has not finished a round yet)")
            return path
        path = Path(ckpt_path)
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        return path

    def _claim_run_dir(self, resuming: bool, ckpt: Path | None) -> _RunLock:
        """Create and lock the run folder; refuse (or, with ``overwrite``, clear) a folder holding another run.

        Called on rank 0 before the processes start, so every refusal comes before any file is written.
        """
        run_dir = self.run_dir
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = _RunLock(run_dir)
            lock.acquire()
        except OSError as err:
            raise FloraRunError(f"cannot write the run folder {run_dir}: {err.strerror or err}") from None
        try:
            if not os.access(run_dir, os.W_OK):
                raise FloraRunError(f"cannot write the run folder {run_dir}: permission denied")
            found = [n for n in _RUN_FILES if (run_dir / n).exists()]
            same_run = resuming and (ckpt is None or ckpt.resolve().is_relative_to(run_dir.resolve()))
            if found and not same_run:
                if not self.overwrite:
                    raise FloraRunError(
                        f"run folder {run_dir} already holds a run ({', '.join(found)}); resume it with "
                        "--ckpt_path last, choose another --trainer.name, or replace it with "
                        "--trainer.overwrite true"
                    )
                for entry in run_dir.iterdir():
                    if entry.name == _LOCK_NAME:
                        continue
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
            # temporary files of a process killed mid-write are never valid data
            for tmp in run_dir.rglob("*.tmp*"):
                if tmp.is_file() and tmp.suffix[4:].isdigit():
                    tmp.unlink()
        except BaseException:
            lock.release()
            raise
        return lock

    def _check_precision(self) -> None:
        """Refuse a precision that would not run as asked (before Fabric would silently change it)."""
        acc = str(self.accelerator)
        gpu = torch.cuda.is_available() or (
            getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
        )
        if self.precision == "16-mixed" and (acc == "cpu" or (acc == "auto" and not gpu)):
            raise FloraConfigError(
                "trainer.precision 16-mixed needs a GPU (on cpu it would run as bf16-mixed); "
                "use bf16-mixed or 32-true"
            )

    # ----------------------------------------------------------------- fabric
    def _make_fabric(self) -> Fabric:
        strategy = self.strategy
        devices = self.devices
        n_dev = devices if isinstance(devices, int) else None
        if strategy == "auto" and (n_dev is None or n_dev > 1 or self.num_nodes > 1):
            strategy = "ddp"
        loggers = []
        if "csv" in self.loggers:
            from lightning.fabric.loggers import CSVLogger

            loggers.append(CSVLogger(root_dir=str(self.run_dir), name="csv", version=""))
        if "wandb" in self.loggers:
            from lightning.pytorch.loggers import WandbLogger

            loggers.append(
                WandbLogger(project=self.wandb_project, name=self.name, save_dir=str(self.run_dir))
            )
        return Fabric(
            accelerator=self.accelerator,
            devices=devices,
            strategy=strategy,
            num_nodes=self.num_nodes,
            precision=self.precision,  # type: ignore[arg-type]
            loggers=loggers,
        )

    # ------------------------------------------------------------ public API
    def fit(
        self,
        model: FederatedPromptModule,
        datamodule: FederatedDataModule | None = None,
        ckpt_path: str | None = None,
    ) -> dict[str, Any]:
        """Train ``model`` federatedly on ``datamodule``; resume from ``ckpt_path`` (a file or ``last``)."""
        return self._launch(self._fit, model, datamodule, ckpt_path)

    def validate(
        self,
        model: FederatedPromptModule,
        datamodule: FederatedDataModule | None = None,
        ckpt_path: str | None = None,
    ) -> dict[str, Any]:
        """Evaluate every client once (from ``ckpt_path`` if given) and write ``validate.json``."""
        return self._launch(self._evaluate_only, model, datamodule, ckpt_path, "validate")

    def test(
        self,
        model: FederatedPromptModule,
        datamodule: FederatedDataModule | None = None,
        ckpt_path: str | None = None,
    ) -> dict[str, Any]:
        """Evaluate every client once on its test split (from ``ckpt_path`` if given) and write ``test.json``."""
        return self._launch(self._evaluate_only, model, datamodule, ckpt_path, "test")

    def _launch(self, fn: Callable[..., Any], model: Any, datamodule: Any, *args: Any) -> Any:
        if not isinstance(model, FederatedPromptModule):
            raise TypeError(
                f"the model must be a flora method (FederatedPromptModule), got {type(model).__name__}"
            )
        if not isinstance(datamodule, FederatedDataModule):
            raise TypeError("a FederatedDataModule is required (data: section of the config)")
        fitting = fn == self._fit
        ckpt_path, rest = (args[0] if args else None), args[1:]
        ckpt = self._resolve_ckpt(ckpt_path, fresh_ok=fitting)
        self._check_precision()
        fabric = self._make_fabric()
        lock = None
        created: Path | None = None  # the topmost folder this run creates
        if fitting and fabric.global_rank == 0:
            missing = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]
            created = missing[-1] if missing else None
            lock = self._claim_run_dir(resuming=ckpt_path is not None, ckpt=ckpt)
            if ckpt_path is not None and ckpt is None:
                _warn(f"no checkpoint at {self.checkpoint_path}: starting the run {self.name!r} from round 0")
        try:
            return fabric.launch(fn, model, datamodule, ckpt, *rest)
        except BaseException:
            # a run that fails before writing a file leaves no folder behind
            if created is not None and not any(
                p.is_file() and p.name != _LOCK_NAME for p in created.rglob("*")
            ):
                shutil.rmtree(created, ignore_errors=True)
            raise
        finally:
            if lock is not None:
                lock.release()

    # ------------------------------------------------------------------ setup
    def _setup(self, fabric: Fabric, module: FederatedPromptModule, dm: FederatedDataModule) -> None:
        self.fabric = fabric
        if fabric.device.type == "cpu" and fabric.world_size > 1:
            local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", fabric.world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_procs))
        self._on_rank_zero_for_all(fabric, dm.prepare_data)
        dm.setup("fit")
        module.set_task(dm.class_names)
        module.to(fabric.device)
        dm.set_transform(module.backbone.preprocess, module.backbone.image_size)
        self.module = module
        self.dm = dm
        self.sampler = ClientSampler(dm.num_clients, self.client_fraction, self.seed, self.clients_per_round)
        self.store: ClientStore = make_store(self.state_store, self.run_dir / "client_states")
        self.use_features = dm.uses_feature_cache and module.feature_kind in ("global", "patch")
        self.encoder_key = f"{module.backbone.fingerprint()}|{module.feature_kind}"
        gen = torch.Generator().manual_seed(derive_seed(self.seed, 1))
        module.reset_global_parameters(gen)
        self.global_state: StateDict = module.global_state()
        self.completed_rounds = 0
        self._optim_time = 0.0
        self.history: list[dict[str, Any]] = []
        self.zero_shot: dict[str, Any] | None = None
        self.totals = {"bytes_up_total": 0, "bytes_down_total": 0, "wall_time_s": 0.0}

    @staticmethod
    def _on_all_ranks(fabric: Fabric, fn: Callable[[], Any]) -> None:
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

    @staticmethod
    def _on_rank_zero_for_all(fabric: Fabric, fn: Callable[[], Any]) -> None:
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

    def _encoder(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if not self.use_features:
            return None
        module, fabric = self.module, self.fabric

        def encode(images: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), fabric.autocast():
                return module.image_features(fabric.to_device(images)).float()

        return encode

    def _loader(self, client_id: int, split: str, train: bool, seed: int = 0) -> Any:
        return self.dm.client_loader(
            client_id, split, train=train, seed=seed, encoder=self._encoder(), encoder_key=self.encoder_key
        )

    # ----------------------------------------------------------- checkpoints
    def _checkpoint_payload(self) -> dict[str, Any]:
        module = self.module
        return {
            "flora_checkpoint": CHECKPOINT_FORMAT,
            "method": _method_path(module),
            "class_names": list(module.class_names),
            "num_clients": self.dm.num_clients,
            "completed_rounds": self.completed_rounds,
            "global_state": self.global_state,
            "server_state": to_cpu_copy(module.server_state_dict()),
            "clients": self.store.state_dict(),
            "history": self.history,
            "zero_shot": self.zero_shot,
            "totals": self.totals,
            "seed": self.seed,
        }

    def _save_checkpoint(self) -> None:
        payload = self._checkpoint_payload()  # every rank holds the same replicated state
        if not self.fabric.is_global_zero:
            return
        path = self.checkpoint_path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            torch.save(payload, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _load_checkpoint(self, path: Path) -> None:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(
                f"cannot read checkpoint {path}: truncated, corrupt or not a checkpoint "
                f"({type(err).__name__}: {err})"
            ) from err
        if not isinstance(ckpt, dict) or ckpt.get("flora_checkpoint") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path} is not a flora federated checkpoint (format {CHECKPOINT_FORMAT})")
        method = _method_path(self.module)
        if ckpt["method"] != method:
            raise CheckpointError(
                f"checkpoint {path} was written by {ckpt['method']}, but the model is {method}"
            )
        if ckpt["class_names"] != self.module.class_names or ckpt["num_clients"] != self.dm.num_clients:
            raise CheckpointError(
                f"checkpoint {path} belongs to another task ({ckpt['num_clients']} clients, "
                f"{len(ckpt['class_names'])} classes); this data has {self.dm.num_clients} clients, "
                f"{len(self.module.class_names)} classes"
            )
        if int(ckpt.get("seed", self.seed)) != self.seed:
            raise CheckpointError(
                f"checkpoint {path} was written with trainer.seed {ckpt['seed']}, but this run has "
                f"trainer.seed {self.seed}; a resumed run keeps its seed (client sampling and data order follow it)"
            )
        try:
            self.module.load_global_state(ckpt["global_state"])
        except (KeyError, ValueError) as err:
            raise CheckpointError(f"checkpoint {path} does not fit this model: {err}") from err
        self.global_state = ckpt["global_state"]
        self.module.load_server_state_dict(ckpt["server_state"])
        # exactly the checkpoint's clients: a state written after it (by a killed run) is dropped
        self.store.load_state_dict(ckpt["clients"], write=self.fabric.local_rank == 0)
        self.completed_rounds = int(ckpt["completed_rounds"])
        self.history = list(ckpt["history"])
        self.zero_shot = ckpt.get("zero_shot")
        self.totals = dict(ckpt["totals"])

    # ---------------------------------------------------------------- client
    def _prepare_client(self, client_id: int, for_eval: bool = False) -> ClientState | None:
        """Load the global download (or the evaluation state) and the client's local state into the module."""
        module = self.module
        if for_eval:
            module.load_global_state(module.evaluation_state(client_id, self.global_state))
        else:
            module.load_global_state(module.download_state(client_id, self.global_state))
        state = self.store.get(client_id)
        if state is None:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, 2, client_id))
            module.reset_local_parameters(gen)
        else:
            module.load_local_state(state.local)
        return state

    def _local_training(
        self,
        client_id: int,
        epochs: int,
        seed: int,
        previous: ClientState | None,
        label: str,
        max_steps: int | None = None,
    ) -> tuple[list[float], int, int, int, Any]:
        """``epochs`` of local SGD on the client's training split, on whatever the module holds now.

        At most ``max_steps`` optimiser steps when given. Returns the losses, steps, samples
        seen, training-set size and the optimizer.
        """
        fabric, module = self.fabric, self.module
        optimizer = module.configure_optimizers()
        if isinstance(optimizer, dict):
            optimizer = optimizer["optimizer"]
        if self.optimizer_state == "persist" and previous is not None and previous.optim is not None:
            # the client's moments persist; its hyperparameters (lr, momentum, ...) are the
            # configured ones, so an override given on resume takes effect
            configured = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            optimizer.load_state_dict(to_cpu_copy(previous.optim))
            for group, hyper in zip(optimizer.param_groups, configured):
                group.update(hyper)
        optimizer = fabric.setup_optimizers(optimizer)
        torch.manual_seed(seed)
        loader = self._loader(client_id, "train", train=True, seed=seed)
        with torch.no_grad(), fabric.autocast():
            # lazy: the loader is only iterated (and its shuffling RNG only drawn) if the method reads it
            module.before_local_training(_DeviceBatches(loader, fabric))
        module.train()
        losses: list[float] = []
        steps = seen = 0
        with torch.enable_grad():
            for _epoch in range(epochs):
                for batch_idx, batch in enumerate(loader):
                    batch = fabric.to_device(batch)
                    with fabric.autocast():
                        try:
                            loss = module.training_step(batch, batch_idx)
                        except FloatingPointError as err:
                            raise FloatingPointError(f"{label}, client {client_id}: {err}") from err
                    t_opt = time.perf_counter()
                    optimizer.zero_grad(set_to_none=True)
                    fabric.backward(loss)
                    optimizer.step()
                    if self.profile:
                        if fabric.device.type == "cuda":
                            torch.cuda.synchronize()
                        self._optim_time += time.perf_counter() - t_opt
                    losses.append(float(loss.detach()))
                    steps += 1
                    seen += int(batch[1].shape[0])
                    if max_steps is not None and steps >= max_steps:
                        break
                if max_steps is not None and steps >= max_steps:
                    break
        module.eval()
        return losses, steps, seen, len(loader.dataset), optimizer

    def _train_client(self, client_id: int, round_idx: int) -> ClientResult:
        module = self.module
        start = time.perf_counter()
        previous = self._prepare_client(client_id)
        seed = derive_seed(self.seed, 3, round_idx, client_id)
        losses, steps, seen, num_samples, optimizer = self._local_training(
            client_id, self.local_epochs, seed, previous, f"round {round_idx + 1}", self.max_steps_per_round
        )
        optim_state = to_cpu_copy(optimizer.state_dict()) if self.optimizer_state == "persist" else None
        state = ClientState(
            local=module.local_state(),
            optim=optim_state,
            rounds_trained=(previous.rounds_trained if previous else 0) + 1,
        )
        return ClientResult(
            client_id=client_id,
            num_samples=num_samples,
            upload=module.global_state(),
            state=state,
            loss=sum(losses) / max(1, len(losses)),
            steps=steps,
            seconds=time.perf_counter() - start,
            samples_seen=seen,
        )

    def _eval_finetune_epochs(self) -> int:
        """Evaluation fine-tuning epochs of the method (none for the zero-shot reference)."""
        if self.module._zero_shot:
            return 0
        return int(getattr(self.module, "eval_finetune_epochs", 0) or 0)

    def _personalise_for_eval(self, client_id: int) -> None:
        """Load client ``client_id``'s evaluation model; fine-tune a throw-away copy when the method asks.

        The fine-tuned tensors live in the module only until the next client is loaded: they
        are never uploaded or stored (PromptFL+FT).
        """
        self._prepare_client(client_id, for_eval=True)
        epochs = self._eval_finetune_epochs()
        if epochs > 0:
            seed = derive_seed(self.seed, 4, self.completed_rounds, client_id)
            self._local_training(client_id, epochs, seed, None, "evaluation fine-tuning")

    @torch.no_grad()
    def _eval_client(self, client_id: int, data: int | str | None = None, prepare: bool = True) -> ClientEval:
        """Evaluate client ``client_id``'s model on its own test split or a shared set (``"base"``/``"novel"``)."""
        fabric, module = self.fabric, self.module
        if prepare:
            self._personalise_for_eval(client_id)
        module.eval()
        preds, targets = [], []
        for x, y in self._loader(client_id if data is None else data, "test", train=False):
            with fabric.autocast():
                logits = module(fabric.to_device(x))
            preds.append(logits.argmax(-1).cpu())
            targets.append(y)
        if not targets:
            raise ValueError(f"client {client_id} has no test samples to evaluate")
        return evaluate_predictions(client_id, torch.cat(preds), torch.cat(targets), module.num_classes)

    # ------------------------------------------------------------ collectives
    def _gather(self, items: list[Any]) -> list[Any]:
        if self.fabric.world_size == 1:
            return items
        out: list[list[Any]] = [[] for _ in range(self.fabric.world_size)]
        dist.all_gather_object(out, items)
        return [x for part in out for x in part]

    def _my_share(self, client_ids: list[int]) -> list[int]:
        return client_ids[self.fabric.global_rank :: self.fabric.world_size]

    # ----------------------------------------------------------------- round
    def _evaluate(self) -> tuple[dict[str, float], list[ClientEval]]:
        """The evaluation protocol: Local, Global, and under base/novel also Base, Novel and HM."""
        module = self.module
        mine = self._my_share(list(range(self.dm.num_clients)))
        has_global = module.has_global_model
        base_novel = self.dm.has_novel
        # with evaluation fine-tuning the personalised copy is made once per client (on the
        # base task, whose labels the training split uses) and reused for Novel; the global
        # part alone is always the un-tuned model
        finetunes = self._eval_finetune_epochs() > 0
        tuned: dict[int, StateDict] = {}
        local, base, glob = [], [], []
        for cid in mine:
            local.append(self._eval_client(cid))
            if finetunes:
                tuned[cid] = module.global_state()
            if base_novel:
                base.append(self._eval_client(cid, "base", prepare=False))
            if has_global:
                if finetunes:
                    self._prepare_client(cid, for_eval=True)
                with module.global_only():
                    glob.append(self._eval_client(cid, prepare=False))
        novel, novel_glob = [], []
        if base_novel:
            module.set_task(self.dm.novel_class_names)
            try:
                for cid in mine:
                    if finetunes:
                        self._prepare_client(cid, for_eval=True)
                        module.load_global_state(tuned[cid])
                        novel.append(self._eval_client(cid, "novel", prepare=False))
                        if has_global:  # the global part alone is the un-tuned model
                            self._prepare_client(cid, for_eval=True)
                    else:
                        novel.append(self._eval_client(cid, "novel"))
                    if has_global:
                        with module.global_only():
                            novel_glob.append(self._eval_client(cid, "novel", prepare=False))
            finally:
                module.set_task(self.dm.class_names)
        gathered = self._gather([local, base, glob, novel, novel_glob])
        parts = [sorted((e for g in gathered[i::5] for e in g), key=lambda e: e.client_id) for i in range(5)]
        local, base, glob, novel, novel_glob = parts
        metrics: dict[str, Any] = summarise(local, "local")
        metrics["local_acc_clients"] = [e.acc for e in local]
        if glob:
            metrics["global_acc"] = summarise(glob, "global")["global_acc_pooled"]
        if base_novel:
            metrics.update(summarise(base, "base"))
            metrics.update(summarise(novel, "novel"))
            if novel_glob:
                metrics.update(summarise(novel_glob, "novel_global"))
            accs = [metrics["local_acc_mean"], metrics["base_acc_mean"], metrics["novel_acc_mean"]]
            metrics["hm"] = 0.0 if min(accs) <= 0 else len(accs) / sum(1.0 / a for a in accs)
        return metrics, local

    def _run_round(self, round_idx: int, reporter: RunReporter) -> dict[str, Any]:
        t0 = time.perf_counter()
        sampled = self.sampler.clients(round_idx)
        mine = self._my_share(sampled)
        backbone = self.module.backbone
        backbone.profiling = self.profile
        backbone.timings = {"image": 0.0, "text": 0.0}
        self._optim_time = 0.0
        results = []
        for cid in mine:
            results.append(self._train_client(cid, round_idx))
            reporter.client_done(cid)
        profile = {
            "time_image_s": backbone.timings["image"],
            "time_text_s": backbone.timings["text"],
            "time_optim_s": self._optim_time,
        }
        backbone.profiling = False
        n_trained = sum(r.samples_seen for r in results)
        results = sorted(self._gather(results), key=lambda r: r.client_id)
        t_train = time.perf_counter() - t0

        t1 = time.perf_counter()
        for r in results:
            self._check_finite(round_idx, r)
        for r in results:
            self.store.put(r.client_id, r.state)
        uploads = [(r.client_id, r.num_samples, r.upload) for r in results]
        up = [_state_bytes(r.upload) for r in results]
        down = [_state_bytes(self.module.download_state(c, self.global_state)) for c in sampled]
        bytes_up, bytes_down = sum(up), sum(down)
        self.global_state = to_cpu_copy(self.module.aggregate(uploads, self.global_state))
        t_agg = time.perf_counter() - t1

        record: dict[str, Any] = {
            "round": round_idx + 1,
            "clients": sampled,
            "train_loss": sum(r.loss * r.num_samples for r in results)
            / max(1, sum(r.num_samples for r in results)),
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
            "bytes_up_clients": up,  # per client, in the order of "clients"
            "bytes_down_clients": down,
            "time_train_s": t_train,
            "time_aggregate_s": t_agg,
            "samples_trained_rank0": n_trained,
        }
        if self.profile:
            record.update(profile)
        is_last = round_idx + 1 == self.rounds
        if (round_idx + 1) % self.eval_every == 0 or is_last:
            t2 = time.perf_counter()
            metrics, _ = self._evaluate()
            record.update(metrics)
            record["time_eval_s"] = time.perf_counter() - t2
        record["time_round_s"] = time.perf_counter() - t0
        return record

    def _check_finite(self, round_idx: int, result: ClientResult) -> None:
        """Refuse a client's upload or state with NaN/inf before anything is aggregated or stored."""
        parts = {"upload": result.upload, "local state": result.state.local}
        for what, state in parts.items():
            for key, value in state.items():
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    kept = (
                        f"the last checkpoint ({self.checkpoint_path}, round {self.completed_rounds}) is kept"
                        if self.completed_rounds > 0 and self.checkpoint_path.is_file()
                        else "no checkpoint was written yet"
                    )
                    raise FloraRunError(
                        f"round {round_idx + 1}: client {result.client_id} produced non-finite values in its "
                        f"{what} ({key}); nothing was aggregated and {kept}. Lower the learning rate or "
                        "use 32-true precision"
                    )

    def _account(self, record: dict[str, Any]) -> None:
        self.totals["bytes_up_total"] += record.get("bytes_up", 0)
        self.totals["bytes_down_total"] += record.get("bytes_down", 0)
        self.totals["wall_time_s"] += record.get("time_round_s", 0.0)
        record.update(self.totals)
        self.history.append(record)

    def _evaluate_initial(self, reporter: RunReporter) -> None:
        """Evaluate the model before any training and record it as round 0."""
        t0 = time.perf_counter()
        metrics, _ = self._evaluate()
        record = {"round": 0, "bytes_up": 0, "bytes_down": 0, **metrics}
        record["time_eval_s"] = record["time_round_s"] = time.perf_counter() - t0
        self._account(record)
        reporter.round_done(record)

    def _fit(self, fabric: Fabric, module: FederatedPromptModule, dm: FederatedDataModule, ckpt: Path | None):
        reporter = RunReporter(
            self.run_dir, enabled=fabric.is_global_zero, progress=self.progress, fabric=fabric
        )

        def start() -> None:
            self._setup(fabric, module, dm)
            if ckpt is not None:
                self._load_checkpoint(ckpt)
                if self.completed_rounds > self.rounds:
                    raise FloraConfigError(
                        f"trainer.rounds is {self.rounds}, but checkpoint {ckpt} has already completed "
                        f"{self.completed_rounds} rounds; set --trainer.rounds {self.completed_rounds} or "
                        "more to continue it"
                    )
            else:  # a fresh run: no client state of an earlier attempt survives
                self.store.clear(write=fabric.local_rank == 0)

        self._on_all_ranks(fabric, start)
        fabric.barrier()
        if ckpt is not None:
            reporter.note(f"resumed from {ckpt} after round {self.completed_rounds}")
            if module.is_trainable and self.completed_rounds == self.rounds:
                reporter.note(f"the run already completed its {self.rounds} rounds: nothing left to train")
        reporter.start(self, module, dm, self.config_text, resumed=ckpt is not None)
        if self.zero_shot_reference and self.zero_shot is None:
            with module.zero_shot():
                self.zero_shot, _ = self._evaluate()
            reporter.zero_shot(self.zero_shot)
        if not module.is_trainable:
            reporter.note(f"{type(module).__name__} has no trainable parameters: evaluating only")
            if not self.history:
                self._evaluate_initial(reporter)
            self.completed_rounds = self.rounds
        else:
            # rounds 0 evaluates the initial model, so every run ends with a `final` result
            if (self.eval_before_training or self.rounds == 0) and not self.history:
                self._evaluate_initial(reporter)
            for round_idx in range(self.completed_rounds, self.rounds):
                reporter.round_start(round_idx, self.rounds, len(self.sampler.clients(round_idx)))
                record = self._run_round(round_idx, reporter)
                self._account(record)
                self.completed_rounds = round_idx + 1
                if self.completed_rounds % self.checkpoint_every == 0 or self.completed_rounds == self.rounds:
                    self._save_checkpoint()
                reporter.round_done(record)
                fabric.barrier()
        self.module.load_global_state(self.global_state)
        summary = reporter.finish(self.history, method=_method_path(module), zero_shot=self.zero_shot)
        fabric.barrier()
        return summary

    def _evaluate_only(
        self,
        fabric: Fabric,
        module: FederatedPromptModule,
        dm: FederatedDataModule,
        ckpt: Path | None,
        kind: str,
    ) -> dict[str, Any]:
        self._setup(fabric, module, dm)
        if ckpt is not None:
            self._load_checkpoint(ckpt)
        metrics, evals = self._evaluate()
        result = {
            "kind": kind,
            "method": _method_path(module),
            "checkpoint": str(ckpt) if ckpt else None,
            "completed_rounds": self.completed_rounds,
            **metrics,
            "clients": [e.__dict__ for e in evals],
        }
        if fabric.is_global_zero:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / f"{kind}.json").write_text(json.dumps(result, indent=2))
            if self.progress:
                print(
                    f"{kind}: local acc {metrics['local_acc_mean']:.2f} ± {metrics['local_acc_std']:.2f} "
                    f"(worst 10% {metrics['local_acc_worst10']:.2f}, pooled {metrics['local_acc_pooled']:.2f}, "
                    f"macro-F1 {metrics['local_f1_mean']:.2f}) -> {self.run_dir / (kind + '.json')}"
                )
        return result
