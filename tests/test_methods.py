"""Methods as LightningModules: roles, gradients, FedAvg, and plain lightning.Trainer use."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from flora.methods import FederatedPromptModule, LocalCoOp, PromptFL, Role, ZeroShotCLIP

NAMES = ["red circle", "red square", "blue circle", "blue square"]


def _batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, len(NAMES), (n,), generator=g)


def test_parameter_roles() -> None:
    assert set(PromptFL(NAMES, n_ctx=4).parameter_roles().values()) == {Role.GLOBAL}
    assert set(LocalCoOp(NAMES, n_ctx=4).parameter_roles().values()) == {Role.LOCAL}
    assert ZeroShotCLIP(NAMES).parameter_roles() == {}
    m = PromptFL(NAMES, n_ctx=4)
    assert list(m.global_state()) == ["prompt.ctx"] and m.local_state() == {}
    assert not ZeroShotCLIP(NAMES).is_trainable


def test_undeclared_trainable_parameter_is_rejected() -> None:
    m = PromptFL(NAMES, n_ctx=4)
    m.extra = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(TypeError, match="extra"):
        m.parameter_roles()


def test_gradients_reach_only_learned_tensors() -> None:
    m = PromptFL(NAMES, n_ctx=4)
    m.train()
    x, y = _batch()
    loss, _ = m.compute_loss(x, y)
    loss.backward()
    assert m.prompt.ctx.grad is not None and m.prompt.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.backbone.parameters())
    assert all(not p.requires_grad for p in m.backbone.parameters())


def test_state_copies_do_not_alias_parameters() -> None:
    m = PromptFL(NAMES, n_ctx=4)
    state = m.global_state()
    assert state["prompt.ctx"].data_ptr() != m.prompt.ctx.data_ptr()
    with torch.no_grad():
        m.prompt.ctx.add_(1.0)
    assert not torch.equal(state["prompt.ctx"], m.prompt.ctx.detach())


def test_fedavg_is_sample_weighted() -> None:
    m = PromptFL(NAMES, n_ctx=2)
    cur = m.global_state()
    ups = [
        (2, 30, {"prompt.ctx": torch.full_like(cur["prompt.ctx"], 3.0)}),
        (0, 10, {"prompt.ctx": torch.full_like(cur["prompt.ctx"], -1.0)}),
    ]
    out = m.aggregate(ups, cur)
    torch.testing.assert_close(out["prompt.ctx"], torch.full_like(cur["prompt.ctx"], (30 * 3.0 - 10) / 40))
    # order of uploads does not matter
    torch.testing.assert_close(
        m.aggregate(list(reversed(ups)), cur)["prompt.ctx"], out["prompt.ctx"], atol=0, rtol=0
    )


def test_load_state_checks_names_and_shapes() -> None:
    m = PromptFL(NAMES, n_ctx=4)
    with pytest.raises(KeyError, match="missing"):
        m.load_global_state({})
    with pytest.raises(ValueError, match="shape"):
        m.load_global_state({"prompt.ctx": torch.zeros(3, 3)})


def test_cached_features_give_same_logits_as_images() -> None:
    m = PromptFL(NAMES, n_ctx=4).eval()
    x, _ = _batch(4)
    with torch.no_grad():
        feats = m.image_features(x)
        torch.testing.assert_close(m(feats), m(x))


@pytest.mark.parametrize("cls", [PromptFL, LocalCoOp])
def test_plain_lightning_trainer(cls: type[FederatedPromptModule]) -> None:
    L.seed_everything(0)
    m = cls(NAMES, n_ctx=4, lr=0.01)
    backbone_before = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    ctx_before = m.prompt.ctx.detach().clone()
    x, y = _batch(16)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    trainer = L.Trainer(
        max_epochs=5,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with torch.no_grad():
        loss_before = torch.nn.functional.cross_entropy(m.eval()(x), y)
    trainer.fit(m, loader)
    with torch.no_grad():
        loss_after = torch.nn.functional.cross_entropy(m.eval()(x), y)
    assert not torch.equal(m.prompt.ctx.detach(), ctx_before)
    assert loss_after < loss_before
    for k, v in m.backbone.state_dict().items():
        assert torch.equal(v, backbone_before[k]), k
    (res,) = trainer.validate(m, loader, verbose=False)
    assert 0.0 <= res["val_acc"] <= 1.0


def test_nan_loss_is_a_clear_error() -> None:
    m = PromptFL(NAMES, n_ctx=4)
    with torch.no_grad():
        m.prompt.ctx.fill_(float("nan"))
    x, y = _batch(4)
    with pytest.raises(FloatingPointError, match="non-finite"):
        m.training_step((x, y), 0)


def _all_methods() -> list[type[FederatedPromptModule]]:
    import flora.methods as methods

    classes = [getattr(methods, n) for n in methods.__all__]
    return [
        c
        for c in classes
        if isinstance(c, type)
        and issubclass(c, FederatedPromptModule)
        and c.__name__ not in ("FederatedPromptModule", "CoOpModule")
    ]


@pytest.mark.parametrize("cls", _all_methods(), ids=lambda c: c.__name__)
def test_initialisation_comes_only_from_the_trainers_generators(cls: type[FederatedPromptModule]) -> None:
    """Every learned tensor is set by reset_*_parameters: the global RNG's history must not matter."""
    states = []
    for noise in (0, 1):
        torch.manual_seed(noise)  # a different global RNG state at construction
        m = cls(NAMES)
        m.reset_global_parameters(torch.Generator().manual_seed(7))
        m.reset_local_parameters(torch.Generator().manual_seed(8))
        states.append({**m.global_state(), **m.local_state()})
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), f"{cls.__name__}.{k} depends on the global RNG"
