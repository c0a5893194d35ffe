"""The frozen backbone: prompted text tower, truncation, image tokens, weight loading."""

from __future__ import annotations

import pytest
import torch

from flora.clip import CLIPBackbone, PretrainedWeightsError

NAMES = ["red circle", "blue star", "dark green five pointed star", "cyan"]


@pytest.fixture(scope="module")
def backbone() -> CLIPBackbone:
    return CLIPBackbone("flora-tiny", None, init_seed=0)


def _original_ctx(backbone: CLIPBackbone, n_ctx: int) -> torch.Tensor:
    """The token embeddings of the "X X ... X" placeholders themselves."""
    tokens = backbone.tokenize([" ".join(["X"] * n_ctx) + " thing."])
    with torch.no_grad():
        return backbone._token_embedding(tokens)[0, 1 : 1 + n_ctx].clone()


@pytest.mark.parametrize("n_ctx", [1, 4, 8])
def test_prompted_tower_equals_encode_text(backbone: CLIPBackbone, n_ctx: int) -> None:
    prompts = backbone.build_class_prompts(NAMES, n_ctx)
    texts = [" ".join(["X"] * n_ctx) + f" {n}." for n in NAMES]
    with torch.no_grad():
        expected = backbone.model.encode_text(backbone.tokenize(texts), normalize=True)
        got = backbone.encode_prompted(_original_ctx(backbone, n_ctx), prompts)
    assert got.shape == (len(NAMES), backbone.embed_dim)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_truncation_is_exact(backbone: CLIPBackbone) -> None:
    prompts = backbone.build_class_prompts(NAMES, 4)
    assert prompts.length < backbone.context_length  # it really truncates
    ctx = torch.randn(4, backbone.token_width) * 0.02
    # full-length reference: the same embeddings padded to the whole context
    full_tokens = backbone.tokenize([" ".join(["X"] * 4) + f" {n}." for n in NAMES])
    with torch.no_grad():
        emb = backbone._token_embedding(full_tokens)
        emb[:, 1:5] = ctx
        full = backbone._run_text(emb, full_tokens.argmax(-1))
        full = torch.nn.functional.normalize(full, dim=-1)
        truncated = backbone.encode_prompted(ctx, prompts)
    torch.testing.assert_close(truncated, full, atol=1e-5, rtol=0)


def test_last_block_run_at_eot_only_equals_the_full_pass_in_float64() -> None:
    """The last block attending from EOT alone gives the full pass's features and gradients."""
    from flora.clip.backbone import _poolable, run_text_tower

    backbone = CLIPBackbone("flora-tiny", None, init_seed=0)
    parts = {
        k: v.double() if isinstance(v, torch.nn.Module | torch.Tensor) else v
        for k, v in backbone._text.items()
    }
    prompts = backbone.build_class_prompts(NAMES, 4)  # names of different lengths: EOTs differ
    assert len(set(prompts.eot.tolist())) > 1
    x = torch.cat(
        [
            prompts.prefix.double(),
            torch.randn(len(NAMES), 4, backbone.token_width, dtype=torch.float64) * 0.1,
            prompts.suffix.double(),
        ],
        dim=1,
    ).requires_grad_()
    outs = {}
    for pool in (True, False):
        feats = run_text_tower(parts, x, prompts.eot, pool_last=pool)
        weights = torch.randn(feats.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        outs[pool] = (feats.detach(), torch.autograd.grad((feats * weights).sum(), x)[0])
    assert _poolable(parts["transformer"], parts["transformer"].resblocks[-1])
    torch.testing.assert_close(outs[True][0], outs[False][0], atol=1e-12, rtol=0)
    torch.testing.assert_close(outs[True][1], outs[False][1], atol=1e-12, rtol=0)
    assert outs[True][1].abs().max() > 1e-3  # gradients reach the context
    parts["transformer"].grad_checkpointing = True  # a block run another way is run whole
    assert not _poolable(parts["transformer"], parts["transformer"].resblocks[-1])
    parts["transformer"].grad_checkpointing = False
    # and so is a tower without a causal mask (later positions reach the EOT there): the full pass
    bidirectional = {**parts, "attn_mask": None}
    pooled = run_text_tower(bidirectional, x.detach(), prompts.eot, pool_last=True)
    whole = run_text_tower(bidirectional, x.detach(), prompts.eot, pool_last=False)
    assert torch.equal(pooled, whole)
    assert not torch.allclose(pooled, outs[True][0])  # the mask matters: the test can tell them apart


@pytest.mark.parametrize("tail_attention", ["split", "sdpa"])
def test_shared_start_and_context_equal_the_whole_sequences_in_float64(
    monkeypatch: pytest.MonkeyPatch, tail_attention: str
) -> None:
    """The start token and a context shared by every class, computed once per context: same features and gradients.

    Both ways the class tokens attend (a split softmax, the CPU's default, and one fused attention
    over copied keys, the default elsewhere)."""
    import flora.clip.backbone as module

    calls = []
    shared = module.run_shared_text_tower
    monkeypatch.setattr(
        module, "run_shared_text_tower", lambda *a, **k: calls.append(a[1].shape) or shared(*a, **k)
    )
    backbone = CLIPBackbone("flora-tiny", None, init_seed=0).double()
    backbone.tail_attention = tail_attention
    split_calls = []
    split_attention = module._split_attention
    monkeypatch.setattr(
        module, "_split_attention", lambda *a, **k: split_calls.append(1) or split_attention(*a, **k)
    )
    prompts = backbone.build_class_prompts(NAMES, 4)  # names of different lengths: EOTs differ
    assert len(set(prompts.eot.tolist())) > 1
    ctx = torch.randn(
        3, 4, backbone.token_width, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    weights = torch.randn(
        3, len(NAMES), backbone.embed_dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    outs = {}
    for share in (True, False):
        for pool in (True, False):
            backbone.share_prefix, backbone.pool_last = share, pool
            c = (ctx * 0.1).requires_grad_()
            feats = backbone.encode_prompted(c, prompts)
            outs[share, pool] = (feats.detach(), torch.autograd.grad((feats * weights).sum(), c)[0])
    assert calls == [(3, 5, backbone.token_width)] * 2  # 3 contexts, 5 shared positions: once per context
    # every block's class tokens attended the chosen way (2 shared passes x every block)
    assert len(split_calls) == (
        2 * len(backbone._text["transformer"].resblocks) if tail_attention == "split" else 0
    )
    for key, (feats, grad) in outs.items():
        torch.testing.assert_close(feats, outs[False, False][0], atol=1e-12, rtol=0, msg=str(key))
        torch.testing.assert_close(grad, outs[False, False][1], atol=1e-12, rtol=0, msg=str(key))
    assert outs[True, True][1].abs().max() > 1e-3  # gradients reach the context
    # one context per class shares only the start token: the whole sequences, as before
    calls.clear()
    per_class = (ctx[:, None] * 0.1).expand(-1, len(NAMES), -1, -1)
    torch.testing.assert_close(
        backbone.encode_prompted(per_class, prompts), outs[False, False][0], atol=1e-12, rtol=0
    )
    assert calls == []
    # towers the shared pass does not know run whole
    assert module.shares_prefix(backbone._text)
    assert not module.shares_prefix(
        {**backbone._text, "attn_mask": None}
    )  # bidirectional: later tokens matter
    backbone._text["transformer"].resblocks[0].attn.dropout = 0.1
    assert not module.shares_prefix(backbone._text)
    backbone._text["transformer"].resblocks[0].attn.dropout = 0.0
    backbone.share_prefix, backbone.tail_attention = True, "fused"
    with pytest.raises(ValueError, match="tail_attention must be auto, sdpa or split, got 'fused'"):
        backbone.encode_prompted(ctx, prompts)


def test_shared_context_under_bf16_autocast() -> None:
    """The shared pass under CPU autocast: bf16 matmuls, float32 features close to the float32 pass."""
    backbone = CLIPBackbone("flora-tiny", None, init_seed=0)
    prompts = backbone.build_class_prompts(NAMES, 4)
    ctx = (
        torch.randn(2, 4, backbone.token_width, generator=torch.Generator().manual_seed(0)) * 0.1
    ).requires_grad_()
    full = backbone.encode_prompted(ctx, prompts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = backbone.encode_prompted(ctx, prompts)
    assert not torch.equal(mixed.float(), full)  # bf16 really ran
    torch.testing.assert_close(mixed.float(), full, atol=5e-2, rtol=0)
    mixed.float().sum().backward()
    assert torch.isfinite(ctx.grad).all() and ctx.grad.abs().max() > 0


@pytest.mark.parametrize(
    "backend",
    [
        "aot_eager",  # graph capture and compiled autograd, without generating kernels: seconds
        pytest.param("inductor", marks=pytest.mark.slow),  # the default backend's kernels: half a minute cold
    ],
)
def test_compiled_text_tower_gives_the_eager_features_and_gradients(tmp_path, backend: str) -> None:
    import copy

    backbone = CLIPBackbone("flora-tiny", None, init_seed=0)
    prompts = backbone.build_class_prompts(NAMES, 4)
    ctx = torch.randn(2, 4, backbone.token_width, generator=torch.Generator().manual_seed(0)) * 0.1
    weights = torch.randn(2, len(NAMES), backbone.embed_dim, generator=torch.Generator().manual_seed(1))
    from torch._dynamo.utils import counters

    counters.clear()
    out = {}
    for compiled in (False, True):
        backbone.compile_text(compiled, backend=backend)
        c = ctx.clone().requires_grad_()
        feats = backbone.encode_prompted(c, prompts)
        out[compiled] = (feats.detach(), torch.autograd.grad((feats * weights).sum(), c)[0])
    assert counters["stats"]["unique_graphs"] >= 1  # the compiled tower ran
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[True][1], out[False][1], atol=1e-5, rtol=1e-4)
    # a copy (as a spawned process or a checkpointing user makes) runs eagerly, and pickles
    assert copy.deepcopy(backbone)._compiled_text is None
    torch.save(backbone, tmp_path / "b.pt")
    backbone.compile_text(False)
    assert backbone._compiled_text is None


def test_a_machine_that_cannot_compile_gets_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from flora.errors import FloraRunError

    def cannot_compile(fn: object, **options: object) -> object:
        def run(*args: object, **kwargs: object) -> object:
            raise torch._dynamo.exc.BackendCompilerFailed(
                "inductor", RuntimeError("InvalidCxxCompiler: no working C++ compiler found"), None
            )

        return run

    monkeypatch.setattr(torch, "compile", cannot_compile)
    backbone = CLIPBackbone("flora-tiny", None, init_seed=0)
    backbone.compile_text()
    with pytest.raises(
        FloraRunError,
        match=r"compile the text tower on this machine \(RuntimeError: InvalidCxxCompiler.*compile_text false",
    ):
        backbone.encode_prompted(torch.zeros(4, backbone.token_width), backbone.build_class_prompts(NAMES, 4))


def test_batched_variants_match_single_calls(backbone: CLIPBackbone) -> None:
    prompts = backbone.build_class_prompts(NAMES, 4)
    ctx = torch.randn(3, 4, backbone.token_width) * 0.02
    with torch.no_grad():
        batched = backbone.encode_prompted(ctx, prompts)
        singles = torch.stack([backbone.encode_prompted(c, prompts) for c in ctx])
    assert batched.shape == (3, len(NAMES), backbone.embed_dim)
    torch.testing.assert_close(batched, singles, atol=1e-5, rtol=0)


def test_anchor_features_equal_encode_text(backbone: CLIPBackbone) -> None:
    z0 = backbone.anchor_features(NAMES, "a photo of a {}.")
    with torch.no_grad():
        ref = backbone.model.encode_text(
            backbone.tokenize([f"a photo of a {n}." for n in NAMES]), normalize=True
        )
    torch.testing.assert_close(z0, ref, atol=1e-5, rtol=0)


def test_patch_tokens_and_global_feature(backbone: CLIPBackbone) -> None:
    images = torch.randn(2, 3, 32, 32)
    pooled, tokens = backbone.encode_image_tokens(images)
    assert tokens.shape == (2, (32 // 8) ** 2, backbone.embed_dim)
    torch.testing.assert_close(pooled, backbone.encode_image(images), atol=1e-5, rtol=0)


def test_backbone_is_frozen_and_stays_in_eval(backbone: CLIPBackbone) -> None:
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.training and not backbone.model.training


def test_random_init_is_seeded() -> None:
    a = CLIPBackbone("flora-tiny", None, init_seed=3)
    b = CLIPBackbone("flora-tiny", None, init_seed=3)
    assert a.fingerprint() == b.fingerprint()
    assert CLIPBackbone("flora-tiny", None, init_seed=4).fingerprint() != a.fingerprint()


def test_local_checkpoint_file_loads(tmp_path, backbone: CLIPBackbone) -> None:
    path = tmp_path / "tiny.pt"
    torch.save(backbone.model.state_dict(), path)
    loaded = CLIPBackbone("flora-tiny", str(path))
    assert loaded.fingerprint() == backbone.fingerprint()


def test_missing_pretrained_fails_fast_with_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsError, match="pass its path"):
        CLIPBackbone("ViT-B-32", "openai", cache_dir="/nonexistent-cache")
    with pytest.raises(PretrainedWeightsError, match="not found"):
        CLIPBackbone("flora-tiny", "/no/such/file.pt")
    with pytest.raises(PretrainedWeightsError, match="no pretrained tag"):
        CLIPBackbone("flora-tiny", "laion400m_e32")


def test_too_long_prompt_is_a_clear_error(backbone: CLIPBackbone) -> None:
    with pytest.raises(ValueError, match="context length"):
        backbone.build_class_prompts(["a " * 20 + "thing"], 16)


def test_flora_tiny_patchifies_with_a_conv_stem(backbone: CLIPBackbone) -> None:
    from flora.clip.backbone import ConvStem

    stem = backbone.model.visual.conv1
    assert isinstance(stem, ConvStem)
    x = torch.randn(2, 3, 32, 32)
    assert stem(x).shape == (2, backbone.model.visual.transformer.width, 4, 4)  # the ViT's 8 px patch grid
    pooled, tokens = backbone.encode_image_tokens(x)
    assert tokens.shape == (2, 16, backbone.embed_dim)
    with pytest.raises(ValueError, match="patch size 8 needs 4 channel entries"):
        ConvStem((16, 32), 128, 8)


def test_weights_without_the_conv_stem_are_refused(tmp_path) -> None:
    import open_clip

    plain = open_clip.create_model("flora-tiny", pretrained=None)  # open_clip alone: one patch conv
    path = tmp_path / "old.pt"
    torch.save(plain.state_dict(), path)
    with pytest.raises(PretrainedWeightsError, match="conv-stem ViT"):
        CLIPBackbone("flora-tiny", str(path))
