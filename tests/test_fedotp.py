"""FedOTP: unbalanced OT between patches and a global + a local prompt."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flora.data import FederatedDataModule
from flora.federated import FederatedTrainer
from flora.methods import FedOTP, Role
from flora.prompts import unbalanced_sinkhorn

NAMES = ["red circle", "blue square", "green triangle"]


def test_sinkhorn_marginals() -> None:
    g = torch.Generator().manual_seed(0)
    sim = torch.rand(4, 3, 16, 2, generator=g) * 0.8
    plan = unbalanced_sinkhorn(1 - sim, 1 / 16, 0.4, eps=0.1)
    torch.testing.assert_close(
        plan.sum(-2), torch.full((4, 3, 2), 0.4), atol=1e-4, rtol=0
    )  # prompts: equality
    assert plan.sum(-1).max() <= 1 / 16 + 1e-4  # patches: at most 1/M each
    assert (plan >= 0).all()
    # more similar patch/prompt pairs carry more mass
    sim2 = sim.clone()
    sim2[..., 0, 0] = 1.0
    assert (unbalanced_sinkhorn(1 - sim2, 1 / 16, 0.4)[..., 0, 0] >= plan[..., 0, 0]).all()
    bad = sim.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite plan"):
        unbalanced_sinkhorn(1 - bad, 1 / 16, 0.4)
    with pytest.raises(ValueError, match="eps"):
        unbalanced_sinkhorn(1 - sim, 1 / 16, 0.4, eps=0.0)


def test_fedotp_logits_gradients_and_global_part() -> None:
    m = FedOTP(class_names=NAMES, n_ctx=2, gamma=0.8, eps=0.1)
    assert m.parameter_roles() == {"prompt.ctx": Role.GLOBAL, "personal.ctx": Role.LOCAL}
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    feats = m.image_features(x)
    assert feats.dim() == 3 and feats.shape[1] > 2  # pooled token first, then the patches
    logits = m(x)
    # by hand: S = patches . prompt features, T from the OT, logit = s * sum T S
    text = m.prompt_features()
    patches = F.normalize(feats[:, 1:].float(), dim=-1)
    sim = torch.einsum("bmd,ncd->bcmn", patches, text)
    plan = unbalanced_sinkhorn(1 - sim.detach(), 1 / patches.shape[1], 0.4, 0.1)
    torch.testing.assert_close(logits, m.backbone.logit_scale * (plan * sim).sum((-1, -2)))
    F.cross_entropy(logits, torch.tensor([0, 2])).backward()
    assert m.prompt.ctx.grad is not None and m.prompt.ctx.grad.abs().sum() > 0
    assert m.personal.ctx.grad is not None and m.personal.ctx.grad.abs().sum() > 0
    # the global part alone ignores the local prompt
    m.eval()
    with torch.no_grad(), m.global_only():
        before = m(x)
        m.personal.ctx.add_(1.0)
        m._eval_text = None
        after = m(x)
    torch.testing.assert_close(before, after)
    with pytest.raises(ValueError, match="patch features"):
        m.ot_logits(feats[:, 0], text)
    with pytest.raises(ValueError, match="gamma"):
        FedOTP(class_names=NAMES, gamma=0.0)


def test_fedotp_federated_run(tmp_path: Path, tiny_root: Path) -> None:
    trainer = FederatedTrainer(rounds=1, output_dir=str(tmp_path), name="o", progress=False, seed=0)
    summary = trainer.fit(FedOTP(n_ctx=2, lr=0.01), FederatedDataModule(root=str(tiny_root), batch_size=8))
    assert set(trainer.global_state) == {"prompt.ctx"}
    local = [trainer.store.get(c).local["personal.ctx"] for c in range(4)]  # type: ignore[union-attr]
    assert not torch.equal(local[0], local[1])
    assert "global_acc" in summary["final"] and summary["final"]["bytes_up_total"] > 0
