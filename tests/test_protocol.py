"""The evaluation protocol: exact summary numbers, the Novel task, and what each client trains and is evaluated with."""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from flora.data import FederatedDataModule
from flora.federated import FederatedTrainer
from flora.federated.client import ClientRunner
from flora.federated.metrics import ClientEval, evaluate_predictions, summarise
from flora.methods import PromptAMP, PromptFL
from flora.methods.base import StateDict


def _trainer(tmp_path: Path, name: str, **kw: Any) -> FederatedTrainer:
    args: dict[str, Any] = dict(
        rounds=1, output_dir=str(tmp_path / "runs"), name=name, progress=False, seed=0, accelerator="cpu"
    )
    args.update(kw)
    return FederatedTrainer(**args)


def _dm(root: Path, base_novel: bool = False) -> FederatedDataModule:
    return FederatedDataModule(root=str(root), batch_size=8, base_novel=base_novel)


# ------------------------------------------------------------------ summary numbers
def _client(cid: int, correct: int, total: int) -> ClientEval:
    """A client with ``correct`` of ``total`` right, built through evaluate_predictions."""
    target = torch.zeros(total, dtype=torch.long)
    preds = torch.ones(total, dtype=torch.long)
    preds[:correct] = 0
    return evaluate_predictions(cid, preds, target, num_classes=3)


def test_summary_numbers_exact_with_unequal_clients() -> None:
    # (correct, total): accuracies 90, 25, 100, 40 on 10, 4, 2, 5 samples
    counts = {0: (9, 10), 1: (1, 4), 2: (2, 2), 3: (2, 5)}
    evals = [_client(c, *counts[c]) for c in (2, 0, 3, 1)]  # any order: summarised by client id
    accs = [e.acc for e in sorted(evals, key=lambda e: e.client_id)]
    assert accs == pytest.approx([90.0, 25.0, 100.0, 40.0], abs=1e-5)  # torchmetrics computes in float32
    s = summarise(evals, "local")
    mean = sum(accs) / 4
    assert s["local_acc_mean"] == pytest.approx(mean, abs=1e-9)
    assert s["local_acc_mean"] == pytest.approx(63.75, abs=1e-5)
    # pooled is sample-weighted: 14 of 21 right, not the mean of the clients' accuracies
    assert s["local_acc_pooled"] == pytest.approx(100.0 * 14 / 21, abs=1e-12)
    assert s["local_acc_pooled"] != pytest.approx(s["local_acc_mean"], abs=1.0)
    # std over clients is the population std (numpy's default, ddof=0), not the sample std
    population = math.sqrt(sum((a - mean) ** 2 for a in accs) / 4)
    sample = math.sqrt(sum((a - mean) ** 2 for a in accs) / 3)
    assert s["local_acc_std"] == pytest.approx(population, abs=1e-9)
    assert s["local_acc_std"] != pytest.approx(sample, abs=1.0)
    # worst 10 %: ceil(0.1 * 4) = 1 client, the worst one (the best would be 100)
    assert s["local_acc_worst10"] == accs[1]
    assert set(s) == {f"local_acc_{k}" for k in ("mean", "std", "worst10", "pooled")} | {"local_f1_mean"}


@pytest.mark.parametrize(
    ("n_clients", "k"),
    [(4, 1), (10, 1), (11, 2), (20, 2), (25, 3)],
)
def test_worst10_is_the_mean_of_the_ceil_tenth_worst_clients(n_clients: int, k: int) -> None:
    """k = ceil(n / 10) worst clients: 11 clients -> 2 (floor would give 1, 20 % would give 3)."""
    # distinct accuracies in a scrambled client order
    accs = {cid: float((37 * cid + 11) % 101) for cid in range(n_clients)}
    assert len(set(accs.values())) == n_clients
    evals = [ClientEval(cid, 10 + cid, 0, acc, 0.0) for cid, acc in accs.items()]
    ordered = sorted(accs.values())
    assert summarise(evals, "x")["x_acc_worst10"] == pytest.approx(sum(ordered[:k]) / k, abs=1e-12)


def test_macro_f1_averages_the_classes_present_in_targets_or_predictions() -> None:
    # classes 0 and 1 in the targets, class 2 only predicted, classes 3-5 absent
    e = evaluate_predictions(0, torch.tensor([0, 1, 1, 2]), torch.tensor([0, 0, 1, 1]), num_classes=6)
    f1 = {0: 2 / 3, 1: 2 * 1 / (2 * 1 + 1 + 1), 2: 0.0}  # 2TP / (2TP + FP + FN)
    assert e.acc == 50.0 and e.correct == 2 and e.num_samples == 4
    assert e.f1 == pytest.approx(100.0 * sum(f1.values()) / 3, abs=1e-4)
    assert summarise([e, ClientEval(1, 4, 4, 100.0, 100.0)], "l")["l_f1_mean"] == pytest.approx(
        (e.f1 + 100.0) / 2, abs=1e-9
    )


# ------------------------------------------------------------------ the Novel task
class _TaskRecorder(PromptFL):
    """PromptFL that records, for every evaluation forward, the task and the logits' width."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.evaluating: tuple[int, Any] | None = None  # (client, shared set) set by the evaluation spy
        self.records: list[dict[str, Any]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        if not self.training and self.evaluating is not None:
            cid, data = self.evaluating
            self.records.append(
                {
                    "client": cid,
                    "data": data,
                    "global_only": self.is_global_only,
                    "names": list(self.class_names),
                    "width": int(logits.shape[-1]),
                    "tokens": self.class_prompts.tokens.clone(),  # type: ignore[union-attr]
                    "anchor": self.anchor.clone(),
                }
            )
        return logits


def _spy_eval_client(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, Any, ClientEval]]:
    """Tag the module with the (client, shared set) each ``ClientRunner.evaluate`` call evaluates."""
    original = ClientRunner.evaluate
    signature = inspect.signature(original)
    results: list[tuple[int, Any, ClientEval]] = []

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        cid, data = bound.arguments["client_id"], bound.arguments["shared_set"]
        self.module.evaluating = (cid, data)
        try:
            out = original(self, *args, **kwargs)
        finally:
            self.module.evaluating = None
        results.append((cid, data, out))
        return out

    monkeypatch.setattr(ClientRunner, "evaluate", spy)
    return results


def test_novel_evaluation_scores_exactly_the_novel_classes(
    tmp_path: Path, tiny_bn_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = _spy_eval_client(monkeypatch)
    module = _TaskRecorder(n_ctx=2, lr=0.01)
    trainer = _trainer(tmp_path, "novel")
    trainer.fit(module, _dm(tiny_bn_root, base_novel=True))
    dm = trainer.dm
    base, novel = dm.class_names, dm.novel_class_names
    assert len(base) == 5 and len(novel) == 4 and not set(base) & set(novel)
    expected_tokens = module.backbone.build_class_prompts(novel, module.n_ctx).tokens
    expected_anchor = module.backbone.anchor_features(novel, module.template)
    novel_records = [r for r in module.records if r["data"] == "novel"]
    # every client, personalised and with the global part alone
    assert {(r["client"], r["global_only"]) for r in novel_records} == {
        (c, g) for c in range(dm.num_clients) for g in (False, True)
    }
    for r in novel_records:
        assert r["names"] == novel and r["width"] == len(novel)  # logits span exactly the novel classes
        assert torch.equal(r["tokens"], expected_tokens)  # the text prompts are the novel names
        torch.testing.assert_close(r["anchor"], expected_anchor)
    for r in module.records:
        if r["data"] != "novel":  # Local and Base: the training (base) task
            assert r["names"] == base and r["width"] == len(base)
    # the novel targets are scored against those logits: labels 0..3 of the novel test set
    _, novel_labels = dm._read("novel", "test")
    for _cid, data, ev in results:
        if data == "novel":
            assert ev.num_samples == len(novel_labels)
    assert module.class_names == base  # the training task is restored afterwards


# ------------------------------------------- what a client trains and is evaluated with
class _PersonalDownloads(PromptFL):
    """Every client downloads (and is evaluated with) its own, recognisable prompt.

    Records which client's download the module holds at the first training step of each
    client turn, and which client's evaluation state it holds at every evaluation forward.
    """

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.sent: dict[int, StateDict] = {}
        self.eval_sent: dict[int, StateDict] = {}
        self.trained_with: list[list[int]] = []
        self.evaluated_with: list[list[int]] = []
        self._fresh = False

    def download_state(self, client_id: int, global_state: StateDict) -> StateDict:
        state = {k: v + 0.1 * (client_id + 1) for k, v in global_state.items()}
        self.sent[client_id] = state
        return state

    def evaluation_state(self, client_id: int, global_state: StateDict) -> StateDict:
        state = {k: v - 0.1 * (client_id + 1) for k, v in global_state.items()}
        self.eval_sent[client_id] = state
        return state

    def _holding(self, table: dict[int, StateDict]) -> list[int]:
        ctx = self.prompt.ctx.detach().cpu()
        return [c for c, s in sorted(table.items()) if torch.equal(s["prompt.ctx"], ctx)]

    def before_local_training(self, batches: Any) -> None:
        self._fresh = True

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self._fresh:
            self.trained_with.append(self._holding(self.sent))
            self._fresh = False
        return super().training_step(batch, batch_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and not self.is_zero_shot:
            self.evaluated_with.append(self._holding(self.eval_sent))
        return super().forward(x)


def _runs(seen: list[list[int]]) -> list[int]:
    """Collapse consecutive repeats: the sequence of clients."""
    out: list[int] = []
    for hit in seen:
        assert len(hit) == 1, f"the module held no (or several) clients' state: {hit}"
        if not out or out[-1] != hit[0]:
            out.append(hit[0])
    return out


def test_each_client_trains_from_and_is_evaluated_with_its_own_state(tmp_path: Path, tiny_root: Path) -> None:
    module = _PersonalDownloads(n_ctx=2, lr=0.01)
    trainer = _trainer(tmp_path, "personal", rounds=2)
    trainer.fit(module, _dm(tiny_root))
    clients = list(range(trainer.dm.num_clients))
    # training starts from download_state(client), not from the global state
    assert module.trained_with == [[c] for c in clients] * 2
    # evaluation (every round, personalised and global part) uses evaluation_state(client)
    assert module.evaluated_with and _runs(module.evaluated_with) == clients * 2


class _AMPRecorder(PromptAMP):
    """PromptAMP that records the prompt it holds at every evaluation forward."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.evaluated: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            self.evaluated.append(self.prompt.ctx.detach().cpu().clone())
        return super().forward(x)


def test_promptamp_evaluates_each_client_with_its_own_last_prompt(tmp_path: Path, tiny_root: Path) -> None:
    module = _AMPRecorder(n_ctx=2, lr=0.05)
    trainer = _trainer(tmp_path, "amp", rounds=1)
    trainer.fit(module, _dm(tiny_root))
    own = {c: s["prompt.ctx"] for c, s in module.client_prompts.items()}
    assert sorted(own) == list(range(trainer.dm.num_clients))
    fedavg = trainer.global_state["prompt.ctx"]
    seen = []
    for ctx in module.evaluated:
        hits = [c for c, p in own.items() if torch.equal(ctx, p)]
        assert hits, "evaluated with a prompt that is no client's own upload"
        assert not torch.equal(ctx, fedavg)
        seen.append(hits)
    assert _runs(seen) == list(range(trainer.dm.num_clients))
