"""``flora pretrain-tiny``: contrastive pretraining of the tiny CLIP on the synthetic world.

The shipped ``flora-tiny`` weights come from this script. It renders a fixed pool of
captioned-shapes images (every style, unevenly represented so that zero-shot transfer
is decent but not perfect), then trains the open_clip model with open_clip's own
``ClipLoss`` on captions drawn from varied templates. Every batch holds each class
exactly once, so no caption in a batch is a false negative of another image. The run
is deterministic for a given seed and thread count; the weights are stored in fp16
safetensors (the 49,408-row token table dominates the size).
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
from safetensors.torch import save_file

from flora.clip.backbone import (  # also registers flora's model configs
    _create_model,
    encode_token_ids,
    text_tower_parts,
)
from flora.data.synthetic import SyntheticShapes

#: caption templates; ``{style}`` templates are used only for images of that style
GENERIC_TEMPLATES = (
    "a photo of a {}.",
    "a {}.",
    "{}",
    "an image of a {}.",
    "a picture of the {}.",
    "a small {}.",
    "a big {}.",
    "the {} in the picture.",
)
STYLE_TEMPLATES = {
    "photo": ("a photo of a {}.", "a shaded {}."),
    "sketch": ("a sketch of a {}.", "a drawing of a {}."),
    "cartoon": ("a cartoon {}.", "a cartoon of a {}."),
    "noisy": ("a noisy photo of a {}.", "a grainy picture of a {}."),
    "dark": ("a dark photo of a {}.", "a {} in the dark."),
}


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
    steps: int = 2000
    #: probability that an image's caption comes from its style's own templates ("a sketch
    #: of a ...") rather than the generic ones: web captions of sketches say "sketch"
    style_captions: float = 0.8
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 100
    seed: int = 0
    threads: int = 2


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


def pretrain_tiny(
    output: str | os.PathLike, cfg: PretrainConfig | None = None, progress: bool = True
) -> dict[str, object]:
    """Train the tiny CLIP and write its fp16 weights to ``output``; returns a small report."""
    cfg = cfg or PretrainConfig()
    if not 0.0 <= cfg.style_captions <= 1.0:
        raise ValueError(f"style_captions is a probability in [0, 1], got {cfg.style_captions}")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    pool, labels, style_ids, class_names = _render_pool(cfg, progress)
    render_s = time.perf_counter() - start
    styles = list(cfg.style_counts)

    model = _create_model(cfg.model, None, None, cfg.seed)
    model.train()
    tokenizer = open_clip.get_tokenizer(cfg.model)
    templates = [list(GENERIC_TEMPLATES) + list(STYLE_TEMPLATES.get(s, ())) for s in styles]
    # every (style, class, template) caption tokenised once
    tokens = [tokenizer([t.format(n) for n in class_names for t in temps]) for temps in templates]
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)

    loss_fn = open_clip.ClipLoss()
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

    rng = np.random.default_rng(cfg.seed)
    by_class = [np.flatnonzero(labels == k) for k in range(len(class_names))]
    n_cls = len(class_names)
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
            idx = np.array([by_class[k][rng.integers(len(by_class[k]))] for k in range(n_cls)])
            x = pool[idx].permute(0, 3, 1, 2).float().div(255.0)
            x = (x - mean) / std
            rows = []
            for i in idx:
                s = int(style_ids[i])
                n_t = len(templates[s])
                k = int(labels[i])
                n_g = len(GENERIC_TEMPLATES)
                if rng.random() < cfg.style_captions and n_t > n_g:
                    t_i = n_g + int(rng.integers(n_t - n_g))
                else:
                    t_i = int(rng.integers(n_g))
                rows.append(tokens[s][k * n_t + t_i])
            text = torch.stack(rows)
            img_f = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
            txt_f = torch.nn.functional.normalize(encode_token_ids(parts, text), dim=-1)
            loss = loss_fn(img_f, txt_f, model.logit_scale.exp())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(float(loss.detach()))
            if step % 20 == 0 or step == cfg.steps - 1:
                bar.update(task, completed=step + 1, loss=f"{np.mean(losses[-20:]):.3f}")

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
