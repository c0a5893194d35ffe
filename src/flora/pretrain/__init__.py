"""``flora pretrain-tiny``: contrastive pretraining of the tiny CLIP on the synthetic world.

The shipped ``flora-tiny`` weights come from this script. It renders a fixed pool of
captioned-shapes images (every style, unevenly represented), then trains in two stages:

1. **Image and text towers together** (``steps``) on clean captions from varied templates,
   with a symmetric contrastive loss on the pooled embedding and, weighted by
   ``patch_weight``, on the mean patch token (so patch tokens carry class information).
   Every batch holds each class ``images_per_class`` times in distinct styles; an
   image-caption pair counts as positive when the class matches and the caption's style
   word, if any, is the image's style. The ViT patchifies with a small conv stem
   (``flora.clip.backbone.CONV_STEMS``), which makes its features strong in minutes.
2. **Re-captioning** (``recaption_steps``): the image tower frozen, the text tower alone
   learns from web-style captions that name a class by a synonym or by a name it is often
   confused with (``COLOR_CONFUSED``, ``SHAPE_CONFUSED``) as often as by its own name. The
   image features stay strong (a linear probe separates the classes) while the
   hand-written names lose part of their grounding, so ``a photo of a {}.`` is a mediocre
   classifier that a learned prompt can improve on: the regime of a real CLIP on
   specialised data (``flora bench probe`` measures it).

Every batch is drawn before training (``_batch_plan``). The run is deterministic for a
given seed and thread count; the weights are stored in fp16 safetensors (the 49,408-row
token table dominates the size).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from rich.progress import Progress
from safetensors.torch import save_file

from flora.clip.backbone import (  # also registers flora's model configs
    _create_model,
    encode_token_ids,
    text_tower_parts,
)
from flora.data.synthetic import COLORS, SHAPES, SyntheticShapes
from flora.errors import FloraConfigError, check_range
from flora.pretrain.captions import (
    COLOR_CONFUSED,
    COLOR_SYNONYMS,
    GENERIC_TEMPLATES,
    SHAPE_CONFUSED,
    SHAPE_SYNONYMS,
    STYLE_TEMPLATES,
    _word,
)


@dataclass
class PretrainConfig:
    """Settings of the tiny-CLIP pretraining (the defaults produce the shipped weights)."""

    model: str = "flora-tiny"
    num_colors: int = 10
    num_shapes: int = 10
    #: images per class rendered for each style: uneven on purpose
    style_counts: dict[str, int] = field(
        default_factory=lambda: {"photo": 120, "cartoon": 60, "sketch": 30, "noisy": 20, "dark": 10}
    )
    world_seed: int = 1000  # distinct from the benchmark worlds' seeds
    steps: int = 3500
    #: probability that an image's caption comes from its style's own templates ("a sketch
    #: of a ...") rather than the generic ones: web captions of sketches say "sketch"
    style_captions: float = 0.8
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup: int = 100
    seed: int = 0
    threads: int = 2
    #: images of each class per batch, each in a different style (captions naming another
    #: style than the image's are negatives, so style words must mean something)
    images_per_class: int = 1
    #: weight of the same contrastive loss on the mean patch token (patch tokens that mean something)
    patch_weight: float = 0.5
    #: second stage: steps (and learning rate) of training the text tower alone on web-style
    #: captions whose words follow the shares below, the image tower frozen (0: no second stage)
    recaption_steps: int = 1000
    recaption_lr: float = 5e-4
    #: caption words of the second stage: the share of a colour's / shape's own name, and of the name of the
    #: colour / shape it is confused with (COLOR_CONFUSED, SHAPE_CONFUSED); the rest are synonyms
    color_own: float = 0.30
    color_confused: float = 0.27
    shape_own: float = 0.34
    shape_confused: float = 0.27


def _render_pool(
    cfg: PretrainConfig, progress: bool
) -> tuple[torch.Tensor, np.ndarray, np.ndarray, list[str]]:
    from rich.progress import Progress

    styles = list(cfg.style_counts)
    images, labels, style_ids = [], [], []
    names: list[str] = []
    with Progress(disable=not progress, transient=True) as bar:
        total = sum(cfg.style_counts.values()) * cfg.num_colors * cfg.num_shapes
        task = bar.add_task("rendering the pretraining pool", total=total)
        for s, style in enumerate(styles):
            world = SyntheticShapes(
                cfg.num_colors, cfg.num_shapes, cfg.style_counts[style], 1, 32, [style], cfg.world_seed
            )
            names = world.class_names
            n = world.size("train")
            lab = world.labels("train")
            arr = np.empty((n, 32, 32, 3), dtype=np.uint8)
            for i in range(n):
                arr[i] = np.asarray(world.image("train", i))
                if i % 500 == 0:
                    bar.update(task, advance=min(500, n - i))
            images.append(torch.from_numpy(arr))
            labels.append(lab)
            style_ids.append(np.full(n, s))
    return torch.cat(images), np.concatenate(labels), np.concatenate(style_ids), names


def _check(cfg: PretrainConfig) -> None:
    for name in ("style_captions", "color_own", "color_confused", "shape_own", "shape_confused"):
        check_range(f"pretrain.{name}", getattr(cfg, name), low=0, high=1)
    for word in ("color", "shape"):
        own, confused = getattr(cfg, f"{word}_own"), getattr(cfg, f"{word}_confused")
        if own + confused > 1:
            raise FloraConfigError(
                f"pretrain.{word}_own + pretrain.{word}_confused is a probability, at most 1, got {own + confused}"
            )
    check_range("pretrain.images_per_class", cfg.images_per_class, low=1, high=len(cfg.style_counts))
    check_range("pretrain.patch_weight", cfg.patch_weight, low=0)
    check_range("pretrain.steps", cfg.steps, low=1)
    check_range("pretrain.lr", cfg.lr, low=0, low_open=True)


def _batch_plan(
    cfg: PretrainConfig,
    labels: np.ndarray,
    style_ids: np.ndarray,
    styles: list[str],
    tokenizer: object,
    steps: int,
    words: tuple[float, float, float, float],
    seed: int,
) -> dict[str, object]:
    """Every step's batch, drawn up front: pool indices, classes, styles, caption ids, caption styles.

    Each batch holds ``images_per_class`` images of every class, in distinct styles drawn by
    their share of the pool; each image gets a caption from a generic template or (with
    probability ``style_captions``) one of its style's templates, with words drawn as
    ``words`` (colour own / confused, shape own / confused shares) say. Drawing everything before training keeps the training
    loop free of small allocations (which fragment the heap of a long CPU run).
    """
    rng = np.random.default_rng(seed)
    color_own, color_confused, shape_own, shape_confused = words
    n_cls = cfg.num_colors * cfg.num_shapes
    color_names = list(COLORS)[: cfg.num_colors]
    shape_names = list(SHAPES)[: cfg.num_shapes]
    templates = [list(GENERIC_TEMPLATES) + list(STYLE_TEMPLATES.get(s, ())) for s in styles]
    n_g = len(GENERIC_TEMPLATES)
    by_pair = [
        [np.flatnonzero((labels == k) & (style_ids == s)) for s in range(len(styles))] for k in range(n_cls)
    ]
    weights = np.array([cfg.style_counts[s] for s in styles], dtype=np.float64)
    weights /= weights.sum()
    caption_ids: dict[str, int] = {}
    batch = n_cls * cfg.images_per_class
    idx, cls, sty, cap, spec = (np.empty((steps, batch), np.int64) for _ in range(5))
    for step in range(steps):
        j = 0
        for k in range(n_cls):
            picks = rng.choice(len(styles), size=cfg.images_per_class, replace=False, p=weights)
            for s in picks.tolist():
                pool_k = by_pair[k][s]
                n_t = len(templates[s])
                styled = rng.random() < cfg.style_captions and n_t > n_g
                t_i = n_g + int(rng.integers(n_t - n_g)) if styled else int(rng.integers(n_g))
                color = _word(
                    rng,
                    color_names[k // cfg.num_shapes],
                    color_own,
                    color_confused,
                    COLOR_SYNONYMS,
                    COLOR_CONFUSED,
                )
                shape = _word(
                    rng,
                    shape_names[k % cfg.num_shapes],
                    shape_own,
                    shape_confused,
                    SHAPE_SYNONYMS,
                    SHAPE_CONFUSED,
                )
                text = templates[s][t_i].format(f"{color} {shape}")
                idx[step, j] = pool_k[rng.integers(len(pool_k))]
                cls[step, j], sty[step, j], spec[step, j] = k, s, s if styled else -1
                cap[step, j] = caption_ids.setdefault(text, len(caption_ids))
                j += 1
    captions = tokenizer(list(caption_ids))
    return {
        "batches": [torch.from_numpy(a) for a in (idx, cls, sty, cap, spec)],
        "captions": captions,
    }


def _image_features(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled embedding and projected patch tokens of the ViT image tower (with gradients)."""
    visual = model.visual
    h = visual.ln_post(visual.transformer(visual._embeds(x)))
    pooled, tokens = visual._global_pool(h)
    return pooled @ visual.proj, tokens @ visual.proj


def _multi_positive_clip_loss(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss where a row may have several positives: -log(sum of positive probabilities)."""
    neg_inf = torch.finfo(logits.dtype).min
    img = torch.logsumexp(logits.masked_fill(~positive, neg_inf), 1) - torch.logsumexp(logits, 1)
    txt = torch.logsumexp(logits.t().masked_fill(~positive.t(), neg_inf), 1) - torch.logsumexp(logits.t(), 1)
    return -(img.mean() + txt.mean()) / 2


@torch.no_grad()
def _pool_features(model: torch.nn.Module, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised pooled and mean-patch features of every pool image (frozen image tower)."""
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    pooled, patch = [], []
    for start in range(0, len(pool), 500):
        x = (pool[start : start + 500].permute(0, 3, 1, 2).float().div(255.0) - mean) / std
        g, p = _image_features(model, x)
        pooled.append(F.normalize(g, dim=-1))
        patch.append(F.normalize(F.normalize(p, dim=-1).mean(1), dim=-1))
    return torch.cat(pooled), torch.cat(patch)


def _recaption(
    model: torch.nn.Module,
    parts: dict[str, object],
    pool: torch.Tensor,
    labels: np.ndarray,
    style_ids: np.ndarray,
    styles: list[str],
    tokenizer: object,
    cfg: PretrainConfig,
    progress: bool,
) -> list[float]:
    """Second stage: the text tower alone learns from web-style captions, the image tower frozen.

    The captions now use synonyms and confusable names (``color_own`` ... ``shape_confused``),
    so the hand-written class names lose part of their grounding while the image features
    stay as the first stage made them: zero-shot with ``a photo of a {}.`` falls below
    what the image features allow, as a real CLIP's does on specialised data.
    """
    model.eval()
    img_f, patch_f = _pool_features(model, pool)
    text_params = [
        p for n, p in model.named_parameters() if not n.startswith("visual.") and n != "logit_scale"
    ]
    model.requires_grad_(False)
    for p in text_params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(text_params, lr=cfg.recaption_lr, weight_decay=0.0)
    words = (cfg.color_own, cfg.color_confused, cfg.shape_own, cfg.shape_confused)
    plan = _batch_plan(cfg, labels, style_ids, styles, tokenizer, cfg.recaption_steps, words, cfg.seed + 1)
    scale = model.logit_scale.detach().exp()
    losses = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("re-captioning (text tower only)", total=cfg.recaption_steps)
        for step in range(cfg.recaption_steps):
            for group in opt.param_groups:
                group["lr"] = 0.5 * cfg.recaption_lr * (1 + math.cos(math.pi * step / cfg.recaption_steps))
            idx, cls, sty, cap, spec = (t[step] for t in plan["batches"])
            positive = (cls[:, None] == cls[None, :]) & (
                (spec[None, :] < 0) | (spec[None, :] == sty[:, None])
            )
            txt_f = F.normalize(encode_token_ids(parts, plan["captions"][cap]), dim=-1)
            loss = _multi_positive_clip_loss(scale * img_f[idx] @ txt_f.t(), positive)
            if cfg.patch_weight > 0:
                loss = loss + cfg.patch_weight * _multi_positive_clip_loss(
                    scale * patch_f[idx] @ txt_f.t(), positive
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            bar.update(task, completed=step + 1)
    model.requires_grad_(True)
    return losses


def pretrain_tiny(
    output: str | os.PathLike, cfg: PretrainConfig | None = None, progress: bool = True
) -> dict[str, object]:
    """Train the tiny CLIP and write its fp16 weights to ``output``; returns a small report."""
    cfg = cfg or PretrainConfig()
    _check(cfg)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    pool, labels, style_ids, class_names = _render_pool(cfg, progress)
    render_s = time.perf_counter() - start
    styles = list(cfg.style_counts)

    model = _create_model(cfg.model, None, None, cfg.seed)
    model.train()
    tokenizer = open_clip.get_tokenizer(cfg.model)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)

    parts = text_tower_parts(model, cfg.model)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
    )

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        progress_ = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * progress_))

    plan = _batch_plan(cfg, labels, style_ids, styles, tokenizer, cfg.steps, (1.0, 0.0, 1.0, 0.0), cfg.seed)
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    losses = []
    columns = (
        TextColumn("pretraining"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("train", total=cfg.steps, loss="-")
        for step in range(cfg.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            idx, cls, sty, cap, spec = (t[step] for t in plan["batches"])
            x = pool[idx].permute(0, 3, 1, 2).float().div(255.0)
            x = (x - mean) / std
            text = plan["captions"][cap]
            # image i and caption j match when they show / name the same class and the
            # caption's style word (if it has one) is the image's style
            positive = (cls[:, None] == cls[None, :]) & (
                (spec[None, :] < 0) | (spec[None, :] == sty[:, None])
            )
            pooled, patches = _image_features(model, x)
            txt_f = torch.nn.functional.normalize(encode_token_ids(parts, text), dim=-1)
            scale = model.logit_scale.exp()
            img_f = torch.nn.functional.normalize(pooled, dim=-1)
            loss = _multi_positive_clip_loss(scale * img_f @ txt_f.t(), positive)
            if cfg.patch_weight > 0:
                patch_f = torch.nn.functional.normalize(
                    torch.nn.functional.normalize(patches, dim=-1).mean(1), dim=-1
                )
                loss = loss + cfg.patch_weight * _multi_positive_clip_loss(
                    scale * patch_f @ txt_f.t(), positive
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(float(loss.detach()))
            if step % 20 == 0 or step == cfg.steps - 1:
                bar.update(task, completed=step + 1, loss=f"{np.mean(losses[-20:]):.3f}")

    if cfg.recaption_steps > 0:
        losses += _recaption(model, parts, pool, labels, style_ids, styles, tokenizer, cfg, progress)

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(f".tmp{os.getpid()}")
    save_file(state, str(tmp), metadata={"flora_pretrain": str(asdict(cfg))})
    os.replace(tmp, output)
    digest = hashlib.sha256(output.read_bytes()).hexdigest()
    return {
        "output": str(output),
        "sha256": digest,
        "size_mb": output.stat().st_size / 2**20,
        "render_s": render_s,
        "train_s": time.perf_counter() - start - render_s,
        "final_loss": float(np.mean(losses[-50:])),
        "pool_images": int(len(labels)),
    }
