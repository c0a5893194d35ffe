"""The evaluation protocol: every client, sharded over the ranks, with the numbers each setting reports.

For each client ``c`` (the ranks split the clients, the results are gathered):

* **Local**: ``c``'s evaluation model (:meth:`~flora.methods.base.FederatedPromptModule.evaluation_state`
  plus its local state, fine-tuned on its training split first when the method has
  ``eval_finetune_epochs``) on ``c``'s own test split;
* **Global** (methods with a global model): the global part alone
  (:meth:`~flora.methods.base.FederatedPromptModule.global_only`, never fine-tuned) on the
  same split, reported pooled over all clients;
* under the base/novel setting also **Base** (the Local model on the shared test set of the
  base classes), **Novel** (the Local model, with the novel class names as its task, on the
  shared novel test set), **Novel-G** (the global part alone on the novel test set) and
  **HM**, the harmonic mean of the Local, Base and Novel mean accuracies.

With evaluation fine-tuning the tuned copy is made once per client (on the base task, whose
labels the training split uses) and reused for Novel.

**Which clients.** Only clients with test samples can be evaluated
(:attr:`~flora.data.FederatedDataModule.evaluable_clients`); a client without any (possible
with many small clients) trains like every other, and each evaluation reports how many were
left out (``clients_without_test``). With ``trainer.eval_clients: K`` an intermediate
evaluation covers a seeded sample of ``K`` of them (:func:`clients_to_evaluate`, a pure
function of the seed and the round, so the same for any number of devices); the last round,
the zero-shot reference, ``validate`` and ``test`` cover all of them. Each record names the
clients it covers (``eval_client_ids``) and whether they were a sample (``eval_sampled``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flora.data.datamodule import FederatedDataModule
from flora.federated.client import ClientRunner
from flora.federated.distributed import gather, rank_share
from flora.federated.metrics import ClientEval, harmonic_mean, summarise
from flora.methods.base import StateDict

if TYPE_CHECKING:
    from lightning.fabric import Fabric

    from flora.federated.trainer import FederatedTrainer
    from flora.methods.base import FederatedPromptModule


def clients_to_evaluate(dm: FederatedDataModule, sample: int | None, seed: int, round_no: int) -> list[int]:
    """The clients an evaluation covers, in id order: every client with test samples, or a seeded sample.

    ``sample`` (``trainer.eval_clients``) is the number of clients of an intermediate
    evaluation (None: all); the sample of round ``round_no`` depends on ``seed`` and
    ``round_no`` only.
    """
    evaluable = dm.evaluable_clients
    if sample is None or sample >= len(evaluable):
        return evaluable
    rng = np.random.default_rng([seed, 0xE7A1, round_no])
    return sorted(int(c) for c in rng.choice(evaluable, size=sample, replace=False))


def evaluate_clients(
    clients: ClientRunner,
    global_state: StateDict,
    completed_rounds: int,
    reporter: Any = None,
    client_ids: list[int] | None = None,
) -> tuple[dict[str, Any], list[ClientEval]]:
    """The protocol's metrics (the same on every rank) and the evaluated clients' Local results.

    ``client_ids`` (default: every client with test samples) are the clients to evaluate.
    ``completed_rounds`` seeds evaluation fine-tuning. ``reporter`` (a
    :class:`~flora.reporting.RunReporter`) shows a progress bar over this rank's clients.
    """
    module, dm, fabric = clients.module, clients.dm, clients.fabric
    evaluable = dm.evaluable_clients
    ids = evaluable if client_ids is None else list(client_ids)
    mine = rank_share(fabric, ids)
    has_global = module.has_global_model
    base_novel = dm.has_novel
    if reporter is not None:
        reporter.activity("evaluating clients", len(mine) * (2 if base_novel else 1))
    tick = reporter.tick if reporter is not None else (lambda: None)
    finetunes = clients.finetune_epochs > 0
    tuned: dict[int, StateDict] = {}
    local, base, glob = [], [], []
    for cid in mine:
        clients.load_for_eval(cid, global_state, completed_rounds)
        local.append(clients.evaluate(cid))
        if finetunes:
            tuned[cid] = module.global_state()
        if base_novel:
            base.append(clients.evaluate(cid, "base"))
        if has_global:
            if finetunes:  # the global part alone is the un-tuned model
                clients.load(cid, global_state, for_eval=True)
            with module.global_only():
                glob.append(clients.evaluate(cid))
        tick()
    novel, novel_glob = [], []
    if base_novel:
        module.set_task(dm.novel_class_names)
        try:
            for cid in mine:
                if finetunes:
                    clients.load(cid, global_state, for_eval=True)
                    module.load_global_state(tuned[cid])
                    novel.append(clients.evaluate(cid, "novel"))
                    if has_global:  # the global part alone is the un-tuned model
                        clients.load(cid, global_state, for_eval=True)
                else:
                    clients.load_for_eval(cid, global_state, completed_rounds)
                    novel.append(clients.evaluate(cid, "novel"))
                if has_global:
                    with module.global_only():
                        novel_glob.append(clients.evaluate(cid, "novel"))
                tick()
        finally:
            module.set_task(dm.class_names)
    if reporter is not None:
        reporter.done()
    gathered = gather(fabric, [local, base, glob, novel, novel_glob])
    parts = [sorted((e for g in gathered[i::5] for e in g), key=lambda e: e.client_id) for i in range(5)]
    local, base, glob, novel, novel_glob = parts
    metrics: dict[str, Any] = summarise(local, "local")
    metrics["local_acc_clients"] = [e.acc for e in local]
    metrics["eval_client_ids"] = [e.client_id for e in local]
    metrics["clients_evaluated"] = len(local)
    metrics["clients_without_test"] = dm.num_clients - len(evaluable)
    metrics["eval_sampled"] = len(local) < len(evaluable)
    if glob:
        metrics["global_acc"] = summarise(glob, "global")["global_acc_pooled"]
    if base_novel:
        metrics.update(summarise(base, "base"))
        metrics.update(summarise(novel, "novel"))
        if novel_glob:
            metrics.update(summarise(novel_glob, "novel_global"))
        metrics["hm"] = harmonic_mean(
            [metrics["local_acc_mean"], metrics["base_acc_mean"], metrics["novel_acc_mean"]]
        )
    return metrics, local


def evaluate_once(
    trainer: FederatedTrainer,
    fabric: Fabric,
    module: FederatedPromptModule,
    dm: FederatedDataModule,
    ckpt: Path | None,
    kind: str,
) -> dict[str, Any]:
    """``validate`` / ``test``: every evaluable client once (from ``ckpt`` if given); writes ``<kind>.json``."""
    from flora.federated.checkpoint import method_path, restore_checkpoint
    from flora.reporting import write_evaluation

    trainer._setup(fabric, module, dm)
    if ckpt is not None:
        restore_checkpoint(trainer, ckpt)
    metrics, evals = evaluate_clients(trainer.clients, trainer.global_state, trainer.completed_rounds)
    result = {
        "kind": kind,
        "method": method_path(module),
        "checkpoint": str(ckpt) if ckpt else None,
        "completed_rounds": trainer.completed_rounds,
        **metrics,
        "clients": [e.__dict__ for e in evals],
    }
    if fabric.is_global_zero:
        write_evaluation(trainer.run_dir / f"{kind}.json", result, progress=trainer.progress)
    return result
