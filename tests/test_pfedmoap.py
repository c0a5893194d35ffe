"""pFedMoAP: the nearest other clients' prompts as frozen experts, mixed by a local attention gate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flora.data import FederatedDataModule
from flora.federated import FederatedTrainer
from flora.methods import PFedMoAP, Role
from flora.methods.pfedmoap import ExpertGate, feature_pool

NAMES = ["red circle", "blue square", "green triangle"]


def _with_pool(m: PFedMoAP, prompts: dict[int, torch.Tensor]) -> None:
    m.aggregate(
        [(c, 1, {"prompt.ctx": p}) for c, p in prompts.items()], {"prompt.ctx": torch.zeros_like(prompts[0])}
    )


def test_experts_are_the_nearest_other_clients() -> None:
    m = PFedMoAP(class_names=NAMES, n_ctx=2, num_experts=2)
    assert m.parameter_roles()["prompt.ctx"] is Role.GLOBAL
    assert all(r is Role.LOCAL for n, r in m.parameter_roles().items() if n.startswith("gate."))
    w = m.backbone.token_width
    _with_pool(
        m,
        {
            0: torch.zeros(2, w),
            1: torch.full((2, w), 0.1),
            2: torch.full((2, w), 5.0),
            3: torch.full((2, w), 0.3),
        },
    )
    assert m.experts_of(0) == [1, 3]  # nearest first, itself excluded
    assert m.experts_of(7) == []  # never uploaded: plain CoOp
    g = {"prompt.ctx": torch.ones(2, w)}
    down = m.download_state(0, g)
    assert set(down) == {"prompt.ctx", "expert.0", "expert.1"}
    torch.testing.assert_close(down["expert.1"], torch.full((2, w), 0.3))
    m.load_global_state(down)
    torch.testing.assert_close(m.prompt.ctx.detach(), g["prompt.ctx"])  # P_i <- P_g
    assert m.expert_prompts is not None and m.expert_prompts.shape == (2, 2, w)
    other = PFedMoAP(class_names=NAMES, n_ctx=2, num_experts=2)
    other.load_server_state_dict(m.server_state_dict())
    assert other.experts_of(0) == [1, 3]


def test_gate_scale_and_mixture() -> None:
    gate = ExpertGate(width=16, heads=4, scale=10.0)
    gate.reset_parameters(torch.Generator().manual_seed(0))
    q, keys = torch.randn(3, 16), torch.randn(5, 4, 16)
    out = gate(q, keys)
    assert out.shape == (3, 5, 16)
    # torch's attention with the fixed scale 10, one class at a time
    for c in range(5):
        qh = gate.q(q).view(3, 4, 1, 4)  # (B, heads, 1 query, head dim)
        kh = gate.k(keys[c]).view(4, 4, 4).transpose(0, 1).expand(3, -1, -1, -1)  # (B, heads, E, dh)
        vh = gate.v(keys[c]).view(4, 4, 4).transpose(0, 1).expand(3, -1, -1, -1)
        ref = F.scaled_dot_product_attention(qh, kh, vh, scale=10.0).reshape(3, 16)
        torch.testing.assert_close(out[:, c], gate.out(ref), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        ExpertGate(width=10, heads=4)
    assert feature_pool(torch.arange(8.0).view(1, 8), 4).tolist() == [[0.5, 2.5, 4.5, 6.5]]


def test_logits_mix_experts_and_local() -> None:
    m = PFedMoAP(class_names=NAMES, n_ctx=2, num_experts=2, lam=0.5).eval()
    m.gate.reset_parameters(torch.Generator().manual_seed(0))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = m(x)  # no experts yet: plain CoOp logits
        f = m.image_side(m.image_features(x))
        torch.testing.assert_close(plain, m.logits_from(f, m.text_features()))
        w = m.backbone.token_width
        m.load_global_state(
            {"prompt.ctx": m.prompt.ctx.clone(), "expert.0": torch.randn(2, w), "expert.1": torch.randn(2, w)}
        )
        mixed = m(x)
        with m.global_only():
            glob = m(x)
    torch.testing.assert_close(glob, plain)  # the global part alone ignores experts and gate
    text = m.text_features()
    keys = torch.cat([feature_pool(text, 128).unsqueeze(1), m.expert_text().transpose(0, 1)], dim=1)  # type: ignore[union-attr]
    query = feature_pool(f, 128)
    moe = m.backbone.logit_scale * torch.einsum(
        "bd,bcd->bc", F.normalize(query, dim=-1), F.normalize(m.gate(query, keys), dim=-1)
    )
    torch.testing.assert_close(mixed, moe + 0.5 * plain, rtol=1e-4, atol=1e-4)
    # the gate and the prompt learn at their own rates
    groups = m.configure_optimizers().param_groups
    assert [g["lr"] for g in groups] == [m.hparams.lr, 0.01]


def test_federated_run_and_resume(tmp_path: Path, tiny_root: Path) -> None:
    def dm() -> FederatedDataModule:
        return FederatedDataModule(root=str(tiny_root), batch_size=8)

    full_t = FederatedTrainer(rounds=2, output_dir=str(tmp_path / "a"), name="m", progress=False, seed=0)
    full = full_t.fit(PFedMoAP(n_ctx=2, num_experts=2, lr=0.01), dm())
    assert sorted(full_t.module.pool) == [0, 1, 2, 3]  # type: ignore[attr-defined]
    assert set(full_t.global_state) == {"prompt.ctx"}
    gates = [full_t.store.get(c).local["gate.q.weight"] for c in range(4)]  # type: ignore[union-attr]
    assert not torch.equal(gates[0], gates[1])  # every client trains its own gate
    # round 2 downloads the prompt and two experts per client
    records = [r for r in full_t.history if r["round"] == 2]
    prompt_bytes = full_t.global_state["prompt.ctx"].numel() * 4
    assert records[0]["bytes_down"] == 4 * 3 * prompt_bytes
    FederatedTrainer(rounds=1, output_dir=str(tmp_path / "b"), name="m", progress=False, seed=0).fit(
        PFedMoAP(n_ctx=2, num_experts=2, lr=0.01), dm()
    )
    resumed = FederatedTrainer(
        rounds=2, output_dir=str(tmp_path / "b"), name="m", progress=False, seed=0
    ).fit(PFedMoAP(n_ctx=2, num_experts=2, lr=0.01), dm(), ckpt_path="last")
    assert resumed["final"]["local_acc_mean"] == pytest.approx(full["final"]["local_acc_mean"], abs=1e-6)


def test_experts_follow_the_module_when_it_moves() -> None:
    """Downloaded experts and their cached features are buffers: .to() moves them with the prompt."""
    m = PFedMoAP(class_names=NAMES, n_ctx=2, num_experts=1)
    w = m.backbone.token_width
    expert = torch.randn(1, 2, w, generator=torch.Generator().manual_seed(0))[0]
    m.load_global_state({"prompt.ctx": torch.zeros(2, w), "expert.0": expert})
    assert m.expert_text() is not None
    m.to(torch.float64)
    assert m.expert_prompts is not None and m.expert_prompts.dtype == torch.float64
    assert m._expert_text is not None and m._expert_text.dtype == torch.float64
    torch.testing.assert_close(m.expert_prompts[0], expert.double())
    assert "expert_prompts" not in m.state_dict()  # never checkpointed: downloaded every round


def test_gate_initialisation_is_drawn_on_the_cpu() -> None:
    """The trainer's generators are CPU generators: the gate is drawn there and copied (any device)."""
    gate = ExpertGate(width=16, heads=4)
    gate.reset_parameters(torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    bound = 1 / 16**0.5
    for layer in (gate.q, gate.k, gate.v, gate.out):
        torch.testing.assert_close(layer.weight, torch.empty(16, 16).uniform_(-bound, bound, generator=gen))
        torch.testing.assert_close(layer.bias, torch.empty(16).uniform_(-bound, bound, generator=gen))
