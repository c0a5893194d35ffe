"""FLORA and FedPGP: roles, initialisation, every loss term by hand, call counts, the base/novel protocol."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from flora.data import FederatedDataModule
from flora.errors import FloraConfigError
from flora.federated import FederatedTrainer
from flora.methods import FLORA, FedPGP, Role
from flora.prompts import ImageAdapter, LowRankTerm, orthogonality_penalty

NAMES = ["red circle", "red square", "blue circle", "blue square", "green star"]
REPO = Path(__file__).resolve().parents[1]


def _batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, len(NAMES), (n,), generator=g)


def _roles(m) -> dict[str, set[str]]:  # type: ignore[no-untyped-def]
    out: dict[str, set[str]] = {"global": set(), "local": set()}
    for name, role in m.parameter_roles().items():
        if role is not Role.FROZEN:
            out[role.value].add(name.split(".")[0])
    return out


@pytest.mark.parametrize(
    ("kwargs", "glob", "local"),
    [
        ({}, {"prompt", "adapter"}, {"lowrank"}),
        ({"adapter": "local"}, {"prompt"}, {"lowrank", "adapter"}),
        ({"adapter": "none"}, {"prompt"}, {"lowrank"}),
    ],
)
def test_flora_roles_per_adapter_mode(kwargs: dict, glob: set, local: set) -> None:
    m = FLORA(class_names=NAMES, n_ctx=4, rank=2, **kwargs)
    assert _roles(m) == {"global": glob, "local": local}
    assert (m.adapter is None) == (kwargs.get("adapter") == "none")


def test_fedpgp_roles() -> None:
    assert _roles(FedPGP(class_names=NAMES, n_ctx=4, rank=2)) == {"global": {"prompt"}, "local": {"lowrank"}}
    with pytest.raises(ValueError, match="adapter"):
        FLORA(class_names=NAMES, adapter="sometimes")


def test_orthogonality_penalty_gradient_is_the_norms_and_vanishes_at_orthonormal_b() -> None:
    """Value: the Frobenius norm. Gradient: the norm's, except near 0 where the norm's direction is rounding noise."""
    from flora.prompts import ORTHO_GRAD_FLOOR

    def plain(B: torch.Tensor) -> torch.Tensor:
        return torch.linalg.matrix_norm(B.mT @ B - torch.eye(B.shape[-1], dtype=B.dtype)).sum()

    gen = torch.Generator().manual_seed(0)
    for B in (
        torch.randn(16, 8, generator=gen, dtype=torch.float64),
        torch.linalg.qr(torch.randn(16, 8, generator=gen, dtype=torch.float64))[0],
    ):
        ours, ref = B.clone().requires_grad_(), B.clone().requires_grad_()
        value, expected = orthogonality_penalty(ours), plain(ref)
        value.backward(), expected.backward()
        torch.testing.assert_close(value, expected, atol=1e-12, rtol=0)
        if float(expected) > ORTHO_GRAD_FLOOR:  # away from orthonormal: the norm's gradient
            torch.testing.assert_close(ours.grad, ref.grad, atol=1e-12, rtol=0)
        else:  # orthonormal to working precision: the norm's gradient is a unit-size push in a noise direction
            assert float(ref.grad.norm()) == pytest.approx(2.0, rel=1e-6)
            assert float(ours.grad.norm()) < 1e-9
    # under autocast the Gram matrix is float32: a bf16 one would be off by ~1e-2 at unit columns
    q = torch.linalg.qr(torch.randn(16, 8, generator=gen))[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = orthogonality_penalty(q)
        bf16 = plain(q)
    assert mixed.dtype == torch.float32 and float(mixed) < 1e-5 and float(bf16) > 1e-3


def test_ortho_grad_floor_zero_gives_the_norms_own_gradient() -> None:
    """``ortho_grad_floor=0``: the Frobenius norm's gradient also at orthonormal B (and zero, not NaN, at X = 0)."""
    gen = torch.Generator().manual_seed(1)
    q = torch.linalg.qr(torch.randn(16, 8, generator=gen, dtype=torch.float64))[0]
    ours, ref = q.clone().requires_grad_(), q.clone().requires_grad_()
    orthogonality_penalty(ours, grad_floor=0.0).backward()
    torch.linalg.matrix_norm(ref.mT @ ref - torch.eye(8, dtype=ref.dtype)).backward()
    torch.testing.assert_close(ours.grad, ref.grad, atol=1e-9, rtol=1e-6)
    assert float(ours.grad.norm()) == pytest.approx(2.0, rel=1e-6)  # the unit-size push of the norm
    exact = torch.eye(16, 8, dtype=torch.float64, requires_grad=True)  # B^T B - I is exactly 0
    orthogonality_penalty(exact, grad_floor=0.0).backward()
    assert exact.grad is not None and torch.equal(exact.grad, torch.zeros_like(exact))
    with pytest.raises(ValueError, match="grad_floor"):
        orthogonality_penalty(q, grad_floor=-1.0)
    # the method passes its option to both the one-client and the stacked penalty
    m = FLORA(class_names=NAMES, n_ctx=4, rank=2, ortho_grad_floor=0.0)
    assert m.hparams.ortho_grad_floor == 0.0
    B = torch.linalg.qr(torch.randn(4, 2, generator=gen))[0]
    for floor, vanishes in ((0.0, False), (1e-4, True)):  # B is orthonormal to float32 precision
        m.ortho_grad_floor = floor
        with torch.no_grad():
            m.lowrank.B.copy_(B)
        m.lowrank.B.grad = None
        m.regularisers()["ortho"].backward()
        stacked = B.clone().unsqueeze(0).requires_grad_()
        params = {"lowrank.B": stacked, "lowrank.A": m.lowrank.A.detach().unsqueeze(0)}
        l2_of_b = m.l2_weight * torch.linalg.matrix_norm(stacked).sum()
        (m.stacked_regularisers(params).sum() - l2_of_b).backward()
        # ortho_weight 0.1 x the norm's unit-size push, or that push scaled down by ||X|| / 1e-4
        assert (float(m.lowrank.B.grad.norm()) < 1e-2) == vanishes
        torch.testing.assert_close(stacked.grad[0], m.lowrank.B.grad, atol=1e-6, rtol=1e-5)
    with pytest.raises(FloraConfigError, match="ortho_grad_floor"):
        FLORA(class_names=NAMES, n_ctx=4, rank=2, ortho_grad_floor=-1.0)


def test_orthonormal_init_and_penalty() -> None:
    term = LowRankTerm(16, 32, rank=8, orthonormal=True)
    torch.testing.assert_close(term.B.T @ term.B, torch.eye(8), atol=1e-5, rtol=0)
    assert float(orthogonality_penalty(term.B.detach())) < 1e-5
    with torch.no_grad():
        term.B.mul_(2.0)
    # B^T B = 4 I  ->  ||3 I||_F = 3 sqrt(8)
    assert float(orthogonality_penalty(term.B)) == pytest.approx(3 * math.sqrt(8), rel=1e-5)
    # a stack of prompt sets sums the per-set norms
    assert float(orthogonality_penalty(torch.stack([term.B, term.B]))) == pytest.approx(
        6 * math.sqrt(8), rel=1e-5
    )
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = LowRankTerm(4, 8, 2), LowRankTerm(4, 8, 2)
    a.reset_parameters(gen_a), b.reset_parameters(gen_b)
    assert torch.equal(a.B, b.B) and torch.equal(a.A, b.A)
    assert (
        FLORA(class_names=NAMES, n_ctx=4, rank=2).lowrank.orthonormal
        and not FedPGP(class_names=NAMES, n_ctx=4, rank=2).lowrank.orthonormal
    )


@pytest.mark.parametrize("adapter", ["global", "local"])
def test_flora_reset_gives_the_specified_initialisation(adapter: str) -> None:
    """The real method's resets: sigma, A ~ N(0, 0.02); B orthonormal columns (QR of a Gaussian); adapter default."""
    n_ctx, rank = 16, 8
    m = FLORA(class_names=NAMES, n_ctx=n_ctx, rank=rank, adapter=adapter)
    width = m.backbone.token_width
    with torch.no_grad():  # whatever construction left behind must not survive the resets
        m.lowrank.B.mul_(3.0).add_(1.0)
        m.lowrank.A.fill_(1.0)
        m.prompt.ctx.fill_(1.0)
    assert m.adapter is not None
    adapter_before = {k: v.detach().clone() for k, v in m.adapter.state_dict().items()}
    m.reset_local_parameters(torch.Generator().manual_seed(4))
    B, A = m.lowrank.B.detach(), m.lowrank.A.detach()
    assert B.shape == (n_ctx, rank) and A.shape == (rank, width)
    torch.testing.assert_close(B.T @ B, torch.eye(rank), atol=1e-5, rtol=0)  # B^T B = I_r
    assert float(m.regularisers()["ortho"]) < 1e-5  # the orthogonality penalty starts at 0
    # B is the Q of a QR decomposition of a Gaussian drawn from the client's generator (up to column signs)
    q, _ = torch.linalg.qr(torch.randn(n_ctx, rank, generator=torch.Generator().manual_seed(4)))
    torch.testing.assert_close((q.T @ B).abs(), torch.eye(rank), atol=1e-5, rtol=0)
    # A ~ N(0, 0.02): 1024 draws, mean within 4 standard errors, std within 15 %
    assert abs(float(A.mean())) < 4 * 0.02 / math.sqrt(A.numel())
    assert float(A.std()) == pytest.approx(0.02, rel=0.15)
    assert torch.equal(m.prompt.ctx.detach(), torch.ones(n_ctx, width))  # the global prompt is not local
    adapter_after = m.adapter.state_dict()
    changed = any(not torch.equal(adapter_after[k], v) for k, v in adapter_before.items())
    assert changed == (adapter == "local")  # a local adapter is a new client's tensor too
    # the same generator gives the same client; another one another client
    again = FLORA(class_names=NAMES, n_ctx=n_ctx, rank=rank, adapter=adapter)
    again.reset_local_parameters(torch.Generator().manual_seed(4))
    assert torch.equal(again.lowrank.B, m.lowrank.B) and torch.equal(again.lowrank.A, m.lowrank.A)
    again.reset_local_parameters(torch.Generator().manual_seed(5))
    assert not torch.allclose(again.lowrank.B, m.lowrank.B)
    # sigma ~ N(0, 0.02); a global adapter starts from PyTorch's default Linear init, U(+-1/sqrt(d))
    m.reset_global_parameters(torch.Generator().manual_seed(6))
    sigma = m.prompt.ctx.detach()
    assert abs(float(sigma.mean())) < 4 * 0.02 / math.sqrt(sigma.numel())
    assert float(sigma.std()) == pytest.approx(0.02, rel=0.15)
    bound = 1 / math.sqrt(m.backbone.embed_dim)
    for layer in (m.adapter.fc1, m.adapter.fc2):
        assert float(layer.weight.abs().max()) <= bound and float(layer.weight.std()) == pytest.approx(
            bound / math.sqrt(3), rel=0.15
        )


def test_fedpgp_u_is_gaussian_not_orthonormal() -> None:
    m = FedPGP(class_names=NAMES, n_ctx=16, rank=8)
    m.reset_local_parameters(torch.Generator().manual_seed(4))
    U = m.lowrank.B.detach()
    assert float(U.std()) == pytest.approx(0.02, rel=0.3)  # 128 draws
    assert float(orthogonality_penalty(U)) > 1.0  # far from orthonormal: U^T U ~ 0.0064 I


def test_image_adapter_is_softmax_over_features() -> None:
    adapter = ImageAdapter(6)
    f = torch.randn(3, 6)
    a = adapter.gate(f)
    torch.testing.assert_close(a.sum(-1), torch.ones(3))
    torch.testing.assert_close(adapter(f), F.normalize(a * f, dim=-1))


def _hand_loss(m: FedPGP, x: torch.Tensor, y: torch.Tensor, flora: bool) -> dict[str, torch.Tensor]:
    """Every term computed separately, with two text-tower calls and explicit formulas."""
    prompts = m.class_prompts
    sigma, BA = m.prompt.ctx, m.lowrank.B @ m.lowrank.A
    zP = m.backbone.encode_prompted(sigma + BA, prompts)
    zG = m.backbone.encode_prompted(sigma, prompts)
    f_raw = m.backbone.encode_image(x)
    if flora:
        a = torch.softmax(m.adapter.fc2(torch.relu(m.adapter.fc1(f_raw))), dim=-1)
        f = (a * f_raw) / (a * f_raw).norm(dim=-1, keepdim=True)
    else:
        f = f_raw / f_raw.norm(dim=-1, keepdim=True)
    logits = m.backbone.logit_scale * f @ zP.T
    ce = -torch.log_softmax(logits, -1)[torch.arange(len(y)), y].mean()
    z0 = m.anchor
    cos = lambda u, v: (u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1))  # noqa: E731
    pos = cos(z0, zG) / m.tau
    neg = (cos(z0, zP) if flora else cos(zG, zP)) / m.tau
    con = (-(pos - torch.logsumexp(torch.stack([pos, neg]), 0))).mean()
    out = {"ce": ce, "con": m.mu * con}
    if flora:
        A, B = m.lowrank.A, m.lowrank.B
        out["l2"] = m.l2_weight * (A.pow(2).sum().sqrt() + B.pow(2).sum().sqrt())
        out["ortho"] = m.ortho_weight * (B.T @ B - torch.eye(B.shape[1])).pow(2).sum().sqrt()
    return out


@pytest.mark.parametrize("cls", [FedPGP, FLORA])
def test_each_loss_term_matches_hand_computation(cls: type[FedPGP]) -> None:
    torch.manual_seed(0)
    m = cls(class_names=NAMES, n_ctx=4, rank=2, mu=0.7, tau=0.3)
    with torch.no_grad():  # move away from the init so that every term is non-trivial
        m.lowrank.B.add_(0.3 * torch.randn_like(m.lowrank.B))
        m.lowrank.A.add_(0.05 * torch.randn_like(m.lowrank.A))
    x, y = _batch()
    loss, parts = m.compute_loss(x, y)
    hand = _hand_loss(m, x, y, flora=cls is FLORA)
    assert set(parts) == set(hand)
    for key, value in hand.items():
        assert float(value) > 0, key
        torch.testing.assert_close(parts[key], value.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss.detach(), sum(v.detach() for v in hand.values()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", [FedPGP, FLORA])
def test_text_tower_once_per_step_and_anchor_cached(
    cls: type[FedPGP], monkeypatch: pytest.MonkeyPatch
) -> None:
    m = cls(class_names=NAMES, n_ctx=4, rank=2)
    calls = {"text": 0, "anchor": 0}
    run_text, anchor = m.backbone._run_tower, m.backbone.anchor_features

    def counting_text(*a, **k):  # type: ignore[no-untyped-def]
        calls["text"] += 1
        return run_text(*a, **k)

    def counting_anchor(*a, **k):  # type: ignore[no-untyped-def]
        calls["anchor"] += 1
        return anchor(*a, **k)

    monkeypatch.setattr(m.backbone, "_run_tower", counting_text)
    monkeypatch.setattr(m.backbone, "anchor_features", counting_anchor)
    x, y = _batch()
    m.train()
    for step in range(3):
        loss = m.training_step((x, y), step)
        loss.backward()
    assert calls == {"text": 3, "anchor": 0}


@pytest.mark.parametrize("cls", [FedPGP, FLORA])
def test_plain_lightning_trainer(cls: type[FedPGP]) -> None:
    L.seed_everything(0)
    m = cls(class_names=NAMES, n_ctx=4, rank=2, lr=0.01)
    before = {k: v.detach().clone() for k, v in m.named_parameters() if v.requires_grad}
    x, y = _batch(12)
    trainer = L.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(m, DataLoader(TensorDataset(x, y), batch_size=4))
    changed = [
        k for k, v in m.named_parameters() if v.requires_grad and not torch.equal(v.detach(), before[k])
    ]
    assert {k.split(".")[0] for k in changed} >= {"prompt", "lowrank"}


def test_global_only_drops_every_local_part() -> None:
    m = FLORA(class_names=NAMES, n_ctx=4, rank=2, adapter="local").eval()
    with torch.no_grad():
        m.lowrank.B.add_(1.0)
    x, _ = _batch(3)
    with torch.no_grad(), m.global_only():
        got = m(x)
        f = F.normalize(m.backbone.encode_image(x), dim=-1)
        expected = m.backbone.logit_scale * f @ m.backbone.encode_prompted(m.prompt.ctx, m.class_prompts).T
    torch.testing.assert_close(got, expected)
    with torch.no_grad():
        assert not torch.allclose(m(x), got)  # outside the context the local parts are back


def _fit(tmp_path: Path, root: Path, model, rounds: int = 2, ckpt_path: str | None = None):  # type: ignore[no-untyped-def]
    trainer = FederatedTrainer(rounds=rounds, output_dir=str(tmp_path / "runs"), name="t", progress=False)
    dm = FederatedDataModule(str(root), batch_size=8, base_novel=True)
    return trainer, trainer.fit(model, dm, ckpt_path=ckpt_path)


def test_base_novel_protocol_in_summary(tmp_path: Path, tiny_bn_root: Path) -> None:
    _, summary = _fit(tmp_path, tiny_bn_root, FLORA(n_ctx=4, rank=2, lr=0.01))
    final = summary["final"]
    for key in (
        "local_acc_mean",
        "base_acc_mean",
        "novel_acc_mean",
        "novel_global_acc_mean",
        "hm",
        "global_acc",
    ):
        assert 0.0 <= final[key] <= 100.0, key
    accs = [final["local_acc_mean"], final["base_acc_mean"], final["novel_acc_mean"]]
    assert final["hm"] == pytest.approx(3 / sum(1 / a for a in accs))
    record = json.loads((tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["novel_acc_mean"] == final["novel_acc_mean"]


def test_novel_evaluation_uses_novel_classes_only(tmp_path: Path, tiny_bn_root: Path) -> None:
    trainer, _ = _fit(tmp_path, tiny_bn_root, FedPGP(n_ctx=4, rank=2), rounds=1)
    dm = trainer.dm
    assert dm.class_names == ["red circle", "red square", "red triangle", "green circle", "green square"]
    assert dm.novel_class_names == ["green triangle", "blue circle", "blue square", "blue triangle"]
    # training data holds base classes only
    for cid in range(dm.num_clients):
        _, labels = dm.read_split(cid, "train")
        assert labels.max() < 5
    _, novel_labels = dm._read("novel", "test")
    assert sorted(set(novel_labels.tolist())) == [0, 1, 2, 3]
    assert trainer.module.class_names == dm.class_names  # the task is restored after novel evaluation


def test_checkpoint_restores_flora_local_tensors(tmp_path: Path, tiny_bn_root: Path) -> None:
    first, _ = _fit(tmp_path, tiny_bn_root, FLORA(n_ctx=4, rank=2, adapter="local"), rounds=1)
    again, _ = _fit(
        tmp_path, tiny_bn_root, FLORA(n_ctx=4, rank=2, adapter="local"), rounds=1, ckpt_path="last"
    )
    for cid in range(first.dm.num_clients):
        a, b = first.store.get(cid), again.store.get(cid)
        assert a is not None and b is not None and set(a.local) == set(b.local)
        assert {k.split(".")[0] for k in a.local} == {"lowrank", "adapter"}
        for k in a.local:
            assert torch.equal(a.local[k], b.local[k]), (cid, k)
        assert torch.equal(a.optim["state"][0]["momentum_buffer"], b.optim["state"][0]["momentum_buffer"])


@pytest.mark.parametrize("name", ["flora", "fedpgp", "promptfl", "promptfl_ft", "promptamp", "pfedprompt"])
def test_synthetic_configs_finish_with_full_protocol(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from flora.cli import main

    monkeypatch.setenv("WANDB_MODE", "disabled")
    config = REPO / "configs" / "synthetic"
    args = ["fit", "--config", str(config / "base.yaml"), "--config", str(config / f"{name}.yaml")]
    args += [
        "--trainer.rounds",
        "1",
        "--trainer.output_dir",
        str(tmp_path / "runs"),
        "--data.root",
        str(tmp_path / "data"),
    ]
    assert main(args) == 0
    summary = json.loads(next((tmp_path / "runs").glob("*/summary.json")).read_text())
    assert {"local_acc_mean", "base_acc_mean", "novel_acc_mean", "hm"} <= set(summary["final"])
    out = capsys.readouterr().out
    assert " HM" in out and "novel" in out
