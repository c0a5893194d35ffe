"""Clients trained together (trainer.client_batch) give what training them one by one gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flora.data import FederatedDataModule
from flora.errors import FloraConfigWarning
from flora.federated import FederatedTrainer
from flora.federated.vectorised import why_sequential
from flora.methods import (
    FLORA,
    FedOTP,
    FedPGP,
    LocalCoOp,
    PromptAMP,
    PromptFL,
    PromptFLFT,
    PromptPer,
    PromptProx,
)

OPTS = dict(n_ctx=4, lr=0.01, clip_model="flora-tiny")
RANKED = dict(rank=2)  # FedPGP, FLORA: rank <= n_ctx


def _fit(tmp: Path, root: Path, method: type, **kw: object) -> tuple[dict, list[dict], dict]:
    args = dict(rounds=2, local_epochs=2, output_dir=str(tmp / "runs"), name="t", progress=False, seed=0)
    module = method(**_options(method))
    summary = FederatedTrainer(**{**args, **kw}).fit(module, FederatedDataModule(str(root), batch_size=8))
    run = tmp / "runs" / "t"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    return summary, records, ckpt


def _options(method: type) -> dict:
    if method is PromptPer:
        return {**{k: v for k, v in OPTS.items() if k != "n_ctx"}, "n_global": 2, "n_local": 2}
    ranked = method in (FedPGP, FLORA) or getattr(method, "__name__", "").startswith("_flora")
    return {**OPTS, **(RANKED if ranked else {})}


def _close(a: object, b: object, where: str) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for key in a:
            _close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, torch.Tensor):
        # momentum buffers sum gradients that a logit scale of 100 makes sensitive to the float32
        # reordering of a batched text tower (one client per call is bit-exact: test below)
        if ".optim." in where:
            # (a masking error, a step too many or too few, is off by tens of percent)
            assert float((a - b).norm() / a.norm().clamp_min(1e-12)) < 1e-2, where
        else:
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0, msg=lambda m: f"{where}: {m}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, abs=1e-5), where
    else:
        assert a == b, where


@pytest.mark.parametrize(
    "method", [PromptFL, PromptPer, PromptProx, FedPGP, FLORA, "local adapter", "none adapter"]
)
def test_stacked_losses_and_gradients_are_each_clients_own_in_float64(method: type | str) -> None:
    """Random values for every trainable tensor of 3 clients: the stacked pass is each client's own loss."""
    if isinstance(method, str):
        module = FLORA(adapter=method.split()[0], **_options(FLORA)).double()
    else:
        module = method(**_options(method)).double()
    module.set_task([f"class {i}" for i in range(9)])
    module.load_global_state(module.global_state())  # what a client receives (PromptProx's proximal target)
    gen = torch.Generator().manual_seed(0)
    named = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert set(named) >= {"prompt.ctx"}
    values = {n: torch.randn(3, *p.shape, generator=gen, dtype=torch.float64) * 0.1 for n, p in named.items()}
    # tensors that differ between clients without being trained: random too, set per client below
    constants = {
        n: torch.randn(3, *t.shape, generator=gen, dtype=torch.float64) * 0.1
        for n, t in module.client_constants().items()
    }
    assert bool(constants) == (method is PromptProx)
    width = module.backbone.anchor_features(["x"]).shape[-1]
    batches = [
        (torch.randn(n, width, generator=gen, dtype=torch.float64), torch.randint(0, 9, (n,), generator=gen))
        for n in (8, 5, 1)
    ]
    stacked = {n: torch.nn.Parameter(v.clone()) for n, v in values.items()}
    losses = module.stacked_losses({**stacked, **constants}, batches)
    losses.sum().backward()
    for k, (x, y) in enumerate(batches):
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(values[n][k])
            for n, c in constants.items():
                setattr(module, n, c[k].clone())
        module.zero_grad()
        loss, _ = module.compute_loss(x, y)
        loss.backward()
        # float64 everywhere but the image side of methods without an adapter, which computes in
        # float32 (as compute_loss does); a wrong formula is off by far more than 1e-6
        assert abs(float(loss) - float(losses[k])) < 1e-6
        for n, p in named.items():
            torch.testing.assert_close(stacked[n].grad[k], p.grad, atol=1e-6, rtol=0, msg=n)


def _flora_local_adapter(**kw: object) -> FLORA:
    return FLORA(adapter="local", **kw)


@pytest.mark.parametrize(
    "method",
    [PromptFL, LocalCoOp, PromptFLFT, PromptPer, PromptProx, PromptAMP, FedPGP, FLORA, _flora_local_adapter],
)
def test_clients_trained_together_match_clients_trained_one_by_one(
    tmp_path: Path, tiny_root: Path, method: type
) -> None:
    """4 clients of different sizes (so some run out of batches first), 2 epochs, persistent momentum."""
    sizes = [c["num_train"] for c in json.loads((tiny_root / "manifest.json").read_text())["clients"]]
    assert len(set(sizes)) > 1
    one = _fit(tmp_path / "one", tiny_root, method)
    together = _fit(tmp_path / "together", tiny_root, method, client_batch=4)
    _close(one[2]["global_state"], together[2]["global_state"], "global_state")
    _close(one[2]["clients"], together[2]["clients"], "client states")  # local tensors and momentum
    for a, b in zip(one[1], together[1], strict=True):
        for key in ("train_loss", "local_acc_mean", "local_acc_clients", "global_acc"):
            if key in a:
                _close(a[key], b[key], f"round {a['round']} {key}")


def test_one_client_per_call_is_bit_exact(
    tmp_path: Path, tiny_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stacking, the shared optimiser, the idle-slice restore and the stored state add no error of their own."""
    import flora.federated.vectorised as vectorised

    together = vectorised.train_together
    monkeypatch.setattr(
        vectorised,
        "train_together",
        lambda runner, ids, r, g: [x for c in ids for x in together(runner, [c], r, g)],
    )
    one = _fit(tmp_path / "one", tiny_root, LocalCoOp, max_steps_per_round=3)
    single = _fit(tmp_path / "single", tiny_root, LocalCoOp, max_steps_per_round=3, client_batch=4)
    for cid, state in one[2]["clients"].items():
        other = single[2]["clients"][cid]
        assert torch.equal(state["local"]["prompt.ctx"], other["local"]["prompt.ctx"])
        assert torch.equal(
            state["optim"]["state"][0]["momentum_buffer"], other["optim"]["state"][0]["momentum_buffer"]
        )
        assert state["optim"]["param_groups"] == other["optim"]["param_groups"]


def test_a_step_cap_and_a_batch_smaller_than_the_round_match_too(tmp_path: Path, tiny_root: Path) -> None:
    """client_batch 3 over 4 clients (a batch of 3, then 1), at most 3 steps per client."""
    one = _fit(tmp_path / "one", tiny_root, LocalCoOp, max_steps_per_round=3)
    together = _fit(tmp_path / "together", tiny_root, LocalCoOp, max_steps_per_round=3, client_batch=3)
    _close(one[2]["clients"], together[2]["clients"], "client states")
    _close(one[1][-1]["local_acc_clients"], together[1][-1]["local_acc_clients"], "accuracy")


class _PromptFLWithAnotherLoss(PromptFL):
    def compute_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        loss, parts = super().compute_loss(x, y)
        return 2 * loss, parts


class _PromptFLPreparingEachClient(PromptFL):
    vectorised = True

    def before_local_training(self, batches: object) -> None:
        pass


def test_methods_that_do_not_declare_it_or_cannot_are_trained_one_by_one(
    tmp_path: Path, tiny_root: Path
) -> None:
    from flora.federated.client import ClientRunner

    def reason(module: object, **dm: object) -> str | None:
        data = FederatedDataModule(str(tiny_root), **dm)  # type: ignore[arg-type]
        data.setup()
        runner = ClientRunner.__new__(ClientRunner)
        runner.module, runner.profile = module, False
        runner.use_features = data.uses_feature_cache
        return why_sequential(runner)

    assert reason(PromptFL(**OPTS)) is None
    # a subclass that changes the loss does not inherit the declaration
    assert (
        reason(_PromptFLWithAnotherLoss(**OPTS))
        == "_PromptFLWithAnotherLoss does not declare vectorised training"
    )
    assert reason(FedOTP(**OPTS)) == "FedOTP does not declare vectorised training"
    assert "feature cache is off" in str(reason(PromptFL(**OPTS), feature_cache="off"))
    # a per-client preparation (e.g. pFedPrompt's memory) is module state, not stacked: one by one
    assert "before_local_training" in str(reason(_PromptFLPreparingEachClient(**OPTS)))
    # and such a method trains exactly as with client_batch 1
    one = _fit(tmp_path / "one", tiny_root, _PromptFLWithAnotherLoss, rounds=1)
    with pytest.warns(
        FloraConfigWarning, match=r"client_batch=4 has no effect: .*WithAnotherLoss does not declare"
    ):
        batched = _fit(tmp_path / "b", tiny_root, _PromptFLWithAnotherLoss, rounds=1, client_batch=4)
    assert torch.equal(one[2]["global_state"]["prompt.ctx"], batched[2]["global_state"]["prompt.ctx"])
    with pytest.raises(Exception, match="trainer.client_batch must be >= 1, got 0"):
        FederatedTrainer(client_batch=0)


def test_a_non_finite_loss_of_one_client_names_it(
    tmp_path: Path, tiny_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The losses stay on the device, but a non-finite one still stops the round, naming its client."""
    stacked = PromptFL.stacked_losses

    def poisoned(self: PromptFL, params: dict, batches: list) -> torch.Tensor:
        losses = stacked(self, params, batches)
        return (
            losses * torch.tensor([1.0] * (len(batches) - 1) + [float("nan")]) if len(batches) > 1 else losses
        )

    monkeypatch.setattr(PromptFL, "stacked_losses", poisoned)
    with pytest.raises(
        FloatingPointError, match=r"round 1, client 3: PromptFL: non-finite training loss \(nan\)"
    ):
        _fit(tmp_path, tiny_root, PromptFL, rounds=1, client_batch=4)


@pytest.mark.parametrize("options", [{"optimizer_state": "reset"}, {"state_store": "disk"}], ids=str)
def test_reset_optimisers_and_a_disk_store_match_too(tmp_path: Path, tiny_root: Path, options: dict) -> None:
    """A fresh optimiser every turn (zero momentum, nothing stored) and client states on disk."""
    one = _fit(tmp_path / "one", tiny_root, FLORA, **options)
    together = _fit(tmp_path / "together", tiny_root, FLORA, client_batch=4, **options)
    _close(one[2]["global_state"], together[2]["global_state"], "global_state")
    _close(one[2]["clients"], together[2]["clients"], "client states")
    if options.get("optimizer_state") == "reset":
        assert all(state["optim"] is None for state in together[2]["clients"].values())
    _close(one[1][-1]["local_acc_clients"], together[1][-1]["local_acc_clients"], "accuracy")


def test_clients_trained_together_on_two_devices_match_one_device_one_by_one(
    tmp_path: Path, tiny_root: Path
) -> None:
    """Each rank stacks its own share of the round's clients: the device count still changes nothing."""
    one = _fit(tmp_path / "one", tiny_root, FLORA)
    two = _fit(
        tmp_path / "two", tiny_root, FLORA, client_batch=4, accelerator="cpu", devices=2, strategy="ddp_spawn"
    )
    _close(one[2]["global_state"], two[2]["global_state"], "global_state")
    _close(one[2]["clients"], two[2]["clients"], "client states")
    for a, b in zip(one[1], two[1], strict=True):
        for key in ("train_loss", "local_acc_mean", "local_acc_clients"):
            _close(a[key], b[key], f"round {a['round']} {key}")
