"""flora.diffusion: the frozen text-to-image pipeline used by CMFL (needs the dev/cmfl extra)."""

from __future__ import annotations

import importlib.util
import sys

import diffusers  # noqa: F401  (the dev extra installs it: a missing install must fail, not skip)
import pytest
import torch

import flora.diffusion as fd
from flora.diffusion import TextToImage, build_tiny, load_pretrained, require_extra
from flora.errors import FloraConfigError

WIDTH = 128  # the width of flora-tiny's text tower (CLIPBackbone("flora-tiny").token_width)
TOKENS = 8
STEPS = 3


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny networks run many small ops: with two threads on a busy 2-core machine the
    thread pool's barriers make them tens of times slower, with one they take milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe() -> TextToImage:
    return build_tiny(WIDTH, image_size=32, seed=0)


@pytest.fixture(scope="module")
def cond() -> torch.Tensor:
    return _randn(2, TOKENS, WIDTH, seed=10)


def test_tiny_pipeline_structure(pipe: TextToImage) -> None:
    assert pipe.cross_attention_dim == WIDTH
    assert pipe.image_size == 32 and pipe.vae_scale_factor == 2 and pipe.latent_channels == 4
    assert isinstance(pipe.scheduler, diffusers.DDIMScheduler)
    assert not any(p.requires_grad for p in pipe.parameters())
    pipe.train()
    assert not pipe.training and not pipe.unet.training and not pipe.vae.training
    n_bytes = sum(p.numel() * p.element_size() for p in pipe.parameters())
    assert n_bytes < 2 * 2**20, f"tiny pipeline has {n_bytes / 2**20:.1f} MB of weights"


def test_same_seed_is_bit_identical_other_seed_differs(pipe: TextToImage, cond: torch.Tensor) -> None:
    a = pipe.generate(cond, None, STEPS, 1.0, _gen(0))
    b = pipe.generate(cond, None, STEPS, 1.0, _gen(0))
    c = pipe.generate(cond, None, STEPS, 1.0, _gen(1))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
    # the generator is only read: drawing from it moves it on, the global RNG is untouched
    state = torch.get_rng_state()
    g = _gen(0)
    pipe.generate(cond, None, STEPS, 1.0, g)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(g.get_state(), _gen(0).get_state())


def test_output_shape_range_and_conditioning(pipe: TextToImage, cond: torch.Tensor) -> None:
    a = pipe.generate(cond, None, STEPS, 1.0, _gen(0))
    assert a.shape == (2, 3, 32, 32) and a.dtype == torch.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert a.std() > 1e-3  # not a constant image
    other = pipe.generate(_randn(2, TOKENS, WIDTH, seed=11), None, STEPS, 1.0, _gen(0))
    assert (a - other).abs().max() > 1e-3
    # a larger image size works (a multiple of the VAE factor)
    assert pipe.generate(cond[:1], None, 1, 1.0, _gen(0), image_size=48).shape == (1, 3, 48, 48)


def test_classifier_free_guidance(pipe: TextToImage, cond: torch.Tensor) -> None:
    uncond = _randn(1, TOKENS, WIDTH, seed=20)
    plain = pipe.generate(cond, None, STEPS, 1.0, _gen(0))
    assert torch.equal(pipe.generate(cond, uncond, STEPS, 1.0, _gen(0)), plain)
    assert torch.equal(pipe.generate(cond, None, STEPS, 5.0, _gen(0)), plain)
    guided = pipe.generate(cond, uncond, STEPS, 5.0, _gen(0))
    assert guided.shape == plain.shape and (guided - plain).abs().max() > 1e-3
    # a per-row uncond equal to the broadcast one gives the same images
    same = pipe.generate(cond, uncond.expand(2, -1, -1), STEPS, 5.0, _gen(0))
    torch.testing.assert_close(same, guided, atol=1e-5, rtol=0)
    # guidance pulls away from the unconditional images
    u_imgs = pipe.generate(uncond.expand(2, -1, -1), None, STEPS, 1.0, _gen(0))
    assert (guided - u_imgs).abs().mean() > (plain - u_imgs).abs().mean()


def test_runs_under_bf16_autocast(pipe: TextToImage, cond: torch.Tensor) -> None:
    ref = pipe.generate(cond, None, STEPS, 1.0, _gen(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pipe.generate(cond, _randn(1, TOKENS, WIDTH, seed=20), STEPS, 3.0, _gen(0))
        plain = pipe.generate(cond, None, STEPS, 1.0, _gen(0))
    assert out.dtype == torch.float32 and out.shape == ref.shape and torch.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert (plain - ref).abs().mean() < 0.1  # bf16 only perturbs the fp32 result


def test_build_tiny_is_deterministic_under_seed() -> None:
    state = torch.get_rng_state()
    a = build_tiny(32, seed=0).state_dict()
    b = build_tiny(32, seed=0).state_dict()
    c = build_tiny(32, seed=1).state_dict()
    assert torch.equal(torch.get_rng_state(), state), "build_tiny must not move the global RNG"
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert build_tiny(32, seed=0).cross_attention_dim == 32


def test_bad_inputs_are_one_line_config_errors(pipe: TextToImage, cond: torch.Tensor) -> None:
    with pytest.raises(FloraConfigError, match=r"cond must have shape \(B, L, 128\)"):
        pipe.generate(_randn(2, TOKENS, 64, seed=0), None, STEPS, 1.0, _gen(0))
    with pytest.raises(FloraConfigError, match="uncond must have shape"):
        pipe.generate(cond, _randn(2, TOKENS + 1, WIDTH, seed=0), STEPS, 2.0, _gen(0))
    with pytest.raises(FloraConfigError, match=r"steps must be in \[1, 1000\], got 0"):
        pipe.generate(cond, None, 0, 1.0, _gen(0))
    with pytest.raises(FloraConfigError, match="guidance_scale must be >= 1.0"):
        pipe.generate(cond, None, STEPS, 0.5, _gen(0))
    with pytest.raises(FloraConfigError, match="image_size must be a positive multiple of 2"):
        pipe.generate(cond, None, STEPS, 1.0, _gen(0), image_size=33)
    with pytest.raises(FloraConfigError, match="image_size must be a positive multiple of 8"):
        build_tiny(WIDTH, image_size=20)


def test_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(FloraConfigError) as info:
        require_extra("CMFL")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("CMFL needs the optional extra 'cmfl' (diffusers): pip install 'flora[cmfl]'")
    assert "diffusers could not be imported" in msg
    with pytest.raises(FloraConfigError, match=r"optional extra 'cmfl'.*pip install 'flora\[cmfl\]'"):
        build_tiny(WIDTH)
    monkeypatch.setitem(sys.modules, "diffusers", diffusers)
    monkeypatch.setitem(sys.modules, "safetensors", None)  # any module the caller names is checked
    with pytest.raises(FloraConfigError, match="safetensors could not be imported"):
        require_extra("CMFL", ("diffusers", "safetensors"))


def test_module_imports_without_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)
    spec = importlib.util.spec_from_file_location("_flora_diffusion_no_extra", fd.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # must not import diffusers at module level
    with pytest.raises(FloraConfigError, match="optional extra 'cmfl'"):
        module.build_tiny(WIDTH)


def test_load_pretrained_missing_or_incomplete_folder(tmp_path) -> None:
    missing = tmp_path / "bk-sdm-v2-small"
    with pytest.raises(FloraConfigError) as info:
        load_pretrained(str(missing))
    msg = str(info.value)
    assert "\n" not in msg and str(missing) in msg and "does not exist" in msg
    assert "unet/config.json" in msg and "vae/config.json" in msg and "scheduler/scheduler_config.json" in msg
    (missing / "unet").mkdir(parents=True)
    (missing / "unet" / "config.json").write_text("{}")
    with pytest.raises(FloraConfigError, match=r"lacks vae/config.json, scheduler/scheduler_config.json"):
        load_pretrained(str(missing))


def test_load_pretrained_round_trips_a_saved_pipeline(
    pipe: TextToImage, cond: torch.Tensor, tmp_path
) -> None:
    pipe.unet.save_pretrained(tmp_path / "unet")
    pipe.vae.save_pretrained(tmp_path / "vae")
    # checkpoints usually ship another scheduler class: its schedule is loaded into DDIM
    diffusers.PNDMScheduler.from_config(pipe.scheduler.config).save_pretrained(tmp_path / "scheduler")
    loaded = load_pretrained(str(tmp_path))
    assert isinstance(loaded.scheduler, diffusers.DDIMScheduler)
    assert not loaded.scheduler.config.clip_sample
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    ref = pipe.generate(cond, None, STEPS, 1.0, _gen(0))
    torch.testing.assert_close(loaded.generate(cond, None, STEPS, 1.0, _gen(0)), ref, atol=1e-6, rtol=0)
