"""``flora bench probe``: how much room a frozen backbone leaves for prompt learning.

For every style of the synthetic world, on a small centralised task, it compares

* **zero-shot**: the hand-written prompt (``a photo of a {}.``) as the classifier;
* **linear probe**: a linear classifier trained on the frozen image features, i.e. what
  the image features allow at best for a linear head;
* **CoOp**: a learned context prompt (the text side of every method in this library)
  trained centrally on the same images;
* **base-to-novel CoOp**: the classes split as in the benchmark (the first half of the
  labels are base, the rest novel); a context learned from ``coop_shots`` images per
  base class, scored on the base classes and, with the same context, on the novel
  classes it never saw, beside zero-shot on each half;
* **zero-shot (patches)**: the hand-written prompt scored against the mean patch token.

When zero-shot is close to the linear probe, no text prompt can do much better on that
style; when the linear probe is well above zero-shot, prompt learning has real work to
do; when base-to-novel CoOp falls below zero-shot on the novel classes, the benchmark's
generalisation / personalisation trade-off exists. ``docs/backbone.md`` is written by
this command.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from flora.data.synthetic import STYLES, SyntheticShapes
from flora.fileio import atomic_write_text
from flora.methods import LocalCoOp

__all__ = ["ProbeConfig", "run_probe"]


@dataclass
class ProbeConfig:
    """The probe task: one centralised world per style."""

    num_colors: int = 10
    num_shapes: int = 10
    train_per_class: int = 40
    test_per_class: int = 20
    styles: list[str] = field(default_factory=lambda: list(STYLES))
    seed: int = 0
    n_ctx: int = 4
    coop_epochs: int = 6
    coop_lr: float = 0.01
    probe_steps: int = 500
    batch_size: int = 32
    #: base-to-novel CoOp: training images per base class, and epochs over them
    coop_shots: int = 16
    base_novel_epochs: int = 30


def _encode(model: LocalCoOp, world: SyntheticShapes, split: str) -> tuple[Tensor, Tensor, Tensor | None]:
    """Normalised pooled features, labels, and the mean normalised patch token (None without patch tokens)."""
    pre = model.backbone.preprocess
    feats, patches = [], []
    n = world.size(split)
    with torch.no_grad():
        for start in range(0, n, 256):
            x = torch.stack([pre(world.image(split, i)) for i in range(start, min(n, start + 256))])
            try:
                pooled, tokens = model.backbone.encode_image_tokens(x)
                patches.append(F.normalize(tokens.float(), dim=-1).mean(1))
            except ValueError:  # not a plain ViT: no patch tokens
                pooled = model.backbone.encode_image(x)
            feats.append(F.normalize(pooled.float(), dim=-1))
    patch = torch.cat(patches) if len(patches) == len(feats) else None
    return torch.cat(feats), torch.from_numpy(world.labels(split)).long(), patch


def _accuracy(logits: Tensor, y: Tensor) -> float:
    return 100.0 * logits.argmax(1).eq(y).float().mean().item()


def _train_context(
    model: LocalCoOp,
    feats: Tensor,
    labels: Tensor,
    epochs: int,
    cfg: ProbeConfig,
    g: torch.Generator,
    what: str,
) -> None:
    """Learn ``model``'s context from scratch on cached features (SGD with momentum, seeded order)."""
    model.prompt.reset_parameters(g)
    opt = torch.optim.SGD([model.prompt.ctx], lr=cfg.coop_lr, momentum=0.9)
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=g)
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            logits = model.logits_from(feats[idx], model.text_features())
            loss = F.cross_entropy(logits, labels[idx])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"CoOp loss is {loss.item()} ({what})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def _base_novel(
    model: LocalCoOp,
    world: SyntheticShapes,
    feats: tuple[Tensor, Tensor, Tensor, Tensor],
    cfg: ProbeConfig,
    g: torch.Generator,
) -> dict[str, float]:
    """Zero-shot and few-shot CoOp on the base classes, and both on the novel classes."""
    from flora.data.partition import base_novel_split

    f_tr, y_tr, f_te, y_te = feats
    base, novel = base_novel_split(world.num_classes)
    names = world.class_names
    out: dict[str, float] = {}
    # the first coop_shots training images of each base class (the world's order is already random)
    shots = torch.cat([torch.nonzero(y_tr == k).flatten()[: cfg.coop_shots] for k in base])
    for half, classes in (("base", base), ("novel", novel)):
        mask = (y_te.unsqueeze(1) == torch.tensor(classes).unsqueeze(0)).any(1)
        relabel = torch.full((world.num_classes,), -1, dtype=torch.long)
        relabel[torch.tensor(classes)] = torch.arange(len(classes))
        f_half, y_half = f_te[mask], relabel[y_te[mask]]
        model.set_task([names[k] for k in classes])
        if half == "base":
            with torch.no_grad():
                out["zero_shot_base"] = _accuracy(f_half @ model.anchor.float().t(), y_half)
            _train_context(
                model,
                f_tr[shots],
                relabel[y_tr[shots]],
                cfg.base_novel_epochs,
                cfg,
                g,
                f"{world.styles[0]}, base",
            )
            with torch.no_grad():
                out["coop_base"] = _accuracy(model.logits_from(f_half, model.text_features()), y_half)
        else:  # the context learned on the base classes, with the novel class names
            with torch.no_grad():
                out["zero_shot_novel"] = _accuracy(f_half @ model.anchor.float().t(), y_half)
                out["coop_novel"] = _accuracy(model.logits_from(f_half, model.text_features()), y_half)
    model.set_task(names)
    return out


def probe_style(model: LocalCoOp, world: SyntheticShapes, cfg: ProbeConfig) -> dict[str, float]:
    """Zero-shot, linear-probe, CoOp and base-to-novel CoOp test accuracy (percent) of one world."""
    g = torch.Generator().manual_seed(cfg.seed)
    model.set_task(world.class_names)
    f_tr, y_tr, _ = _encode(model, world, "train")
    f_te, y_te, p_te = _encode(model, world, "test")
    with torch.no_grad():
        zero_shot = _accuracy(f_te @ model.anchor.float().t(), y_te)
        # patch tokens voting with their mean cosine to each class (what OT-based methods build on)
        patch_zero_shot = float("nan") if p_te is None else _accuracy(p_te @ model.anchor.float().t(), y_te)

    torch.manual_seed(cfg.seed)
    head = torch.nn.Linear(f_tr.shape[1], world.num_classes)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    scale = 10.0  # unit-norm features: a fixed scale keeps Adam's steps well conditioned
    for _ in range(cfg.probe_steps):
        loss = F.cross_entropy(head(f_tr * scale), y_tr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        linear = _accuracy(head(f_te * scale), y_te)

    _train_context(model, f_tr, y_tr, cfg.coop_epochs, cfg, g, f"style {world.styles[0]!r}")
    with torch.no_grad():
        coop = _accuracy(model.logits_from(f_te, model.text_features()), y_te)
    row = {"zero_shot": zero_shot, "linear_probe": linear, "coop": coop, "patch_zero_shot": patch_zero_shot}
    row.update(_base_novel(model, world, (f_tr, y_tr, f_te, y_te), cfg, g))
    return row


def run_probe(
    clip_model: str = "flora-tiny",
    clip_pretrained: str | None = "shipped",
    task: ProbeConfig | None = None,
    output: str | None = "docs/backbone.md",
    progress: bool = True,
) -> dict[str, Any]:
    """Probe a backbone on every style; print the table and write it to ``output`` (markdown + JSON).

    Args:
        clip_model: open_clip model name.
        clip_pretrained: weights (``shipped``, a file or an open_clip tag).
        task: the probe task (on the command line ``--task.styles '[photo]'`` etc.).
        output: markdown file to write (a ``.json`` with the same stem is written beside it);
            ``None`` only prints.
        progress: print one line per style.
    """
    from flora.bench.common import machine

    cfg = task or ProbeConfig()
    unknown = [s for s in cfg.styles if s not in STYLES]
    if unknown:
        raise ValueError(f"unknown style(s) {unknown}; valid styles: {sorted(STYLES)}")
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    model = LocalCoOp(n_ctx=cfg.n_ctx, clip_model=clip_model, clip_pretrained=clip_pretrained)
    model.eval()
    rows: dict[str, dict[str, float]] = {}
    for style in cfg.styles:
        world = SyntheticShapes(
            cfg.num_colors, cfg.num_shapes, cfg.train_per_class, cfg.test_per_class, 32, [style], cfg.seed
        )
        rows[style] = probe_style(model, world, cfg)
        if progress:
            r = rows[style]
            print(
                f"flora probe: {style:8s} zero-shot {r['zero_shot']:5.1f}  linear probe "
                f"{r['linear_probe']:5.1f}  CoOp {r['coop']:5.1f}  base {r['zero_shot_base']:5.1f} -> "
                f"{r['coop_base']:5.1f}  novel {r['zero_shot_novel']:5.1f} -> {r['coop_novel']:5.1f}",
                flush=True,
            )
    result = {
        "clip_model": clip_model,
        "clip_pretrained": clip_pretrained,
        "config": asdict(cfg),
        "machine": machine(),
        "seconds": time.perf_counter() - start,
        "styles": rows,
    }
    if output is not None:
        path = Path(output)
        atomic_write_text(path, _markdown(result))
        atomic_write_text(path.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
        if progress:
            print(f"flora probe: wrote {path} ({result['seconds']:.0f} s)")
    return result


def regime_checks(mean: dict[str, float]) -> list[tuple[str, str, bool]]:
    """The checks a backbone must pass to show real CLIP's regime: (what, measured, holds)."""
    zs, lp, patch = mean["zero_shot"], mean["linear_probe"], mean["patch_zero_shot"]
    gain = mean["coop_base"] - mean["zero_shot_base"]
    novel = mean["coop_novel"] - mean["zero_shot_novel"]
    return [
        ("linear probe >= 90 %", f"{lp:.1f}", lp >= 90.0),
        ("linear probe >= zero-shot + 20", f"{lp - zs:+.1f}", lp - zs >= 20.0),
        ("16-shot CoOp on base classes >= zero-shot + 10", f"{gain:+.1f}", gain >= 10.0),
        ("CoOp on novel classes below zero-shot", f"{novel:+.1f}", novel < 0.0),
        ("patch-token zero-shot >= 0.6 x zero-shot", f"{patch / zs:.2f} x" if zs else "-", patch >= 0.6 * zs),
    ]


def _markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    n_cls = cfg["num_colors"] * cfg["num_shapes"]
    lines = [
        "# Backbone probe",
        "",
        "Generated by `flora bench probe` (`make bench`), as measured: how much room the frozen",
        "backbone leaves for prompt learning on each style of the synthetic world.",
        "",
        f"- backbone: `{result['clip_model']}` with weights `{result['clip_pretrained']}`",
        f"- machine: {result['machine']}; run time {result['seconds']:.0f} s",
        f"- task per style: {cfg['num_colors']} colours x {cfg['num_shapes']} shapes = {n_cls} classes "
        f"(chance {100 / n_cls:.1f} %), {cfg['train_per_class']} training and {cfg['test_per_class']} "
        f"test images per class, world seed {cfg['seed']}, trained centrally",
        "- zero-shot: the prompt `a photo of a {}.`; linear probe: a linear head on the frozen",
        f"  image features (Adam, {cfg['probe_steps']} full-batch steps); CoOp: a learned "
        f"{cfg['n_ctx']}-token context (SGD lr {cfg['coop_lr']}, {cfg['coop_epochs']} epochs)",
        "- zero-shot (patches): the same prompt scored by the mean cosine of the image's patch",
        "  tokens (after the final LayerNorm and projection), the features OT-based methods such as",
        "  FedOTP match prompts to",
        f"- base-to-novel: the first half of the labels are base classes, the rest novel; CoOp learns a "
        f"{cfg['n_ctx']}-token context from {cfg['coop_shots']} images per base class "
        f"({cfg['base_novel_epochs']} epochs) and is scored on the base classes and, with the same",
        "  context, on the novel classes (each half a task of its own); zero-shot on the same halves",
        "",
        "Test accuracy in percent.",
        "",
        "| style | zero-shot | linear probe | CoOp | linear probe - zero-shot | zero-shot (patches) |",
        "|---|---|---|---|---|---|",
    ]

    def cell(v: float) -> str:
        return "-" if v != v else f"{v:.1f}"

    keys = (
        "zero_shot",
        "linear_probe",
        "coop",
        "patch_zero_shot",
        "zero_shot_base",
        "coop_base",
        "zero_shot_novel",
        "coop_novel",
    )
    rows = dict(result["styles"])
    rows["mean"] = {
        k: float(np.mean([r.get(k, float("nan")) for r in result["styles"].values()])) for k in keys
    }
    for style, r in rows.items():
        gap = r["linear_probe"] - r["zero_shot"]
        lines.append(
            f"| {style} | {r['zero_shot']:.1f} | {r['linear_probe']:.1f} | {r['coop']:.1f} | {gap:+.1f} | "
            f"{cell(r.get('patch_zero_shot', float('nan')))} |"
        )
    lines += [
        "",
        "Base-to-novel (a context learned on the base classes, applied to the novel ones):",
        "",
        "| style | zero-shot base | CoOp base | CoOp base - zero-shot | zero-shot novel | CoOp novel | "
        "CoOp novel - zero-shot |",
        "|---|---|---|---|---|---|---|",
    ]
    for style, r in rows.items():
        lines.append(
            f"| {style} | {r['zero_shot_base']:.1f} | {r['coop_base']:.1f} | "
            f"{r['coop_base'] - r['zero_shot_base']:+.1f} | {r['zero_shot_novel']:.1f} | {r['coop_novel']:.1f} | "
            f"{r['coop_novel'] - r['zero_shot_novel']:+.1f} |"
        )
    lines += ["", "The regime of a real CLIP (docs/synthetic-world.md), checked on the mean over styles:", ""]
    lines += ["| check | measured | holds |", "|---|---|---|"]
    for text, value, ok in regime_checks(rows["mean"]):
        lines.append(f"| {text} | {value} | {'yes' if ok else 'no'} |")
    lines.append("")
    return "\n".join(lines)
