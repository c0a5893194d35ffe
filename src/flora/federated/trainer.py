"""FederatedTrainer: the federated loop on Lightning Fabric.

``fit`` claims and locks the run folder (:mod:`~flora.federated.rundir`), starts Fabric's
processes (:mod:`~flora.federated.distributed`), sets data and method up on every rank and,
when resuming, restores the last checkpoint (:mod:`~flora.federated.checkpoint`). One round
then reads top to bottom in :meth:`FederatedTrainer._run_round`:

1. the round's clients come from a seeded sampling stream fixed in advance;
2. they are dealt over the ranks; each rank trains its clients one after the other on the
   single client module (download and local state loaded in, a per-client optimiser, local
   epochs: :class:`~flora.federated.client.ClientRunner`);
3. the results are gathered from all ranks and checked to be finite, the clients' states
   stored, the uploads aggregated by the method in client-id order (so results do not
   depend on the number of devices);
4. every ``eval_every`` rounds (and after the last) the clients are evaluated, sharded over
   the ranks: :mod:`~flora.federated.evaluation` (Local, Global; Base, Novel, Novel-G, HM):
   every client with test samples, or on intermediate rounds a seeded ``eval_clients`` sample;
5. the round's record joins the history and the totals; rank 0 writes an atomic checkpoint
   every ``checkpoint_every`` rounds and logs the round (:class:`~flora.reporting.RunReporter`).
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric

from flora.data.datamodule import FederatedDataModule
from flora.errors import FloraConfigError, FloraConfigWarning, check_choice, check_range
from flora.federated.checkpoint import method_path, resolve_checkpoint, restore_checkpoint, save_checkpoint
from flora.federated.client import ClientResult, ClientRunner, check_finite
from flora.federated.distributed import (
    check_fabric_options,
    gather,
    make_fabric,
    on_all_ranks,
    rank_share,
    setup_rank,
)
from flora.federated.evaluation import clients_to_evaluate, evaluate_clients, evaluate_once
from flora.federated.metrics import ClientEval, peak_memory_mb, state_bytes
from flora.federated.rundir import agent_run_id, check_run_name, run_dir_claimed
from flora.federated.sampling import ClientSampler, derive_seed
from flora.federated.store import ClientStore, make_store, to_cpu_copy
from flora.federated.vectorised import why_sequential
from flora.methods.base import FederatedPromptModule, StateDict, Upload
from flora.reporting import RunReporter


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
        eval_clients: evaluate a seeded sample of this many clients on intermediate rounds
            (None: all); the last round always evaluates every client with test samples.
        optimizer_state: ``persist`` (each client keeps its own optimiser state
            across its turns) or ``reset`` (a fresh optimiser every turn). Never shared.
        state_store: ``memory`` or ``disk`` (under the run folder) for client states.
        client_batch: train up to this many of a rank's clients together (their learned tensors
            stacked, one text-tower call; :mod:`~flora.federated.vectorised`) where the method
            declares it; 1 trains one client after the other. Results are the same either way.
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
        compile_text: run the text tower through ``torch.compile``
            (:meth:`~flora.clip.CLIPBackbone.compile_text`): the first steps of each new
            shape compile (seconds to a minute), later ones run fused kernels. Off by default;
            ``flora bench speed`` measures whether it pays on a machine.
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
        eval_clients: int | None = None,
        optimizer_state: str = "persist",
        state_store: str = "memory",
        max_steps_per_round: int | None = None,
        client_batch: int = 1,
        output_dir: str = "runs",
        name: str = "default",
        loggers: Sequence[str] = ("csv",),
        wandb_project: str = "flora",
        progress: bool = True,
        checkpoint_every: int = 1,
        zero_shot_reference: bool = False,
        profile: bool = False,
        compile_text: bool = False,
        overwrite: bool = False,
    ) -> None:
        check_range("trainer.rounds", rounds, low=0)
        check_range("trainer.local_epochs", local_epochs, low=1)
        check_range("trainer.client_fraction", client_fraction, low=0, low_open=True, high=1)
        check_range("trainer.clients_per_round", clients_per_round, low=1, allow_none=True)
        check_range("trainer.eval_every", eval_every, low=1)
        check_range("trainer.eval_clients", eval_clients, low=1, allow_none=True)
        check_range("trainer.checkpoint_every", checkpoint_every, low=1)
        check_range("trainer.max_steps_per_round", max_steps_per_round, low=1, allow_none=True)
        check_range("trainer.client_batch", client_batch, low=1)
        check_fabric_options(num_nodes=num_nodes, devices=devices, precision=precision)
        check_choice("trainer.optimizer_state", optimizer_state, ("persist", "reset"))
        check_choice("trainer.state_store", state_store, ("memory", "disk"))
        if unknown := sorted(set(loggers) - {"csv", "wandb"}):
            raise FloraConfigError(f"trainer.loggers: unknown logger(s) {unknown}; use csv and/or wandb")
        check_run_name(name)
        self.rounds, self.local_epochs, self.seed = rounds, local_epochs, seed
        self.client_fraction, self.clients_per_round = client_fraction, clients_per_round
        self.accelerator, self.devices, self.strategy, self.num_nodes = (
            accelerator,
            devices,
            strategy,
            num_nodes,
        )
        self.precision = str(precision)
        self.eval_every, self.eval_before_training = eval_every, eval_before_training
        self.eval_clients = eval_clients
        self.optimizer_state, self.state_store = optimizer_state, state_store
        self.max_steps_per_round, self.client_batch = max_steps_per_round, client_batch
        self.output_dir, self.name, self.overwrite = output_dir, name, overwrite
        self.loggers, self.wandb_project, self.progress = list(loggers), wandb_project, progress
        self.checkpoint_every = checkpoint_every
        self.zero_shot_reference, self.profile = zero_shot_reference, profile
        self.compile_text = compile_text
        self.config_text: str | None = None  # the resolved config, written into the run folder by the CLI

    # ------------------------------------------------------------------ paths
    @property
    def run_dir(self) -> Path:
        run_id = agent_run_id()  # under a wandb sweep agent every run gets its own folder
        return Path(self.output_dir) / (self.name if run_id is None else f"{self.name}-{run_id}")

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.ckpt"

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
        return self._launch(partial(evaluate_once, self), model, datamodule, ckpt_path, "validate")

    def test(
        self,
        model: FederatedPromptModule,
        datamodule: FederatedDataModule | None = None,
        ckpt_path: str | None = None,
    ) -> dict[str, Any]:
        """Evaluate every client once on its test split (from ``ckpt_path`` if given) and write ``test.json``."""
        return self._launch(partial(evaluate_once, self), model, datamodule, ckpt_path, "test")

    def _launch(self, fn: Callable[..., Any], model: Any, datamodule: Any, ckpt_path: Any, *rest: Any) -> Any:
        """Check the inputs, claim the run folder (``fit``, rank 0) and run ``fn`` in Fabric's processes."""
        if not isinstance(model, FederatedPromptModule):
            raise TypeError(
                f"the model must be a flora method (FederatedPromptModule), got {type(model).__name__}"
            )
        if not isinstance(datamodule, FederatedDataModule):
            raise TypeError("a FederatedDataModule is required (data: section of the config)")
        fitting = fn == self._fit
        ckpt = resolve_checkpoint(ckpt_path, self.checkpoint_path, fresh_ok=fitting)
        fabric = make_fabric(self)
        if not (fitting and fabric.global_rank == 0):
            return fabric.launch(fn, model, datamodule, ckpt, *rest)
        # every refusal of the run folder comes here, before the processes start and any file is written
        with run_dir_claimed(
            self.run_dir, resuming=ckpt_path is not None, ckpt=ckpt, overwrite=self.overwrite
        ):
            if ckpt_path is not None and ckpt is None:
                note = f"no checkpoint at {self.checkpoint_path}: starting the run {self.name!r} from round 0"
                print(f"flora: warning: {note}", file=sys.stderr, flush=True)
            return fabric.launch(fn, model, datamodule, ckpt, *rest)

    # ------------------------------------------------------------------ setup
    def _setup(self, fabric: Fabric, module: FederatedPromptModule, dm: FederatedDataModule) -> None:
        """Set data and method up on this rank; initialise the server model (the state before round 1)."""
        self.fabric = fabric
        setup_rank(fabric, module, dm)
        module.backbone.compile_text(self.compile_text)
        self.module = module
        self.dm = dm
        self.sampler = ClientSampler(dm.num_clients, self.client_fraction, self.seed, self.clients_per_round)
        # with a disk store one process per machine writes the files every rank holds
        self.store: ClientStore = make_store(
            self.state_store, self.run_dir / "client_states", writer=fabric.local_rank == 0
        )
        self.clients = ClientRunner(
            fabric,
            module,
            dm,
            self.store,
            seed=self.seed,
            local_epochs=self.local_epochs,
            max_steps=self.max_steps_per_round,
            optimizer_state=self.optimizer_state,
            profile=self.profile,
        )
        gen = torch.Generator().manual_seed(derive_seed(self.seed, 1))
        module.reset_global_parameters(gen)
        self.global_state: StateDict = module.global_state()
        self.completed_rounds = 0
        self.history: list[dict[str, Any]] = []
        self.zero_shot: dict[str, Any] | None = None
        self.totals = {"bytes_up_total": 0, "bytes_down_total": 0, "wall_time_s": 0.0}

    def _save_checkpoint(self) -> None:
        if self.fabric.is_global_zero:  # every rank holds the same state; rank 0 writes it
            save_checkpoint(self)

    # ------------------------------------------------------------------- run
    def _fit(self, fabric: Fabric, module: FederatedPromptModule, dm: FederatedDataModule, ckpt: Path | None):
        reporter = RunReporter(
            self.run_dir, enabled=fabric.is_global_zero, progress=self.progress, fabric=fabric
        )

        def start() -> None:
            self._setup(fabric, module, dm)
            if ckpt is not None:
                restore_checkpoint(self, ckpt)
                if self.completed_rounds > self.rounds:
                    raise FloraConfigError(
                        f"trainer.rounds is {self.rounds}, but checkpoint {ckpt} has already completed "
                        f"{self.completed_rounds} rounds; set --trainer.rounds {self.completed_rounds} or "
                        "more to continue it"
                    )
            else:  # a fresh run: no client state of an earlier attempt survives
                self.store.clear(write=fabric.local_rank == 0)

        on_all_ranks(fabric, start)
        fabric.barrier()
        if ckpt is not None:
            reporter.note(f"resumed from {ckpt} after round {self.completed_rounds}")
            if module.is_trainable and self.completed_rounds == self.rounds:
                reporter.note(f"the run already completed its {self.rounds} rounds: nothing left to train")
        reporter.start(self, module, dm, self.config_text, resumed=ckpt is not None)
        self._together = 1  # clients trained at a time, decided once for the run
        if self.client_batch > 1 and module.is_trainable:
            if reason := why_sequential(self.clients):
                if fabric.is_global_zero:
                    warnings.warn(
                        f"trainer.client_batch={self.client_batch} has no effect: clients are trained one by one "
                        f"because {reason}",
                        FloraConfigWarning,
                        stacklevel=2,
                    )
            else:
                self._together = self.client_batch
                reporter.note(f"clients trained up to {self.client_batch} at a time (trainer.client_batch)")
        if self.zero_shot_reference and self.zero_shot is None:
            with module.zero_shot():
                self.zero_shot, _ = self._evaluate(reporter, full=True)
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
                record = self._run_round(round_idx, reporter)
                self._add_to_history(record)
                self.completed_rounds = round_idx + 1
                if self.completed_rounds % self.checkpoint_every == 0 or self.completed_rounds == self.rounds:
                    self._save_checkpoint()
                reporter.round_done(record)
                fabric.barrier()
        module.load_global_state(self.global_state)
        summary = reporter.finish(self.history, method=method_path(module), zero_shot=self.zero_shot)
        fabric.barrier()
        return summary

    def _run_round(self, round_idx: int, reporter: RunReporter) -> dict[str, Any]:
        """Train this rank's share of the round's clients, aggregate, evaluate when due: the round's record."""
        t0 = time.perf_counter()
        sampled = self.sampler.clients(round_idx)
        share = rank_share(self.fabric, sampled)  # this rank's clients of the round
        reporter.round_start(round_idx + 1, len(share) * len(self.module.round_phases))
        self.clients.start_timings()
        results: list[ClientResult] = []
        up: list[int] = []
        down: list[int] = []
        t_train = t_agg = 0.0
        n_trained = 0
        # a method may split a round into phases: each is trained by every sampled client and
        # aggregated before the next one starts (most methods have a single phase)
        for phase in self.module.round_phases:
            self.module.phase = phase
            t1 = time.perf_counter()
            mine = self.clients.train_share(
                share,
                round_idx,
                self.global_state,
                self._together,
                self._train_client,
                reporter.client_done,
            )
            n_trained += sum(r.samples_seen for r in mine)
            phase_results = sorted(gather(self.fabric, mine), key=lambda r: r.client_id)
            t2 = time.perf_counter()
            t_train += t2 - t1
            for r in phase_results:  # before anything is aggregated or stored
                check_finite(r, round_idx, self.checkpoint_path, self.completed_rounds)
            for r in phase_results:
                self.store.put(r.client_id, r.state)
            if self.store.shared and self.fabric.world_size > 1:
                self.fabric.barrier()  # the states are on disk before any rank reads them
            uploads = [Upload(r.client_id, r.num_samples, r.upload) for r in phase_results]
            up += [state_bytes(u.state) for u in uploads]
            down += [state_bytes(self.module.download_state(c, self.global_state)) for c in sampled]
            self.global_state = to_cpu_copy(self.module.aggregate(uploads, self.global_state))
            t_agg += time.perf_counter() - t2
            results += phase_results
        profile = self.clients.stop_timings()

        record: dict[str, Any] = {
            "round": round_idx + 1,
            "clients": sampled,
            "train_loss": sum(r.loss * r.num_samples for r in results)
            / max(1, sum(r.num_samples for r in results)),
            "bytes_up": sum(up),
            "bytes_down": sum(down),
            "bytes_up_clients": up,  # per client, in the order of "clients"
            "bytes_down_clients": down,
            "time_train_s": t_train,
            "time_aggregate_s": t_agg,
            "samples_trained_rank0": n_trained,
        }
        if self.profile:
            record.update(profile)
        if (round_idx + 1) % self.eval_every == 0 or round_idx + 1 == self.rounds:
            t2 = time.perf_counter()
            metrics, _ = self._evaluate(reporter, round_idx + 1 == self.rounds, round_idx + 1)
            record.update(metrics)
            record["time_eval_s"] = time.perf_counter() - t2
        record["time_round_s"] = time.perf_counter() - t0
        return record

    def _train_client(self, client_id: int, round_idx: int) -> ClientResult:
        """One client's turn: its download and state in, local epochs, copies of its upload and state out."""
        return self.clients.train(client_id, round_idx, self.global_state)

    def _add_to_history(self, record: dict[str, Any]) -> None:
        """Add the round's communication and time to the totals, stamp them on the record, keep it."""
        self.totals["bytes_up_total"] += record.get("bytes_up", 0)
        self.totals["bytes_down_total"] += record.get("bytes_down", 0)
        self.totals["wall_time_s"] += record.get("time_round_s", 0.0)
        record.update(self.totals)
        record.update(peak_memory_mb())  # of this process (rank 0's is the one recorded)
        self.history.append(record)

    # ------------------------------------------------------------ evaluation
    def _evaluate(
        self, reporter: RunReporter, full: bool, round_no: int = 0
    ) -> tuple[dict[str, Any], list[ClientEval]]:
        """The protocol of :mod:`~flora.federated.evaluation`: every client with test samples, or (not ``full``) round ``round_no``'s sample."""
        sample = None if full else self.eval_clients
        ids = clients_to_evaluate(self.dm, sample, self.seed, round_no)
        return evaluate_clients(self.clients, self.global_state, self.completed_rounds, reporter, ids)

    def _evaluate_initial(self, reporter: RunReporter) -> None:
        """Evaluate the model before any training and record it as round 0."""
        t0 = time.perf_counter()
        metrics, _ = self._evaluate(reporter, full=self.rounds == 0 or not self.module.is_trainable)
        record = {"round": 0, "bytes_up": 0, "bytes_down": 0, **metrics}
        record["time_eval_s"] = record["time_round_s"] = time.perf_counter() - t0
        self._add_to_history(record)
        reporter.round_done(record)
