"""Per-client evaluation and the federation-level summary of it."""

from __future__ import annotations

import math
from collections.abc import Sequence
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


def peak_memory_mb() -> dict[str, float]:
    """This process's peak resident memory (``peak_rss_mb``) and, on CUDA, peak allocated GPU memory (MiB)."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"peak_rss_mb": rss / (2**20 if sys.platform == "darwin" else 2**10)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    """The size of a state's tensors in bytes (what sending it costs)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def mean_std(values: Sequence[float], ddof: int = 0) -> tuple[float, float]:
    """Mean and standard deviation of ``values`` in float64 (numpy's arithmetic).

    ``ddof`` as in numpy: 0 gives the population std, 1 the sample std. NaN for what is
    undefined (no values; ``ddof`` or fewer values for the std).
    """
    if len(values) == 0:
        return math.nan, math.nan
    x = np.asarray(values, dtype=np.float64)
    return float(x.mean()), float(x.std(ddof=ddof)) if len(x) > ddof else math.nan


def harmonic_mean(values: Sequence[float]) -> float:
    """The harmonic mean of ``values`` (accuracies); 0 when any of them is 0 or less."""
    return 0.0 if min(values) <= 0 else len(values) / sum(1.0 / v for v in values)


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
    mean, std = mean_std(acc)
    k = max(1, math.ceil(0.1 * len(acc)))
    total = sum(e.num_samples for e in evals)
    return {
        f"{prefix}_acc_mean": mean,
        f"{prefix}_acc_std": std,
        f"{prefix}_acc_worst10": float(np.sort(acc)[:k].mean()),
        f"{prefix}_acc_pooled": 100.0 * sum(e.correct for e in evals) / total,
        f"{prefix}_f1_mean": float(np.mean([e.f1 for e in evals])),
    }
