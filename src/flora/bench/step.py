"""One client step of FLORA, as flora computes it and as the authors' code computes it (part of ``flora bench speed``).

The authors' pattern, reproduced for its cost: every step runs the image tower on the raw
batch and then five full-length text passes (the model's whole context, 77 tokens in CLIP,
not truncated at the end-of-text token): the hand-written anchor, the global prompt ``sigma``, ``B A``, ``sigma + B A`` and
an unused local prompt. Three of them enter the loss (anchor, ``sigma``, ``sigma + B A``)
and the backward pass runs through those; their default precision is fp16 autocast on a
GPU (fp32 on a CPU). flora's step is :meth:`FLORA.compute_loss` on cached image features
(one text-tower pass over both contexts, truncated at the end-of-text token) or on raw
images, followed by the same backward and SGD step. Both start from the same model.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from flora.clip.backbone import run_text_tower, run_transformer
from flora.methods import FLORA
from flora.prompts import pair_contrastive, rowwise_cos


def _full_length(module: FLORA, ctx: Tensor) -> Tensor:
    """Class features of context ``ctx`` through every position of the context, as an untruncated text tower runs."""
    backbone, prompts = module.backbone, module._require_task()
    n_cls = prompts.num_classes
    x = torch.cat([prompts.prefix, ctx.unsqueeze(0).expand(n_cls, -1, -1), prompts.suffix], dim=1)
    full = backbone.context_length
    pad = backbone.embed_tokens(torch.zeros(n_cls, full - x.shape[1], dtype=torch.long))
    return F.normalize(
        run_text_tower(backbone._text, torch.cat([x, pad.to(x.dtype)], dim=1), prompts.eot, pool_last=False),
        dim=-1,
    )


def _anchor_full_length(module: FLORA, class_names: list[str]) -> Tensor:
    """The hand-written anchor's features through every position (recomputed every step, as there)."""
    backbone = module.backbone
    tokens = backbone.tokenize([module.template.format(n) for n in class_names]).to(module.anchor.device)
    x = run_transformer(backbone._text, backbone.embed_tokens(tokens))
    pooled = backbone._text["ln_final"](x[torch.arange(len(tokens), device=x.device), tokens.argmax(-1)])
    proj = backbone._text["text_projection"]
    return F.normalize(pooled @ proj if isinstance(proj, Tensor) else proj(pooled), dim=-1)


def authors_loss(module: FLORA, images: Tensor, y: Tensor, class_names: list[str]) -> Tensor:
    """FLORA's loss computed with the authors' pattern (image tower, five full-length text passes).

    The value equals :meth:`FLORA.compute_loss` on the same images: only the cost differs.
    """
    with torch.no_grad():
        feats = module.backbone.encode_image(images)
        z0 = _anchor_full_length(module, class_names)
    sigma, ba = module.prompt.ctx, module.lowrank()
    z_global = _full_length(module, sigma)
    _full_length(module, ba)  # computed there, enters no loss
    z_personal = _full_length(module, sigma + ba)
    _full_length(module, torch.zeros_like(sigma))  # the unused local prompt
    logits = module.logits_from(module.image_side(feats), z_personal)
    loss = F.cross_entropy(logits, y)
    loss = loss + module.mu * pair_contrastive(
        rowwise_cos(z0, z_global), rowwise_cos(z0, z_personal), module.tau
    )
    return loss + sum(module.regularisers().values())


def _time_steps(
    step: Callable[[], None], device: torch.device, warmup: int, steps: int
) -> tuple[float, float]:
    """Median milliseconds of ``step`` after ``warmup`` untimed calls, and milliseconds of the first call."""

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return 1000 * (time.perf_counter() - t0)

    first = timed()
    for _ in range(warmup - 1):
        step()
    return statistics.median(timed() for _ in range(steps)), first


def run_step_bench(
    clip_model: str = "flora-tiny",
    clip_pretrained: str | None = "shipped",
    batch_size: int = 32,
    num_classes: int = 100,
    n_ctx: int = 16,
    rank: int = 8,
    warmup: int = 2,
    steps: int = 5,
    compiled: bool = True,
) -> dict[str, Any]:
    """Milliseconds per FLORA client step: the authors' pattern against flora's, on one model and device.

    ``compiled`` adds flora's cached-feature steps with the text tower through ``torch.compile``.
    Every row also has the first call's milliseconds (``first_ms``; for a compiled row, the compilation).
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module = FLORA(clip_model=clip_model, clip_pretrained=clip_pretrained, n_ctx=n_ctx, rank=rank).to(device)
    class_names = [f"class {i}" for i in range(num_classes)]
    module.set_task(class_names)
    module.train()
    gen = torch.Generator().manual_seed(0)
    size = module.backbone.image_size
    images = torch.randn(batch_size, 3, size, size, generator=gen).to(device)
    y = torch.randint(0, num_classes, (batch_size,), generator=gen).to(device)
    with torch.no_grad():
        features = module.backbone.encode_image(images).float()
    optimizer = module.configure_optimizers()

    def runner(loss_of: Callable[[], Tensor], dtype: torch.dtype | None) -> Callable[[], None]:
        def step() -> None:
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = loss_of()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    cuda = device.type == "cuda"
    patterns = {
        "authors' pattern, fp32": (lambda: authors_loss(module, images, y, class_names), None),
        "flora, cached features, fp32": (lambda: module.compute_loss(features, y)[0], None),
        "flora, raw images, fp32": (lambda: module.compute_loss(images, y)[0], None),
    }
    if cuda:
        patterns["authors' pattern, fp16 autocast"] = (
            lambda: authors_loss(module, images, y, class_names),
            torch.float16,
        )
        patterns["flora, cached features, bf16 autocast"] = (
            lambda: module.compute_loss(features, y)[0],
            torch.bfloat16,
        )
        patterns["flora, raw images, bf16 autocast"] = (
            lambda: module.compute_loss(images, y)[0],
            torch.bfloat16,
        )
    flora_patterns = [name for name in patterns if name.startswith("flora, cached")]
    rows = []
    for name, (fn, dtype) in patterns.items():
        median, first = _time_steps(runner(fn, dtype), device, warmup, steps)
        rows.append({"pattern": name, "ms_per_step": median, "first_ms": first})
    # what computing the shared start and context once per context, and the last block at EOT alone, save
    ablations = {
        "every class's whole sequence": {"share_prefix": False},
        "every class's whole sequence and the whole last block": {"share_prefix": False, "pool_last": False},
    }
    backbone = module.backbone
    for label, settings in ablations.items():
        saved = {key: getattr(backbone, key) for key in settings}
        for key, value in settings.items():
            setattr(backbone, key, value)
        try:
            fn, dtype = patterns["flora, cached features, fp32"]
            median, first = _time_steps(runner(fn, dtype), device, warmup, steps)
            rows.append(
                {
                    "pattern": f"flora, cached features, fp32, {label}",
                    "ms_per_step": median,
                    "first_ms": first,
                }
            )
        finally:
            for key, value in saved.items():
                setattr(backbone, key, value)
    if compiled:  # the same steps with the text tower through torch.compile (the first call compiles)
        module.backbone.compile_text()
        try:
            for name in flora_patterns:
                fn, dtype = patterns[name]
                median, first = _time_steps(runner(fn, dtype), device, warmup, steps)
                rows.append({"pattern": f"{name}, compiled", "ms_per_step": median, "first_ms": first})
        finally:
            module.backbone.compile_text(False)
    return {
        "model": clip_model,
        "weights": clip_pretrained or "random init",
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "batch_size": batch_size,
        "num_classes": num_classes,
        "n_ctx": n_ctx,
        "rank": rank,
        "steps": steps,
        "rows": rows,
    }
