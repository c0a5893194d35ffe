"""pFedPrompt: a shared prompt plus each client's non-parametric class memory."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from flora.data import FederatedDataModule
from flora.federated import FederatedTrainer
from flora.methods import PFedPrompt, Role

NAMES = ["red circle", "blue square", "green triangle", "yellow star"]


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["patch", "global"])
def test_memory_prototypes_and_lfa_logits(kind: str) -> None:
    m = PFedPrompt(class_names=NAMES, n_ctx=2, lfa_features=kind, alpha=2.0, beta=5.5).eval()
    assert m.parameter_roles() == {
        "prompt.ctx": Role.GLOBAL,
        "memory.keys": Role.LOCAL,
        "memory.present": Role.LOCAL,
    }
    x, y = _images(6), torch.tensor([0, 0, 2, 2, 2, 0])  # classes 1 and 3 absent
    with torch.no_grad():
        m.before_local_training([(x[:4], y[:4]), (x[4:], y[4:])])
        feats = m.image_features(x)
    q = m.query(feats)
    if kind == "patch":
        assert feats.dim() == 3 and torch.allclose(q, F.normalize(feats[:, 1:].mean(1), dim=-1))
    for c in (0, 2):
        expected = F.normalize(q[y == c].mean(0), dim=-1)
        torch.testing.assert_close(m.memory.keys[c], expected, rtol=1e-5, atol=1e-6)
    assert m.memory.present.tolist() == [1.0, 0.0, 1.0, 0.0]
    lfa = m.lfa_logits(feats)
    assert lfa is not None and torch.all(lfa[:, [1, 3]] == 0)
    torch.testing.assert_close(lfa[:, 0], torch.exp(-5.5 * (1 - q @ m.memory.keys[0])))
    with torch.no_grad():
        full = m(x)
        with m.global_only():
            guc = m(x)
    torch.testing.assert_close(full, guc + 2.0 * lfa)
    # the memory is built once: a second call with other data changes nothing
    keys = m.memory.keys.clone()
    with torch.no_grad():
        m.before_local_training([(_images(4, 1), torch.tensor([1, 1, 3, 3]))])
    assert torch.equal(m.memory.keys, keys)
    # another task (novel classes): the memory does not apply
    m.set_task(["purple heart", "orange moon"])
    assert m.lfa_logits(feats) is None and m.memory.keys.shape[0] == 4


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="lfa_features"):
        PFedPrompt(class_names=NAMES, lfa_features="pixels")
    m = PFedPrompt(class_names=NAMES, n_ctx=2)
    with pytest.raises(ValueError, match="no training samples"):
        m.before_local_training([])


def test_memory_follows_the_training_task_not_the_constructor_names() -> None:
    """Built with more classes than it trains on (all classes under base/novel), the memory still works."""
    everything = NAMES + ["purple heart", "orange moon"]
    m = PFedPrompt(class_names=everything, n_ctx=2).eval()
    m.set_task(NAMES)  # what the federated trainer does before training: the training task
    x, y = _images(8), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    with torch.no_grad():
        m.before_local_training([(x, y)])
        assert m.memory_classes == NAMES and m.memory.keys.shape[0] == len(NAMES) and m.memory_applies
        full = m(x)
        with m.global_only():
            guc = m(x)
    # LFA adds alpha * exp(-beta (1 - q.K)) in (e^-11, 1] to every class the client has
    assert (full - guc).abs().min() > 1e-5
    torch.testing.assert_close(full, guc + m.lfa_logits(m.image_features(x)))  # type: ignore[operator]
    # Novel (another task): deliberately the GUC alone, and the memory is kept for the training task
    m.set_task(["purple heart", "orange moon"])
    with torch.no_grad():
        novel = m(x)
        with m.global_only():
            novel_guc = m(x)
    assert not m.memory_applies and torch.equal(novel, novel_guc)
    assert m.memory.keys.shape[0] == len(NAMES)
    m.set_task(NAMES)  # back on the training task, the memory applies again
    with torch.no_grad():
        torch.testing.assert_close(m(x), full)


def test_memory_is_rebuilt_for_the_task_it_trains_on() -> None:
    m = PFedPrompt(class_names=NAMES, n_ctx=2).eval()
    x = _images(4)
    with torch.no_grad():
        m.before_local_training([(x, torch.tensor([0, 1, 2, 3]))])
    other = ["purple heart", "orange moon"]
    m.set_task(other)
    assert not m.memory_applies
    with torch.no_grad():  # the client now trains on another task: its memory follows
        m.before_local_training([(x, torch.tensor([0, 1, 0, 1]))])
    assert m.memory_classes == other and m.memory.present.tolist() == [1.0, 1.0] and m.memory_applies
    # an empty memory (a client that never trained) adds nothing
    m.reset_local_parameters(torch.Generator().manual_seed(0))
    assert not m.memory_applies and m.lfa_logits(m.image_features(x)) is None


def test_federated_memory_stays_on_each_client(tmp_path: Path, tiny_bn_root: Path) -> None:
    dm = FederatedDataModule(root=str(tiny_bn_root), batch_size=8, base_novel=True)
    manifest = json.loads((tiny_bn_root / "manifest.json").read_text())
    everything = manifest["base_classes"] + manifest["novel_classes"]
    trainer = FederatedTrainer(rounds=1, output_dir=str(tmp_path), name="p", progress=False, seed=0)
    # built with all 9 classes: the memory still follows the 5-class training task. A random
    # backbone: the shipped one solves this tiny world outright, so accuracies would tie at 100
    summary = trainer.fit(PFedPrompt(class_names=everything, n_ctx=4, lr=0.01, clip_pretrained=None), dm)
    assert set(trainer.global_state) == {"prompt.ctx"}  # the memory is never uploaded
    for c, client in enumerate(manifest["clients"]):
        present = trainer.store.get(c).local["memory.present"]  # type: ignore[union-attr]
        assert present.tolist() == [float(n > 0) for n in client["train_counts"]]
    assert {"local_acc_mean", "novel_acc_mean", "novel_global_acc_mean", "hm"} <= set(summary["final"])
    # Novel is scored by the prompt alone (the memory only knows base classes)
    assert summary["final"]["novel_acc_mean"] == pytest.approx(summary["final"]["novel_global_acc_mean"])
    # the memory matters for the clients' own classes
    no_lfa = FederatedTrainer(rounds=1, output_dir=str(tmp_path), name="a0", progress=False, seed=0)
    plain = no_lfa.fit(PFedPrompt(n_ctx=4, lr=0.01, alpha=0.0, clip_pretrained=None), dm)
    assert plain["final"]["local_acc_mean"] != pytest.approx(summary["final"]["local_acc_mean"], abs=1e-6)


def test_plain_lightning_trainer_builds_the_memory() -> None:
    L.seed_everything(0)
    m = PFedPrompt(class_names=NAMES, n_ctx=2, lr=0.01)
    x, y = _images(8), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(m, DataLoader(TensorDataset(x, y), batch_size=4))
    assert m.memory.present.tolist() == [1.0, 1.0, 1.0, 1.0]
