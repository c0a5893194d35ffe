"""CMFL: words exchanged without labels, images generated from them, LoRA fine-tuning of the image tower."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from flora.data import FederatedDataModule
from flora.errors import FloraConfigError
from flora.federated import FederatedTrainer
from flora.methods import CMFL, Role, Upload

NAMES = ["red circle", "blue square", "green triangle"]
SMALL = dict(diffusion_steps=1, guidance_scale=1.0, images_per_embedding=1)


@pytest.fixture(scope="module")
def model() -> CMFL:
    m = CMFL(class_names=NAMES, **SMALL)
    m.reset_local_parameters(torch.Generator().manual_seed(0))
    return m


def _batch(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.arange(n) % len(NAMES)


def _invert_and_upload(m: CMFL, y: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    m.phase = "invert"
    m.train()
    m.before_local_training([])
    x, _ = _batch(len(y))
    m.compute_loss(x, y)
    torch.manual_seed(seed)
    return m.upload_state()


def test_roles_only_lora_and_embeddings_learn(model: CMFL) -> None:
    roles = model.parameter_roles()
    learned = {n for n, r in roles.items() if r is not Role.FROZEN}
    assert "embeddings.rows" in learned
    lora = {n for n in learned if n.startswith("backbone.")}
    assert lora and all(".lora_" in n for n in lora)
    assert not any(r is Role.GLOBAL for r in roles.values()) and not model.has_global_model
    assert all(not p.requires_grad for n, p in model.diffusion.named_parameters())
    assert CMFL.feature_kind == "image" and CMFL.round_phases == ("invert", "train")


def test_upload_is_shuffled_unlabelled_words_of_present_classes(model: CMFL) -> None:
    up = _invert_and_upload(model, torch.tensor([2, 0, 2, 0]))  # class 1 absent
    assert sorted(up) == ["word.0", "word.1"]
    words = model.embeddings.words()
    sent = [up["word.0"], up["word.1"]]
    assert {int(i) for i, w in enumerate(words) for s in sent if torch.equal(w, s)} == {0, 2}
    orders = set()
    for seed in range(8):  # the order follows the CPU RNG, not the class index
        up = _invert_and_upload(model, torch.tensor([2, 0, 2, 0]), seed)
        orders.add(torch.equal(up["word.0"], words[0]))
    assert orders == {True, False}


def test_a_client_never_receives_its_own_words(model: CMFL) -> None:
    model.phase = "invert"
    a = {"word.0": torch.full((2, 4), 0.0), "word.1": torch.full((1, 4), 1.0)}
    b = {"word.0": torch.full((2, 4), 2.0)}
    c = {"word.0": torch.full((3, 4), 3.0)}
    assert model.aggregate([Upload(5, 1, c), Upload(0, 1, a), Upload(3, 1, b)], {}) == {}
    model.phase = "train"
    got = model.download_state(0, {})
    assert list(got) == ["recv.0", "recv.1"]  # b then c (sender order), never a's own
    assert float(got["recv.0"][0, 0]) == 2.0 and float(got["recv.1"][0, 0]) == 3.0
    assert len(model.download_state(3, {})) == 3 and len(model.download_state(9, {})) == 4
    model.aggregate([], {})  # the round ends: the server keeps nothing
    assert model.download_state(0, {}) == {} and model.server_state_dict() == {}


def _with_generated(m: CMFL, weight: float) -> tuple[torch.Tensor, ...]:
    """A train-phase loss on a real batch with 3 generated pairs, and the pairs themselves."""
    m.phase = "train"
    m.eval()  # eval mode changes nothing for CMFL's loss (the backbone always runs in eval mode)
    m.generated_weight = weight
    gx, _ = _batch(3, seed=5)
    gy = torch.tensor([1, 1, 2])
    m.generated_x, m.generated_y, m._cursor = gx, gy, 0
    x, y = _batch(4)
    with torch.no_grad():
        loss, _ = m.compute_loss(x, y)
    return loss, x, y, gx, gy


def test_generated_weight_is_per_sample(model: CMFL) -> None:
    loss0, x, y, gx, gy = _with_generated(model, 0.0)
    loss1, *_ = _with_generated(model, 1.0)
    loss_half, *_ = _with_generated(model, 0.5)
    with torch.no_grad():
        ce = F.cross_entropy(model(torch.cat([x, gx])), torch.cat([y, gy]), reduction="none")
    real, gen = ce[:4], ce[4:]
    torch.testing.assert_close(loss0, real.mean(), rtol=1e-6, atol=1e-6)  # weight 0: dropped
    torch.testing.assert_close(loss1, ce.mean(), rtol=1e-6, atol=1e-6)  # weight 1: as real
    torch.testing.assert_close(loss_half, (real.sum() + 0.5 * gen.sum()) / 5.5, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(loss0, loss1)
    model.generated_weight = 0.1


def test_generation_is_deterministic_under_a_seed(model: CMFL) -> None:
    model.phase = "train"
    model.received = [w.detach().clone() for w in model.embeddings.words()[:2]]
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        with torch.no_grad():
            model.before_local_training([])
        runs.append((model.generated_x.clone(), model.generated_y.clone()))
    assert runs[0][0].shape == (2, 3, 32, 32)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[2][0])
    # each received word is labelled with the nearest own class: its own rows give their own class
    assert runs[0][1].tolist() == [0, 1]
    model.received = []


def test_generator_reads_the_text_layer_it_was_trained_on(model: CMFL) -> None:
    """``text_skip_layers`` picks the hidden states of an earlier block: other conditioning, other images."""
    model.phase = "train"
    model.received = [w.detach().clone() for w in model.embeddings.words()[:2]]
    images = []
    for skip in (0, 1):
        model.text_skip_layers = skip
        torch.manual_seed(0)
        with torch.no_grad():
            model.before_local_training([])
        images.append(model.generated_x.clone())
    model.text_skip_layers, model.received = 0, []
    assert not torch.equal(images[0], images[1])
    with pytest.raises(FloraConfigError, match="model.text_skip_layers"):
        CMFL(text_skip_layers=-1)


def test_invert_trains_only_embeddings_and_train_only_lora(model: CMFL) -> None:
    opt = model.configure_optimizers()
    assert len(opt.param_groups) == 2
    x, y = _batch(4)
    for phase in ("invert", "train"):
        model.phase = phase
        model.train()
        model.before_local_training([])
        opt.zero_grad(set_to_none=True)
        model.compute_loss(x, y)[0].backward()
        emb_grad = model.embeddings.rows.grad is not None
        lora_grad = all(d.lora_A.grad is not None and d.lora_B.grad is not None for d in model.lora)
        assert (emb_grad, lora_grad) == ((True, False) if phase == "invert" else (False, True)), phase
    opt.zero_grad(set_to_none=True)


def test_missing_extra_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(FloraConfigError) as err:
        CMFL(class_names=NAMES)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("CMFL needs the optional extra 'cmfl'")
    assert "pip install 'flora[cmfl]'" in msg
    # flora.methods itself imports without the extra
    code = "import sys; sys.modules['diffusers'] = None; import flora.methods"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


@pytest.mark.parametrize(
    "options, message",
    [
        ({"generated_weight": -1}, "model.generated_weight must be >= 0, got -1"),
        ({"lora_r": 0}, "model.lora_r must be >= 1, got 0"),
        ({"images_per_embedding": 1.5}, "model.images_per_embedding must be an integer, got 1.5"),
    ],
)
def test_options_are_checked(options: dict[str, Any], message: str) -> None:
    with pytest.raises(FloraConfigError, match=message):
        CMFL(class_names=NAMES, **options)


class Spy(CMFL):
    """Records the shape of every training input (raw images, since the feature cache must be off)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.input_dims: set[int] = set()
        self.generated: list[int] = []

    def compute_loss(self, x, y):  # type: ignore[no-untyped-def]
        self.input_dims.add(x.dim())
        return super().compute_loss(x, y)

    def before_local_training(self, batches):  # type: ignore[no-untyped-def]
        super().before_local_training(batches)
        if self.phase == "train":
            self.generated.append(len(self.generated_y))


def test_short_federated_fit(tmp_path: Path, tiny_root: Path) -> None:
    module = Spy(**SMALL, lora_lr=1e-3)
    backbone = {k: v.clone() for k, v in module.backbone.state_dict().items() if ".lora_" not in k}
    diffusion = {k: v.clone() for k, v in module.diffusion.state_dict().items()}
    trainer = FederatedTrainer(
        rounds=1, clients_per_round=2, output_dir=str(tmp_path), name="c", progress=False, seed=0
    )
    dm = FederatedDataModule(root=str(tiny_root), batch_size=16, feature_cache="memory")
    summary = trainer.fit(module, dm)
    assert not trainer.clients.use_features and module.input_dims == {4}
    assert 0.0 <= summary["final"]["local_acc_mean"] <= 100.0
    assert len(module.generated) == 2 and all(n > 0 for n in module.generated)
    for k, v in module.backbone.state_dict().items():
        if ".lora_" not in k:
            assert torch.equal(v, backbone[k]), k
    for k, v in module.diffusion.state_dict().items():
        assert torch.equal(v, diffusion[k]), k
    states = [trainer.store.get(c) for c in range(4)]
    trained = [s.local for s in states if s is not None]
    assert len(trained) == 2
    for local in trained:  # both parts moved from their initial values
        assert not torch.equal(local["embeddings.rows"], module.embeddings.initial.cpu())
        assert any(float(v.abs().sum()) > 0 for k, v in local.items() if k.endswith("lora_B"))


def test_two_devices_match_one(tmp_path: Path, tiny_root: Path) -> None:
    """The round's clients split over two processes: the same words exchanged, the same metrics."""

    def fit(name: str, **kw: Any) -> dict[str, Any]:
        trainer = FederatedTrainer(
            rounds=1, clients_per_round=2, output_dir=str(tmp_path), name=name, progress=False, seed=0, **kw
        )
        return trainer.fit(
            CMFL(**SMALL, lora_lr=1e-3), FederatedDataModule(root=str(tiny_root), batch_size=16)
        )

    one = fit("one")
    two = fit("two", accelerator="cpu", devices=2, strategy="ddp_spawn")
    for key, value in one["final"].items():
        if not key.startswith(("time", "wall")) and isinstance(value, float):
            assert two["final"][key] == pytest.approx(value, abs=1e-4), key


def test_diffusion_option_picks_the_shipped_random_or_a_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    import flora.methods.cmfl as cmfl_module
    from flora.diffusion import load_shipped

    shipped = CMFL(class_names=NAMES, **SMALL).diffusion.state_dict()
    expected = load_shipped().state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in shipped.items())
    random = CMFL(class_names=NAMES, **SMALL, diffusion="tiny-random").diffusion.state_dict()
    assert any(not torch.equal(v, expected[k]) for k, v in random.items())
    # a generator made for another text width is refused by name, with the hint for the shipped one
    from flora.diffusion import build_tiny

    monkeypatch.setattr(cmfl_module, "load_shipped", lambda: build_tiny(64))
    with pytest.raises(FloraConfigError) as err:
        CMFL(class_names=NAMES, **SMALL)
    assert str(err.value) == (
        "model.diffusion 'tiny' attends to 64-wide text states; the CLIP text tower of flora-tiny gives 128 "
        "(the shipped 'tiny' generator is made for clip_model flora-tiny)"
    )


def test_a_sent_word_discloses_its_class_name_by_nearest_token_lookup() -> None:
    """What docs/fidelity.md says plainly: the words carry no label, yet a receiver recovers the class names."""
    names = ["red circle", "blue square", "green triangle", "purple star", "orange heart"]
    m = CMFL(class_names=names, **SMALL)
    m.reset_local_parameters(torch.Generator().manual_seed(0))
    opt = m.configure_optimizers()
    m.phase = "invert"
    m.train()
    m.before_local_training([])
    y = torch.tensor([3, 1, 3, 1])
    for step in range(20):  # a client's inversion: the rows move away from the names' own rows
        opt.zero_grad(set_to_none=True)
        m.compute_loss(_batch(4, seed=step)[0], y)[0].backward()
        opt.step()
    torch.manual_seed(0)
    sent = list(m.upload_state().values())
    backbone = m.backbone
    vocabulary = names + ["yellow circle", "cyan square", "pink diamond", "brown cross", "grey moon"]
    table = backbone.model.token_embedding.weight.detach()

    def rows(name: str) -> torch.Tensor:
        ids = backbone.tokenize([name])[0]
        return table[ids[1 : int(ids.argmax())]]

    decoded = set()
    for word in sent:
        same_length = [n for n in vocabulary if len(rows(n)) == len(word)]
        assert all(not torch.equal(word, rows(n)) for n in same_length)  # trained, not a copy of a name
        decoded.add(min(same_length, key=lambda n: float((rows(n) - word).norm())))
    assert decoded == {"blue square", "purple star"}
