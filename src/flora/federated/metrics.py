"""Per-client evaluation and the federation-level summary of it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score


@dataclass
class ClientEval:
    """One client's predictions on one evaluation split, reduced to numbers."""

    client_id: int
    num_samples: int
    correct: int
    acc: float  # percent
    f1: float  # macro-F1 over the classes present in targets or predictions, percent


def evaluate_predictions(
    client_id: int, preds: torch.Tensor, target: torch.Tensor, num_classes: int
) -> ClientEval:
    if target.numel() == 0:
        raise ValueError(f"client {client_id} has no evaluation samples")
    n = max(2, num_classes)  # torchmetrics needs two classes; a one-class task is still well defined
    acc = multiclass_accuracy(preds, target, num_classes=n, average="micro")
    f1 = multiclass_f1_score(preds, target, num_classes=n, average="macro")
    return ClientEval(
        client_id=client_id,
        num_samples=int(target.numel()),
        correct=int((preds == target).sum()),
        acc=100.0 * float(acc),
        f1=100.0 * float(f1),
    )


def summarise(evals: list[ClientEval], prefix: str) -> dict[str, float]:
    """Mean, std, worst 10 % and pooled accuracy plus mean macro-F1 over clients (percent).

    ``std`` is the population std over clients (ddof 0); ``worst10`` is the mean accuracy of
    the ``ceil(n / 10)`` clients with the lowest accuracy; ``pooled`` is correct / samples
    over all clients together.
    """
    if not evals:
        return {}
    evals = sorted(evals, key=lambda e: e.client_id)
    acc = np.array([e.acc for e in evals], dtype=np.float64)
    k = max(1, math.ceil(0.1 * len(acc)))
    total = sum(e.num_samples for e in evals)
    return {
        f"{prefix}_acc_mean": float(acc.mean()),
        f"{prefix}_acc_std": float(acc.std()),
        f"{prefix}_acc_worst10": float(np.sort(acc)[:k].mean()),
        f"{prefix}_acc_pooled": 100.0 * sum(e.correct for e in evals) / total,
        f"{prefix}_f1_mean": float(np.mean([e.f1 for e in evals])),
    }
