"""Methods as LightningModules: roles, gradients, FedAvg, and plain lightning.Trainer use."""

from __future__ import annotations

import re
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from flora.errors import FloraConfigError
from flora.methods import (
    FLORA,
    CoOpModule,
    FederatedPromptModule,
    FedOTP,
    FedPGP,
    LocalCoOp,
    PFedMoAP,
    PFedPrompt,
    PromptAMP,
    PromptFL,
    PromptFLFT,
    PromptPer,
    PromptProx,
    Role,
    ZeroShotCLIP,
)

NAMES = ["red circle", "red square", "blue circle", "blue square"]


def _batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, len(NAMES), (n,), generator=g)


def test_parameter_roles() -> None:
    assert set(PromptFL(class_names=NAMES, n_ctx=4).parameter_roles().values()) == {Role.GLOBAL}
    assert set(LocalCoOp(class_names=NAMES, n_ctx=4).parameter_roles().values()) == {Role.LOCAL}
    assert ZeroShotCLIP(class_names=NAMES).parameter_roles() == {}
    m = PromptFL(class_names=NAMES, n_ctx=4)
    assert list(m.global_state()) == ["prompt.ctx"] and m.local_state() == {}
    assert not ZeroShotCLIP(class_names=NAMES).is_trainable


def test_undeclared_trainable_parameter_is_rejected() -> None:
    m = PromptFL(class_names=NAMES, n_ctx=4)
    m.extra = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(TypeError, match="extra"):
        m.parameter_roles()


def test_gradients_reach_only_learned_tensors() -> None:
    m = PromptFL(class_names=NAMES, n_ctx=4)
    m.train()
    x, y = _batch()
    loss, _ = m.compute_loss(x, y)
    loss.backward()
    assert m.prompt.ctx.grad is not None and m.prompt.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.backbone.parameters())
    assert all(not p.requires_grad for p in m.backbone.parameters())


def test_state_copies_do_not_alias_parameters() -> None:
    m = PromptFL(class_names=NAMES, n_ctx=4)
    state = m.global_state()
    assert state["prompt.ctx"].data_ptr() != m.prompt.ctx.data_ptr()
    with torch.no_grad():
        m.prompt.ctx.add_(1.0)
    assert not torch.equal(state["prompt.ctx"], m.prompt.ctx.detach())


def test_fedavg_is_sample_weighted() -> None:
    m = PromptFL(class_names=NAMES, n_ctx=2)
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
    m = PromptFL(class_names=NAMES, n_ctx=4)
    with pytest.raises(KeyError, match="missing"):
        m.load_global_state({})
    with pytest.raises(ValueError, match="shape"):
        m.load_global_state({"prompt.ctx": torch.zeros(3, 3)})


def test_cached_features_give_same_logits_as_images() -> None:
    m = PromptFL(class_names=NAMES, n_ctx=4).eval()
    x, _ = _batch(4)
    with torch.no_grad():
        feats = m.image_features(x)
        torch.testing.assert_close(m(feats), m(x))


@pytest.mark.parametrize("cls", [PromptFL, LocalCoOp])
def test_plain_lightning_trainer(cls: type[FederatedPromptModule]) -> None:
    L.seed_everything(0)
    m = cls(class_names=NAMES, n_ctx=4, lr=0.01)
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
    with torch.no_grad():  # in percent, as flora fit reports accuracy
        expected = 100.0 * float((m.eval()(x).argmax(-1) == y).float().mean())
    assert res["val_acc"] == pytest.approx(expected)


def test_nan_loss_is_a_clear_error() -> None:
    m = PromptFL(class_names=NAMES, n_ctx=4)
    with torch.no_grad():
        m.prompt.ctx.fill_(float("nan"))
    x, y = _batch(4)
    with pytest.raises(FloatingPointError, match="non-finite"):
        m.training_step((x, y), 0)


def _all_methods() -> list[type[FederatedPromptModule]]:
    from flora.methods import REGISTRY

    return list(REGISTRY.values())


@pytest.mark.parametrize("cls", _all_methods(), ids=lambda c: c.__name__)
def test_initialisation_comes_only_from_the_trainers_generators(cls: type[FederatedPromptModule]) -> None:
    """Every learned tensor is set by reset_*_parameters: the global RNG's history must not matter."""
    states = []
    for noise in (0, 1):
        torch.manual_seed(noise)  # a different global RNG state at construction
        m = cls(class_names=NAMES)
        m.reset_global_parameters(torch.Generator().manual_seed(7))
        m.reset_local_parameters(torch.Generator().manual_seed(8))
        states.append({**m.global_state(), **m.local_state()})
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), f"{cls.__name__}.{k} depends on the global RNG"


@pytest.mark.parametrize("cls", _all_methods(), ids=lambda c: c.__name__)
def test_roles_found_without_the_backbone_walk_are_the_full_walks(cls: type[FederatedPromptModule]) -> None:
    """Parameter lookups skip the frozen backbone's modules; what they find is what the full walk finds."""
    m = cls(class_names=NAMES)
    outside = [(n, p) for n, p in m.named_parameters() if not n.startswith("backbone.")]
    assert [(n, id(p)) for n, p in m._named_parameters_outside_backbone()] == [(n, id(p)) for n, p in outside]
    named = dict(m.named_parameters())
    for role in Role:
        expected = {n: named[n] for n, r in m.parameter_roles().items() if r is role}
        assert {n: id(p) for n, p in m._params_with_role(role).items()} == {
            n: id(p) for n, p in expected.items()
        }
    # a method that gives backbone parameters a role (CMFL's LoRA) still finds them
    if any(n.startswith("backbone.") for n in m.parameter_roles()):
        assert any(n.startswith("backbone.") for n in m._params_with_role(Role.LOCAL))


def test_moving_the_module_drops_cached_text_features() -> None:
    m = PromptFL(class_names=NAMES, n_ctx=4).eval()
    x, _ = _batch(2)
    with torch.no_grad():
        m(x)
    assert m._eval_text is not None
    m.to(torch.float64)  # any .to()/.cuda()/.half(): the cache would be on the old device/dtype
    assert m._eval_text is None
    with torch.no_grad():
        m(x.double())
    assert m._eval_text is not None and m._eval_text.dtype == torch.float64  # rebuilt after the move


def test_a_task_set_again_reuses_its_prompt_tokens_and_anchor() -> None:
    """Base -> novel -> base (every base-to-novel evaluation): the base task is not tokenised and encoded again."""
    m = PromptFL(class_names=NAMES, n_ctx=4).eval()
    novel = ["green star", "yellow moon", "green moon"]
    encoded = []
    anchor_features = m.backbone.anchor_features
    m.backbone.anchor_features = lambda names, *a: encoded.append(list(names)) or anchor_features(names, *a)  # type: ignore[method-assign]
    base_prompts, base_anchor = m.class_prompts, m.anchor.clone()
    m.set_task(novel)
    assert encoded == [novel] and m.anchor.shape[0] == 3 and m.class_names == novel
    fresh_novel = anchor_features(novel)
    assert torch.equal(m.anchor, fresh_novel)
    m.set_task(NAMES)
    m.set_task(novel)
    assert encoded == [novel]  # each task encoded once
    assert torch.equal(m.anchor, fresh_novel)
    m.set_task(NAMES)
    assert m.class_prompts is base_prompts and torch.equal(m.anchor, base_anchor) and m.class_names == NAMES
    assert m.num_classes == len(NAMES)
    with torch.no_grad():  # the evaluation on the restored task is that of a fresh module
        x = torch.randn(5, m.anchor.shape[-1], generator=torch.Generator().manual_seed(1))
        fresh = PromptFL(class_names=NAMES, n_ctx=4).eval()
        fresh.load_state_dict(m.state_dict())
        assert torch.equal(m(x), fresh(x))
    m.to(torch.float64)  # a move drops the kept tasks: they are on the old dtype/device
    m.set_task(novel)
    assert encoded == [novel, novel] and m.anchor.dtype == torch.float64


def test_evaluation_shares_class_features_between_clients_with_equal_inputs() -> None:
    """One client after another: the global model's features are computed once, each personal model's its own."""
    from flora.methods import FLORA

    m = FLORA(class_names=NAMES, n_ctx=4, rank=2).eval()
    calls = []
    run_tower = m.backbone._run_tower
    m.backbone._run_tower = lambda *a, **k: calls.append(1) or run_tower(*a, **k)  # type: ignore[method-assign]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, m.anchor.shape[-1], generator=gen)
    shared = m.global_state()
    clients = [{n: torch.randn(t.shape, generator=gen) for n, t in m.local_state().items()} for _ in range(2)]

    def evaluate(local: dict, global_state: dict = shared) -> tuple[torch.Tensor, torch.Tensor]:
        m.load_global_state(global_state)
        m.load_local_state(local)
        with torch.no_grad():
            personal = m(x)
            with m.global_only():
                return personal, m(x)

    def uncached(local: dict, global_state: dict = shared) -> tuple[torch.Tensor, torch.Tensor]:
        m.share_eval_text = False
        try:
            return evaluate(local, global_state)
        finally:
            del m.share_eval_text

    first = evaluate(clients[0])
    assert len(calls) == 2  # personal and global features
    second = evaluate(clients[1])
    assert len(calls) == 3  # its own personal features; the global model's are reused
    for got, expected in zip((*first, *second), (*uncached(clients[0]), *uncached(clients[1])), strict=True):
        assert torch.equal(got, expected)
    assert not torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    calls.clear()
    evaluate(clients[0])  # the last entry of a kind is kept: client 1's personal features are not client 0's
    assert len(calls) == 1
    # one changed value in the global prompt: computed again, and right
    changed = {n: t.clone() for n, t in shared.items()}
    changed["prompt.ctx"][0, 0] += 1e-3
    calls.clear()
    got = evaluate(clients[0], changed)
    assert len(calls) == 2
    assert all(torch.equal(a, b) for a, b in zip(got, uncached(clients[0], changed), strict=True))
    # a move to another dtype or device drops what was kept
    m.double()
    calls.clear()
    with torch.no_grad(), m.global_only():
        m(x.double())
    assert len(calls) == 1


@pytest.mark.parametrize("method", ["PromptFL", "FLORA"])
def test_a_federated_evaluation_with_shared_features_reports_the_same_metrics(
    tmp_path, tiny_root, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from flora.data import FederatedDataModule
    from flora.federated import FederatedTrainer
    from flora.methods import REGISTRY

    cls = REGISTRY[method]
    records = {}
    for share in (True, False):
        monkeypatch.setattr(cls, "share_eval_text", share)
        FederatedTrainer(
            rounds=2, local_epochs=1, output_dir=str(tmp_path), name=f"s{share}", progress=False, loggers=[]
        ).fit(
            # a random backbone: accuracies far from 100 %
            cls(n_ctx=4, clip_pretrained=None, **({"rank": 2} if method == "FLORA" else {})),
            FederatedDataModule(str(tiny_root)),
        )
        lines = (tmp_path / f"s{share}" / "metrics.jsonl").read_text().splitlines()
        records[share] = [{k: v for k, v in json.loads(x).items() if "time" not in k} for x in lines]
    assert [r["local_acc_clients"] for r in records[True]] == [r["local_acc_clients"] for r in records[False]]
    assert [r.get("global_acc") for r in records[True]] == [r.get("global_acc") for r in records[False]]
    assert records[True][-1]["local_acc_mean"] == records[False][-1]["local_acc_mean"]


# ------------------------------------------------------------------ option ranges
# (method, options, the exact one-line message)
BAD_OPTIONS: list[tuple[type[FederatedPromptModule], dict[str, Any], str]] = [
    # shared by every method (checked once, in FederatedPromptModule)
    (PromptFL, {"lr": -0.1}, "model.lr must be > 0, got -0.1"),
    (ZeroShotCLIP, {"lr": 0}, "model.lr must be > 0, got 0"),
    (FLORA, {"lr": float("nan")}, "model.lr must be > 0, got nan"),
    (PromptFL, {"lr": float("inf")}, "model.lr must be finite, got inf"),
    (PromptFL, {"lr": "fast"}, "model.lr must be a number, got 'fast'"),
    (FedOTP, {"weight_decay": -1e-4}, "model.weight_decay must be >= 0, got -0.0001"),
    (PromptFL, {"momentum": 1.0}, "model.momentum must be in [0, 1), got 1.0"),
    (PFedMoAP, {"momentum": -0.5}, "model.momentum must be in [0, 1), got -0.5"),
    (
        PromptFL,
        {"template": "a photo"},
        "model.template must contain {} where the class name goes, got 'a photo'",
    ),
    # every learned context
    (PromptFL, {"n_ctx": 0}, "model.n_ctx must be >= 1, got 0"),
    (LocalCoOp, {"n_ctx": 2.5}, "model.n_ctx must be an integer, got 2.5"),
    (FedOTP, {"n_ctx": -3}, "model.n_ctx must be >= 1, got -3"),
    (PFedPrompt, {"ctx_init_std": -0.02}, "model.ctx_init_std must be >= 0, got -0.02"),
    (
        PromptPer,
        {"n_local": 0},
        "model.n_local must be >= 1, got 0: PromptPer needs at least one global and one local token "
        "(n_local=0 is PromptFL, n_global=0 is Local CoOp)",
    ),
    (
        PromptPer,
        {"n_global": -1},
        "model.n_global must be >= 1, got -1: PromptPer needs at least one global and one local token "
        "(n_local=0 is PromptFL, n_global=0 is Local CoOp)",
    ),
    # each method's own options
    (PromptFLFT, {"ft_epochs": -1}, "model.ft_epochs must be >= 0, got -1"),
    (PromptProx, {"mu": -0.5}, "model.mu must be >= 0, got -0.5"),
    (PromptAMP, {"lam": -1.0}, "model.lam must be >= 0, got -1.0"),
    (PromptAMP, {"self_weight": 1.5}, "model.self_weight must be in [0, 1], got 1.5"),
    (PromptAMP, {"sigma": 0.0}, "model.sigma must be > 0, got 0.0"),
    (FedPGP, {"rank": 0}, "model.rank must be >= 1, got 0"),
    (FedPGP, {"mu": -1.0}, "model.mu must be >= 0, got -1.0"),
    (FedPGP, {"tau": 0.0}, "model.tau must be > 0, got 0.0"),
    (
        FLORA,
        {"n_ctx": 4, "rank": 8},
        "model.rank must be <= model.n_ctx (4) so that B (4 x rank) can have orthonormal columns, got 8",
    ),
    (FLORA, {"tau": -0.5}, "model.tau must be > 0, got -0.5"),
    (FLORA, {"l2_weight": -0.01}, "model.l2_weight must be >= 0, got -0.01"),
    (FLORA, {"ortho_weight": -0.1}, "model.ortho_weight must be >= 0, got -0.1"),
    (
        FLORA,
        {"adapter": "sometimes"},
        "model.adapter must be one of 'global', 'local', 'none', got 'sometimes'",
    ),
    (FedOTP, {"gamma": 0.0}, "model.gamma must be in (0, 1], got 0.0"),
    (FedOTP, {"gamma": 1.5}, "model.gamma must be in (0, 1], got 1.5"),
    (FedOTP, {"eps": 0.0}, "model.eps must be > 0, got 0.0"),
    (FedOTP, {"ot_max_iter": 0}, "model.ot_max_iter must be >= 1, got 0"),
    (FedOTP, {"ot_tol": -1e-3}, "model.ot_tol must be >= 0, got -0.001"),
    (PFedPrompt, {"alpha": -1.0}, "model.alpha must be >= 0, got -1.0"),
    (PFedPrompt, {"beta": -5.5}, "model.beta must be >= 0, got -5.5"),
    (
        PFedPrompt,
        {"lfa_features": "pixels"},
        "model.lfa_features must be one of 'patch', 'global', got 'pixels'",
    ),
    (PFedMoAP, {"num_experts": 0}, "model.num_experts must be >= 1, got 0"),
    (PFedMoAP, {"gate_width": 0}, "model.gate_width must be >= 1, got 0"),
    (PFedMoAP, {"gate_heads": 0}, "model.gate_heads must be >= 1, got 0"),
    (PFedMoAP, {"gate_width": 100}, "model.gate_width (100) must be divisible by model.gate_heads (8)"),
    (PFedMoAP, {"gate_scale": 0.0}, "model.gate_scale must be > 0, got 0.0"),
    (PFedMoAP, {"lam": -0.5}, "model.lam must be >= 0, got -0.5"),
    (PFedMoAP, {"gate_lr": 0.0}, "model.gate_lr must be > 0, got 0.0"),
]


@pytest.mark.parametrize(
    ("cls", "options", "message"),
    BAD_OPTIONS,
    ids=[f"{c.__name__}-{'-'.join(o)}" for c, o, _ in BAD_OPTIONS],
)
def test_out_of_range_options_are_config_errors(
    cls: type[FederatedPromptModule], options: dict[str, Any], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused at construction, before the backbone is loaded, with a one-line message naming the option."""
    import flora.methods.base as base

    def no_backbone(*a: Any, **k: Any) -> None:
        raise AssertionError("the backbone was loaded before the options were checked")

    monkeypatch.setattr(base, "CLIPBackbone", no_backbone)
    with pytest.raises(FloraConfigError, match=f"^{re.escape(message)}$"):
        cls(class_names=NAMES, **options)


def test_context_must_fit_the_text_encoder() -> None:
    """The tiny CLIP's text context is 32 tokens: start, context, class name, full stop, end."""
    limit = "must be <= 28 for clip_model 'flora-tiny' (its text context holds 32 tokens"
    with pytest.raises(FloraConfigError, match=f"^{re.escape('model.n_ctx ' + limit)}"):
        PromptFL(class_names=NAMES, n_ctx=29)
    with pytest.raises(FloraConfigError, match=f"^{re.escape('model.n_global + model.n_local ' + limit)}"):
        PromptPer(n_global=20, n_local=9)
    with pytest.raises(FloraConfigError, match="needs 35 tokens, more than the text context length 32"):
        PromptFL(class_names=["x " * 16], n_ctx=16)  # a class name too long for its prompt
    assert PromptFL(class_names=["x"], n_ctx=28).num_classes == 1  # the longest context fits a one-token name


@pytest.mark.parametrize(
    ("cls", "options"),
    [
        (PromptFL, {"lr": 1, "momentum": 0, "weight_decay": 0, "n_ctx": 1, "ctx_init_std": 0}),
        (PromptFLFT, {"ft_epochs": 0}),
        (PromptAMP, {"lam": 0, "self_weight": 1.0, "sigma": None}),
        (FLORA, {"n_ctx": 4, "rank": 4, "mu": 0, "l2_weight": 0, "ortho_weight": 0, "adapter": "none"}),
        (FedPGP, {"n_ctx": 2, "rank": 8}),  # U needs no orthonormal columns
        (FedOTP, {"gamma": 1.0, "ot_tol": 0}),
        (PFedPrompt, {"alpha": 0, "beta": 0, "lfa_features": "global"}),
        (PFedMoAP, {"gate_width": 16, "gate_heads": 16, "lam": 0}),
        (ZeroShotCLIP, {"template": "itap of a {}"}),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "",
)
def test_options_at_the_edge_of_their_range_are_accepted(
    cls: type[FederatedPromptModule], options: dict[str, Any]
) -> None:
    cls(class_names=NAMES, **options)


# ------------------------------------------------------------------ constructor options
SHARED_OPTIONS = {
    "class_names",
    "clip_model",
    "clip_pretrained",
    "template",
    "lr",
    "momentum",
    "weight_decay",
}


@pytest.mark.parametrize("cls", _all_methods(), ids=lambda c: c.__name__)
def test_every_option_reaches_the_command_line_with_its_default(cls: type[FederatedPromptModule]) -> None:
    """Options passed on with ``**kwargs`` are still listed, with the defaults in effect, by jsonargparse
    (what ``flora fit --model ... --print_config`` shows) and by ``inspect.signature``."""
    import inspect

    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(cls, "model")
    cli = vars(parser.get_defaults().model)
    signature = {name: p.default for name, p in inspect.signature(cls).parameters.items()}
    assert cli == signature
    assert SHARED_OPTIONS <= set(cli)
    assert cli["lr"] == (1e-3 if cls is FLORA else 2e-3)  # FLORA's own default learning rate
    if issubclass(cls, CoOpModule):
        assert {"n_ctx", "ctx_init_std"} <= set(cli) and cli["n_ctx"] == 16


@pytest.mark.parametrize("cls", _all_methods(), ids=lambda c: c.__name__)
def test_hparams_record_every_option(cls: type[FederatedPromptModule]) -> None:
    """Lightning's ``save_hyperparameters`` follows ``**kwargs`` too: every option but the task, as given."""
    import inspect

    signature = inspect.signature(cls).parameters
    small = {"n_ctx": 4, "rank": 2, "n_global": 2, "n_local": 2, "num_experts": 2}
    given = {"lr": 0.03, **{k: v for k, v in small.items() if k in signature}}
    m = cls(class_names=NAMES, **given)
    expected = {name: p.default for name, p in signature.items() if name != "class_names"}
    assert dict(m.hparams) == {**expected, **given}
