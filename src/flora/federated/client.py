"""One client at a time on the single client module: its state in, local training, evaluation."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from lightning.fabric import Fabric
from torch.utils.data import DataLoader

from flora.data.datamodule import FederatedDataModule
from flora.errors import FloraRunError
from flora.federated.metrics import ClientEval, evaluate_predictions
from flora.federated.sampling import derive_seed
from flora.federated.store import ClientState, ClientStore, to_cpu_copy
from flora.methods.base import FederatedPromptModule, StateDict


@dataclass
class ClientResult:
    """What one client's turn of a round produced (CPU copies), sent from its rank to all."""

    client_id: int
    num_samples: int  # the client's training-set size
    upload: StateDict
    state: ClientState
    loss: float  # mean training loss of the turn
    samples_seen: int


def check_finite(result: ClientResult, round_idx: int, checkpoint: Path, completed_rounds: int) -> None:
    """Refuse a client's upload or local state holding NaN/inf (``checkpoint``: the run's last, kept)."""
    for part, state in {"upload": result.upload, "local state": result.state.local}.items():
        for key, value in state.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                kept = (
                    f"the last checkpoint ({checkpoint}, round {completed_rounds}) is kept"
                    if completed_rounds > 0 and checkpoint.is_file()
                    else "no checkpoint was written yet"
                )
                raise FloraRunError(
                    f"round {round_idx + 1}: client {result.client_id} produced non-finite values in its "
                    f"{part} ({key}); nothing was aggregated and {kept}. Lower the learning rate or "
                    "use 32-true precision"
                )


class LocalTraining(NamedTuple):
    """What :meth:`ClientRunner.local_training` did."""

    losses: list[float]
    steps: int
    samples_seen: int
    num_samples: int  # the training-set size
    optimizer: Any


class ClientRunner:
    """Puts one client after the other on the module: its model in, local training, evaluation.

    Seeds, all derived from ``seed``: a client's local parameters start from ``(seed, 2,
    client)``; its data order in round ``r`` follows ``(seed, 3, r, client)`` (``(seed, 3, r,
    client, k)`` in phase ``k > 0`` of a round with several phases), that of its
    evaluation fine-tuning after ``r`` completed rounds ``(seed, 4, r, client)``.
    """

    def __init__(
        self,
        fabric: Fabric,
        module: FederatedPromptModule,
        dm: FederatedDataModule,
        store: ClientStore,
        *,
        seed: int,
        local_epochs: int,
        max_steps: int | None,
        optimizer_state: str,
        profile: bool,
    ) -> None:
        self.fabric, self.module, self.dm, self.store = fabric, module, dm, store
        self.seed = seed
        self.local_epochs = local_epochs
        self.max_steps = max_steps  # per turn of local training; evaluation fine-tuning is never capped
        self.optimizer_state = optimizer_state
        self.profile = profile
        self.optim_time = 0.0  # seconds in backward + step (with ``profile``)
        self.use_features = dm.uses_feature_cache and module.feature_kind in ("global", "patch")
        self.encoder_key = f"{module.backbone.fingerprint()}|{module.feature_kind}"

    def start_timings(self) -> None:
        """Start timing a round's training (image and text tower only with ``profile``: it synchronises)."""
        backbone = self.module.backbone
        backbone.profiling = self.profile
        backbone.timings = {"image": 0.0, "text": 0.0}
        self.optim_time = 0.0

    def stop_timings(self) -> dict[str, float]:
        """The seconds spent since :meth:`start_timings` in the image tower, the text tower and the optimiser."""
        backbone = self.module.backbone
        timings = {
            "time_image_s": backbone.timings["image"],
            "time_text_s": backbone.timings["text"],
            "time_optim_s": self.optim_time,
        }
        backbone.profiling = False
        return timings

    # ------------------------------------------------------------------ data
    def _encoder(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if not self.use_features:
            return None
        module, fabric = self.module, self.fabric

        def encode(images: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), fabric.autocast():
                return module.image_features(fabric.to_device(images)).float()

        return encode

    def loader(self, source: int | str, split: str, *, train: bool, seed: int = 0) -> DataLoader:
        """Client ``source``'s ``split`` (or the shared test set ``source``); batches arrive on the device.

        Iterating the loader draws its shuffling generator (seeded with ``seed``); the loader
        is only iterated when read.
        """
        loader = self.dm.client_loader(
            source, split, train=train, seed=seed, encoder=self._encoder(), encoder_key=self.encoder_key
        )
        # Fabric gives the loader its own worker seeding when seed_everything(workers=True) ran;
        # the workers keep the seeding they have (drawn from the loader's generator)
        worker_init_fn = loader.worker_init_fn
        on_device = self.fabric.setup_dataloaders(loader, use_distributed_sampler=False, move_to_device=True)
        loader.worker_init_fn = worker_init_fn
        return on_device

    # ----------------------------------------------------------------- model
    def load(self, client_id: int, global_state: StateDict, *, for_eval: bool = False) -> ClientState | None:
        """Load client ``client_id``'s download (or evaluation state) and its local state into the module.

        A client without a stored state starts from freshly initialised local parameters.
        The stored state is returned (without its optimiser state ``for_eval``).
        """
        module = self.module
        if for_eval:
            module.load_global_state(module.evaluation_state(client_id, global_state))
        else:
            module.load_global_state(module.download_state(client_id, global_state))
        state = self.store.get(client_id, optim=not for_eval)
        if state is None:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, 2, client_id))
            module.reset_local_parameters(gen)
        else:
            module.load_local_state(state.local)
        return state

    def local_training(
        self,
        client_id: int,
        epochs: int,
        seed: int,
        previous: ClientState | None,
        label: str,
        max_steps: int | None = None,
    ) -> LocalTraining:
        """``epochs`` of local SGD on the client's training split, on whatever the module holds now.

        At most ``max_steps`` optimiser steps when given. ``previous`` is the client's stored
        state (its optimiser state is restored with ``optimizer_state="persist"``); ``label``
        names the training in errors.
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
        loader = self.loader(client_id, "train", train=True, seed=seed)
        with torch.no_grad(), fabric.autocast():
            # lazy: the loader is only iterated (and its shuffling RNG only drawn) if the method reads it
            module.before_local_training(loader)
        module.train()
        losses: list[float] = []
        steps = seen = 0
        with torch.enable_grad():
            for _epoch in range(epochs):
                for batch_idx, batch in enumerate(loader):
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
                        self.optim_time += time.perf_counter() - t_opt
                    losses.append(float(loss.detach()))
                    steps += 1
                    seen += int(batch[1].shape[0])
                    if max_steps is not None and steps >= max_steps:
                        break
                if max_steps is not None and steps >= max_steps:
                    break
        module.eval()
        return LocalTraining(losses, steps, seen, len(loader.dataset), optimizer)

    def train(self, client_id: int, round_idx: int, global_state: StateDict) -> ClientResult:
        """Client ``client_id``'s turn in round ``round_idx``: copies of what it uploads and keeps."""
        module = self.module
        previous = self.load(client_id, global_state)
        phase = module.round_phases.index(module.phase)  # a later phase of the round draws its own order
        seed = derive_seed(self.seed, 3, round_idx, client_id, *([phase] if phase else []))
        done = self.local_training(
            client_id, self.local_epochs, seed, previous, f"round {round_idx + 1}", self.max_steps
        )
        optim = to_cpu_copy(done.optimizer.state_dict()) if self.optimizer_state == "persist" else None
        state = ClientState(local=module.local_state(), optim=optim)
        return ClientResult(
            client_id=client_id,
            num_samples=done.num_samples,
            upload=module.upload_state(),
            state=state,
            loss=sum(done.losses) / max(1, len(done.losses)),
            samples_seen=done.samples_seen,
        )

    def train_share(
        self,
        client_ids: list[int],
        round_idx: int,
        global_state: StateDict,
        client_batch: int,
        train_one: Callable[[int, int], ClientResult],
        done: Callable[[int], None],
    ) -> list[ClientResult]:
        """This rank's clients of a round: ``client_batch`` at a time, or one by one when it is 1.

        The caller has checked that the method allows it (:func:`~flora.federated.vectorised.why_sequential`).
        ``train_one(client_id, round_idx)`` trains a single client (the trainer's hook);
        ``done(client_id)`` is called after each client's turn.
        """
        from flora.federated.vectorised import train_together

        if client_batch > 1 and len(client_ids) > 1:
            results = []
            for i in range(0, len(client_ids), client_batch):
                chunk = client_ids[i : i + client_batch]
                results += train_together(self, chunk, round_idx, global_state)
                for cid in chunk:
                    done(cid)
            return results
        results = []
        for cid in client_ids:
            results.append(train_one(cid, round_idx))
            done(cid)
        return results

    # ------------------------------------------------------------ evaluation
    @property
    def finetune_epochs(self) -> int:
        """Evaluation fine-tuning epochs of the method (none for the zero-shot reference)."""
        if self.module.is_zero_shot:
            return 0
        return int(self.module.eval_finetune_epochs or 0)

    @torch.no_grad()
    def load_for_eval(self, client_id: int, global_state: StateDict, completed_rounds: int) -> None:
        """Load client ``client_id``'s evaluation model; fine-tune a throw-away copy when the method asks.

        The fine-tuned tensors live in the module only until the next client is loaded: they
        are never uploaded or stored (PromptFL+FT). Its data order follows
        ``(seed, 4, completed_rounds, client)``.
        """
        self.load(client_id, global_state, for_eval=True)
        epochs = self.finetune_epochs
        if epochs > 0:
            seed = derive_seed(self.seed, 4, completed_rounds, client_id)
            self.local_training(client_id, epochs, seed, None, "evaluation fine-tuning")

    @torch.no_grad()
    def evaluate(self, client_id: int, shared_set: str | None = None) -> ClientEval:
        """Evaluate the module as client ``client_id``'s model on its own test split.

        With ``shared_set`` (``"base"`` or ``"novel"``), on that test set shared by all clients.
        """
        fabric, module = self.fabric, self.module
        module.eval()
        preds, targets = [], []
        for x, y in self.loader(client_id if shared_set is None else shared_set, "test", train=False):
            with fabric.autocast():
                logits = module(x)
            preds.append(logits.argmax(-1).cpu())
            targets.append(y.cpu())
        if not targets:
            raise ValueError(f"client {client_id} has no test samples to evaluate")
        return evaluate_predictions(client_id, torch.cat(preds), torch.cat(targets), module.num_classes)
