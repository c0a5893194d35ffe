"""Adding a method takes one class and nothing else: a new method defined here trains federatedly.

``ShiftedPromptFL`` is PromptFL's shared context plus a learned shift of the image
feature that every client keeps for itself. It is written the way the library's own
methods are: its own options keyword-only, everything else passed on to the base, its
parts named in ``global_params`` / ``local_params``, each with a
``reset_parameters(generator)``.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flora.data import FederatedDataModule
from flora.federated import FederatedTrainer
from flora.methods import CoOpModule, StateDict, Upload


class FeatureShift(nn.Module):
    """A learned vector added to the image feature before it is normalised."""

    def __init__(self, dim: int, init_std: float) -> None:
        super().__init__()
        self.init_std = init_std
        self.shift = nn.Parameter(torch.zeros(dim))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        # drawn on the CPU, where the trainer's generators live, then copied to the device
        values = torch.randn(self.shift.shape, generator=generator) * self.init_std
        self.shift.copy_(values.to(self.shift.device))


class ShiftedPromptFL(CoOpModule):
    """PromptFL's context ``P`` (shared, FedAvg'd) and an image-feature shift ``b`` (kept per client).

    Logits ``s * normalise(f + b) . g(P, c)``; the global part alone drops ``b``.
    """

    global_params = ("prompt",)
    local_params = ("feature_shift",)

    def __init__(self, *, shift_init_std: float = 0.01, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.feature_shift = FeatureShift(self.backbone.embed_dim, shift_init_std)

    def image_side(self, feats: Tensor) -> Tensor:
        feats = (feats[:, 0] if feats.dim() == 3 else feats).float()
        if not self.is_global_only:
            feats = feats + self.feature_shift.shift
        return F.normalize(feats, dim=-1)


class _RecordsUploads(ShiftedPromptFL):
    """The method above, plus a record of what the server received (for the test only)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.uploaded: list[set[str]] = []

    def aggregate(self, uploads: list[Upload], current: StateDict) -> StateDict:
        self.uploaded += [set(state) for _, _, state in uploads]
        return super().aggregate(uploads, current)


def _fit(tmp_path: Path, root: Path, rounds: int) -> FederatedTrainer:
    trainer = FederatedTrainer(
        rounds=rounds, output_dir=str(tmp_path / "runs"), name=f"r{rounds}", progress=False, seed=0
    )
    trainer.fit(_RecordsUploads(n_ctx=4, lr=0.05), FederatedDataModule(root=str(root), batch_size=8))
    return trainer


def test_a_method_defined_outside_the_library_trains_federatedly(tmp_path: Path, tiny_root: Path) -> None:
    initial = _fit(tmp_path, tiny_root, rounds=0)  # the same seed: the round-0 global model
    trainer = _fit(tmp_path, tiny_root, rounds=2)
    module = trainer.module
    assert isinstance(module, _RecordsUploads)
    # the shared options reached the base, the method's own option its own part
    assert module.hparams["lr"] == 0.05 and module.hparams["n_ctx"] == 4
    assert module.hparams["shift_init_std"] == 0.01
    assert "shift_init_std" in inspect.signature(ShiftedPromptFL).parameters
    # the global part is uploaded, aggregated and moved away from its initialisation
    assert module.uploaded and all(keys == {"prompt.ctx"} for keys in module.uploaded)
    assert set(trainer.global_state) == {"prompt.ctx"}
    assert not torch.equal(trainer.global_state["prompt.ctx"], initial.global_state["prompt.ctx"])
    # the local part never leaves its client: every client ends with a shift of its own
    shifts = []
    for client in range(trainer.dm.num_clients):
        state = trainer.store.get(client)
        assert state is not None and set(state.local) == {"feature_shift.shift"}
        shifts.append(state.local["feature_shift.shift"])
    assert all(
        not torch.equal(shifts[i], shifts[j]) for i in range(len(shifts)) for j in range(i + 1, len(shifts))
    )
