"""PromptFL+FT, PromptPer, PromptProx and PromptAMP: what each shares, optimises and is evaluated with."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from flora.clip.backbone import run_shared_text_tower
from flora.data import FederatedDataModule
from flora.federated import FederatedTrainer
from flora.methods import PromptAMP, PromptFL, PromptFLFT, PromptPer, PromptProx, Role

NAMES = ["red circle", "blue square", "green triangle"]


def _trainer(tmp_path: Path, **kw: object) -> FederatedTrainer:
    args = dict(rounds=2, output_dir=str(tmp_path / "runs"), name="t", progress=False, seed=0)
    args.update(kw)
    return FederatedTrainer(**args)  # type: ignore[arg-type]


def _dm(root: Path, base_novel: bool = False) -> FederatedDataModule:
    return FederatedDataModule(root=str(root), batch_size=8, base_novel=base_novel)


# ------------------------------------------------------------------ PromptProx
def test_proximal_term_pulls_towards_the_received_prompt() -> None:
    m = PromptProx(class_names=NAMES, n_ctx=4, mu=0.5)
    assert float(m.proximal_term().detach()) == 0.0  # nothing received yet: plain CoOp
    received = {"prompt.ctx": torch.randn(4, m.backbone.token_width)}
    m.load_global_state(received)
    with torch.no_grad():
        m.prompt.ctx.add_(0.1)
    term = m.proximal_term()
    offset = m.prompt.ctx.detach() - received["prompt.ctx"]
    assert float(term.detach()) == pytest.approx(0.25 * float(offset.pow(2).sum()), rel=1e-5)
    term.backward()
    torch.testing.assert_close(
        m.prompt.ctx.grad, 0.5 * offset
    )  # d/dP (mu/2)||P - P_glob||^2 = mu (P - P_glob)
    # the received prompt is a constant, not a view of the parameter
    assert m.received.data_ptr() != m.prompt.ctx.data_ptr() and not m.received.requires_grad


def test_prox_keeps_uploads_closer_to_the_global_prompt(tmp_path: Path, tiny_root: Path) -> None:
    drift = {}
    for name, module in {
        "fl": PromptFL(n_ctx=4, lr=0.005),
        "prox": PromptProx(n_ctx=4, lr=0.005, mu=100.0),
    }.items():
        received: list[torch.Tensor] = []
        uploads: list[torch.Tensor] = []
        original = FederatedTrainer._train_client

        def spy(self, cid, r, original=original, received=received, uploads=uploads):  # type: ignore[no-untyped-def]
            received.append(self.global_state["prompt.ctx"].clone())
            res = original(self, cid, r)
            uploads.append(res.upload["prompt.ctx"])
            return res

        FederatedTrainer._train_client = spy  # type: ignore[method-assign]
        try:
            _trainer(tmp_path / name, rounds=1).fit(module, _dm(tiny_root))
        finally:
            FederatedTrainer._train_client = original  # type: ignore[method-assign]
        drift[name] = sum(float((u - g).norm()) for u, g in zip(uploads, received, strict=True)) / len(
            uploads
        )
    # one round of local SGD moves the prompt about half as far from what was received (0.027 vs 0.056 here)
    assert 0 < drift["prox"] < 0.7 * drift["fl"]


def test_prox_rejects_negative_mu() -> None:
    with pytest.raises(ValueError, match="mu"):
        PromptProx(class_names=NAMES, n_ctx=2, mu=-1.0)


# ------------------------------------------------------------------- PromptPer
def test_promptper_shares_only_the_global_tokens(tmp_path: Path, tiny_root: Path) -> None:
    m = PromptPer(class_names=NAMES, n_global=3, n_local=2)
    assert m.n_ctx == 5
    roles = m.parameter_roles()
    assert roles == {"prompt.ctx": Role.GLOBAL, "personal.ctx": Role.LOCAL}
    assert not m.has_global_model
    m.reset_global_parameters(torch.Generator().manual_seed(1))
    m.reset_local_parameters(torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = m.text_features()
        # both parts are part of the prompt: a random perturbation of the scale of CLIP's token
        # embeddings (std 0.02) moves every class feature by ~1e-2, 1e5 x the rounding noise
        for part in (m.personal.ctx, m.prompt.ctx):
            noise = 0.05 * torch.randn(part.shape, generator=torch.Generator().manual_seed(11))
            part.add_(noise)
            moved = (m.text_features() - before).norm(dim=-1)
            part.sub_(noise)
            assert moved.min() > 1e-3, moved
        # (why the perturbation must be random: the text tower's LayerNorms remove a constant
        # shift of a token's embedding, so adding 0.5 everywhere changes nothing but rounding)
        m.personal.ctx.add_(0.5)
        assert (m.text_features() - before).norm(dim=-1).max() < 1e-5
        m.personal.ctx.sub_(0.5)
    # and the personal tokens are trained: the loss sends them a gradient
    x, y = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 1, 2, 0])
    m.compute_loss(x, y)[0].backward()
    assert m.personal.ctx.grad is not None and m.personal.ctx.grad.norm() > 0
    assert m.prompt.ctx.grad is not None and m.prompt.ctx.grad.norm() > 0

    trainer = _trainer(tmp_path, rounds=2)
    summary = trainer.fit(PromptPer(n_global=3, n_local=2, lr=0.05), _dm(tiny_root))
    assert set(trainer.global_state) == {"prompt.ctx"}
    personal = [trainer.store.get(c).local["personal.ctx"] for c in range(4)]  # type: ignore[union-attr]
    assert not torch.equal(personal[0], personal[1])
    assert "global_acc" not in summary["final"]
    assert summary["final"]["bytes_up_total"] > 0


def test_promptper_context_is_global_then_personal(monkeypatch: pytest.MonkeyPatch) -> None:
    """The text tower sees ``[SOS] P_g P_p classname . [EOS]``: the global tokens first."""
    m = PromptPer(class_names=NAMES, n_global=3, n_local=2)
    m.reset_global_parameters(torch.Generator().manual_seed(1))
    m.reset_local_parameters(torch.Generator().manual_seed(2))
    seen: list[torch.Tensor] = []
    run_tower = m.backbone._run_tower

    def spy(tower: object, *args: torch.Tensor, **options: object) -> torch.Tensor:
        if tower is run_shared_text_tower:  # (head, tail, eot): the whole sequences are head + tail
            head, tail, _ = args
            per_head = tail.shape[0] // head.shape[0]
            seen.append(torch.cat([head.repeat_interleave(per_head, 0), tail], dim=1).detach().clone())
        else:
            seen.append(args[0].detach().clone())
        return run_tower(tower, *args, **options)

    monkeypatch.setattr(m.backbone, "_run_tower", spy)
    with torch.no_grad():
        feats = m.text_features()
    (tokens,) = seen  # (n_cls, L, d_t): one batched pass over the classes
    prompts = m.class_prompts
    assert prompts is not None and tokens.shape[:2] == (len(NAMES), prompts.length)
    for c in range(len(NAMES)):
        assert torch.equal(tokens[c, :1], prompts.prefix[c])  # [SOS]
        assert torch.equal(tokens[c, 1:4], m.prompt.ctx.detach())  # P_g: positions 1..n_global
        assert torch.equal(tokens[c, 4:6], m.personal.ctx.detach())  # P_p: the next n_local
        assert torch.equal(tokens[c, 6:], prompts.suffix[c])  # class name, full stop, [EOS]
    monkeypatch.undo()
    with torch.no_grad():  # the order matters: the swapped prompt gives other features
        swapped = m.backbone.encode_prompted(torch.cat([m.personal.ctx, m.prompt.ctx]), prompts)
        in_order = m.backbone.encode_prompted(torch.cat([m.prompt.ctx, m.personal.ctx]), prompts)
    torch.testing.assert_close(feats, in_order, rtol=0, atol=0)
    assert (feats - swapped).norm(dim=-1).min() > 1e-3


def test_promptper_needs_both_parts() -> None:
    with pytest.raises(ValueError, match="n_local=0 is PromptFL"):
        PromptPer(class_names=NAMES, n_global=4, n_local=0)


# ------------------------------------------------------------------- PromptAMP
def _amp_with(prompts: dict[int, torch.Tensor], **kw: object) -> PromptAMP:
    m = PromptAMP(class_names=NAMES, n_ctx=2, **kw)  # type: ignore[arg-type]
    m.aggregate(
        [(c, 1, {"prompt.ctx": p}) for c, p in prompts.items()], {"prompt.ctx": torch.zeros_like(prompts[0])}
    )
    return m


def test_amp_message_weights_follow_the_spec() -> None:
    width = PromptAMP(class_names=NAMES, n_ctx=2).backbone.token_width
    base = torch.zeros(2, width)
    prompts = {0: base, 1: base + 0.01, 2: base + 1.0, 3: base + 2.0}
    m = _amp_with(prompts)
    w = m.message_weights(0)
    assert w[0] == 0.5 and sum(w.values()) == pytest.approx(1.0)
    assert w[1] > w[2] > w[3]  # nearer prompts count more
    d2 = {j: float((prompts[0] - prompts[j]).pow(2).sum()) for j in (1, 2, 3)}
    pairs = sorted(float((prompts[a] - prompts[b]).pow(2).sum()) for a in prompts for b in prompts if a < b)
    sigma = float(torch.tensor(pairs).median())  # torch's median: the lower middle value
    z = sum(math.exp(-d / sigma) for d in d2.values())
    for j in (1, 2, 3):
        assert w[j] == pytest.approx(0.5 * math.exp(-d2[j] / sigma) / z, rel=1e-6)
    cloud = m.download_state(0, {"prompt.ctx": torch.zeros(2, width)})["prompt.ctx"]
    expected = sum(w[j] * prompts[j] for j in prompts)
    torch.testing.assert_close(cloud, expected)
    # a client that never trained receives the FedAvg prompt; clients are evaluated with their own
    fedavg = {"prompt.ctx": torch.full((2, width), 7.0)}
    assert m.download_state(9, fedavg) is fedavg
    torch.testing.assert_close(m.evaluation_state(2, fedavg)["prompt.ctx"], prompts[2])
    assert m.evaluation_state(9, fedavg) is fedavg


def test_amp_server_state_roundtrip_and_fixed_sigma() -> None:
    width = PromptAMP(class_names=NAMES, n_ctx=2).backbone.token_width
    prompts = {0: torch.zeros(2, width), 1: torch.ones(2, width), 2: torch.full((2, width), 3.0)}
    m = _amp_with(prompts, sigma=1e9, self_weight=0.2)
    w = m.message_weights(0)
    assert w[1] == pytest.approx(0.4, rel=1e-4) and w[2] == pytest.approx(
        0.4, rel=1e-4
    )  # huge sigma: uniform
    other = PromptAMP(class_names=NAMES, n_ctx=2, sigma=1e9, self_weight=0.2)
    other.load_server_state_dict(m.server_state_dict())
    assert other.message_weights(0) == pytest.approx(w)
    with pytest.raises(ValueError, match="self_weight"):
        PromptAMP(class_names=NAMES, n_ctx=2, self_weight=1.5)


def test_amp_federated_run_resumes_with_its_server_state(tmp_path: Path, tiny_root: Path) -> None:
    full = _trainer(tmp_path / "full", rounds=2).fit(PromptAMP(n_ctx=4, lr=0.05), _dm(tiny_root))
    assert "global_acc" not in full["final"]
    first = _trainer(tmp_path / "split", rounds=1)
    first.fit(PromptAMP(n_ctx=4, lr=0.05), _dm(tiny_root))
    assert sorted(first.module.client_prompts) == [0, 1, 2, 3]  # type: ignore[attr-defined]
    resumed = _trainer(tmp_path / "split", rounds=2).fit(
        PromptAMP(n_ctx=4, lr=0.05), _dm(tiny_root), ckpt_path="last"
    )
    assert resumed["final"]["local_acc_mean"] == pytest.approx(full["final"]["local_acc_mean"], abs=1e-6)


# ------------------------------------------------------------------ PromptFL+FT
def test_finetuned_copy_is_evaluated_but_never_uploaded(tmp_path: Path, tiny_bn_root: Path) -> None:
    plain_t = _trainer(tmp_path / "fl", rounds=1)
    # a random backbone: the shipped one solves this tiny world outright (accuracies tie at 100)
    plain = plain_t.fit(PromptFL(n_ctx=4, lr=0.05, clip_pretrained=None), _dm(tiny_bn_root, base_novel=True))
    ft_t = _trainer(tmp_path / "ft", rounds=1)
    ft = ft_t.fit(
        PromptFLFT(n_ctx=4, lr=0.05, ft_epochs=2, clip_pretrained=None), _dm(tiny_bn_root, base_novel=True)
    )
    # training and aggregation are PromptFL's: the same global prompt comes out
    torch.testing.assert_close(ft_t.global_state["prompt.ctx"], plain_t.global_state["prompt.ctx"])
    # the global part alone is the un-tuned prompt; the personalised numbers come from the tuned copies
    for key in ("global_acc", "novel_global_acc_mean"):
        assert ft["final"][key] == pytest.approx(plain["final"][key], abs=1e-6)
    assert ft["final"]["local_acc_mean"] != pytest.approx(plain["final"]["local_acc_mean"], abs=1e-6)
    # ft_epochs=0 is PromptFL
    zero = _trainer(tmp_path / "ft0", rounds=1).fit(
        PromptFLFT(n_ctx=4, lr=0.05, ft_epochs=0, clip_pretrained=None), _dm(tiny_bn_root, base_novel=True)
    )
    assert zero["final"]["local_acc_mean"] == pytest.approx(plain["final"]["local_acc_mean"], abs=1e-6)
