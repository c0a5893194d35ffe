"""``flora pretrain-generator``: train the tiny text-to-image generator CMFL uses offline.

The shipped generator (``flora/diffusion_weights/flora-tiny``, loaded by CMFL's
``diffusion: tiny``) comes from this script. It is a latent diffusion model of the
architecture :func:`flora.diffusion.build_tiny` builds, trained on the synthetic world's
photos and conditioned exactly as CMFL conditions it: on the shipped tiny CLIP's text
hidden states of ``"a photo of a <class name>."`` (:func:`flora.prompts.class_tokens.generator_conditioning`).

1. **VAE** (``vae_steps``): reconstruction (mean squared error) plus a small KL term on the
   photo pool; the latent scaling factor is then set so that the pool's latents have unit
   standard deviation (as Stable Diffusion's 0.18215 does for its VAE).
2. **UNet** (``unet_steps``): noise prediction on the pool's latents with Stable Diffusion's
   noise schedule; the conditioning is dropped to the empty prompt with probability
   ``uncond_prob`` so that classifier-free guidance works.

Every random draw comes from generators seeded by ``seed``; the run is deterministic for a
given seed and thread count. The report measures what the generator reaches: the shipped
CLIP's zero-shot accuracy on generated images of every class (and, separately, whether
colour and shape are right) against the same measure on real photos.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from flora.errors import check_range

__all__ = ["GeneratorPretrainConfig", "evaluate_generator", "pretrain_generator"]


@dataclass
class GeneratorPretrainConfig:
    """Settings of the tiny generator's pretraining (the defaults produce the shipped weights)."""

    num_colors: int = 10
    num_shapes: int = 10
    #: photos rendered per class for the training pool
    images_per_class: int = 40
    world_seed: int = 2000  # distinct from the benchmark worlds' and the CLIP pretraining's seeds
    clip_model: str = "flora-tiny"
    #: the CLIP whose text tower conditions the generator (``shipped``: flora-tiny's weights)
    clip_pretrained: str = "shipped"
    template: str = "a photo of a {}."
    batch_size: int = 64
    vae_steps: int = 1000
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    unet_steps: int = 4000
    unet_lr: float = 1e-3
    #: probability that a training image is conditioned on the empty prompt (for guidance)
    uncond_prob: float = 0.1
    #: evaluation: images generated per class, DDIM steps and guidance weight
    eval_per_class: int = 2
    eval_steps: int = 25
    eval_guidance: float = 7.5
    seed: int = 0
    threads: int = 2


def _check(cfg: GeneratorPretrainConfig) -> None:
    for name in ("images_per_class", "batch_size", "eval_per_class", "eval_steps", "threads"):
        check_range(f"pretrain.{name}", getattr(cfg, name), low=1)
    for name in ("vae_steps", "unet_steps"):
        check_range(f"pretrain.{name}", getattr(cfg, name), low=0)
    for name in ("vae_lr", "unet_lr"):
        check_range(f"pretrain.{name}", getattr(cfg, name), low=0, low_open=True)
    check_range("pretrain.kl_weight", cfg.kl_weight, low=0)
    check_range("pretrain.uncond_prob", cfg.uncond_prob, low=0, high=1)
    check_range("pretrain.eval_guidance", cfg.eval_guidance, low=1)


def _cosine(step: int, steps: int, lr: float, warmup: int = 50) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _photos(cfg: GeneratorPretrainConfig, progress: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The photo pool in ``[-1, 1]`` ``(N, 3, 32, 32)``, its labels and the class names."""
    from flora.pretrain import PretrainConfig, _render_pool

    pool_cfg = PretrainConfig(
        num_colors=cfg.num_colors,
        num_shapes=cfg.num_shapes,
        style_counts={"photo": cfg.images_per_class},
        world_seed=cfg.world_seed,
    )
    images, labels, _, names = _render_pool(pool_cfg, progress)
    x = images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return x, torch.from_numpy(labels).long(), names


def _conditioning(backbone: Any, names: list[str], template: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of the template around every class name, and of the empty prompt."""
    from flora.prompts import ClassNameEmbeddings
    from flora.prompts.class_tokens import generator_conditioning

    words = ClassNameEmbeddings(backbone, names, template).words()
    with torch.no_grad():
        cond, uncond, _, _ = generator_conditioning(backbone, template, [w.detach() for w in words])
    return cond, uncond


def _bar(progress: bool, what: str) -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn(what),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
        TimeRemainingColumn(),
    )
    return Progress(*columns, disable=not progress)


def _optimise(
    module: torch.nn.Module,
    steps: int,
    lr: float,
    seed: int,
    what: str,
    progress: bool,
    loss_at: Callable[[torch.Generator], torch.Tensor],
) -> list[float]:
    """``steps`` AdamW steps (cosine schedule) on ``module``; ``loss_at(gen)`` draws its batch from ``gen``."""
    module.requires_grad_(True)
    module.train()
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    with _bar(progress, what) as bar:
        task = bar.add_task(what, total=steps, loss="-")
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = _cosine(step, steps, lr)
            loss = loss_at(gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if step % 20 == 0 or step == steps - 1:
                bar.update(task, completed=step + 1, loss=f"{np.mean(losses[-20:]):.4f}")
    module.requires_grad_(False)
    module.eval()
    return losses


def _train_vae(
    vae: torch.nn.Module, pool: torch.Tensor, cfg: GeneratorPretrainConfig, progress: bool
) -> list[float]:
    def loss_at(gen: torch.Generator) -> torch.Tensor:
        x = pool[torch.randint(len(pool), (cfg.batch_size,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        return F.mse_loss(vae.decode(z).sample, x) + cfg.kl_weight * posterior.kl().mean()

    return _optimise(vae, cfg.vae_steps, cfg.vae_lr, cfg.seed + 1, "generator: VAE", progress, loss_at)


@torch.no_grad()
def _latents(vae: torch.nn.Module, pool: torch.Tensor) -> torch.Tensor:
    return torch.cat([vae.encode(pool[i : i + 500]).latent_dist.mean for i in range(0, len(pool), 500)])


def _train_unet(
    unet: torch.nn.Module,
    scheduler: Any,
    latents: torch.Tensor,
    labels: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    cfg: GeneratorPretrainConfig,
    progress: bool,
) -> list[float]:
    alphas = scheduler.alphas_cumprod.float()
    steps_total = int(scheduler.config.num_train_timesteps)

    def loss_at(gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(latents), (cfg.batch_size,), generator=gen)
        t = torch.randint(steps_total, (cfg.batch_size,), generator=gen)
        noise = torch.randn((cfg.batch_size, *latents.shape[1:]), generator=gen)
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.uncond_prob
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents[idx] + (1 - a).sqrt() * noise
        context = torch.where(drop.view(-1, 1, 1), uncond, cond[labels[idx]])
        return F.mse_loss(unet(noisy, t, encoder_hidden_states=context).sample, noise)

    return _optimise(unet, cfg.unet_steps, cfg.unet_lr, cfg.seed + 2, "generator: UNet", progress, loss_at)


@torch.no_grad()
def evaluate_generator(
    model: Any,
    backbone: Any,
    names: list[str],
    num_shapes: int,
    template: str = "a photo of a {}.",
    per_class: int = 2,
    steps: int = 25,
    guidance: float = 3.0,
    seed: int = 0,
    real: torch.Tensor | None = None,
    real_labels: torch.Tensor | None = None,
) -> dict[str, float]:
    """The CLIP's zero-shot accuracy (percent) on ``per_class`` generated images of every class.

    Also the share of generated images whose predicted class has the right colour
    (``class // num_shapes``) and the right shape (``class % num_shapes``), and, when
    ``real`` images in ``[-1, 1]`` are given, the same accuracy on them for reference.
    """
    cond, uncond = _conditioning(backbone, names, template)
    labels = torch.arange(len(names)).repeat_interleave(per_class)
    gen = torch.Generator().manual_seed(seed)
    images = torch.cat(
        [
            model.generate(cond[labels[i : i + 200]], uncond, steps, guidance, gen)
            for i in range(0, len(labels), 200)
        ]
    )
    text = backbone.anchor_features(names, template)

    def predict(x01: torch.Tensor) -> torch.Tensor:
        feats = F.normalize(backbone.encode_image(backbone.normalise_images(x01)), dim=-1)
        return (feats @ text.t()).argmax(-1)

    pred = predict(images)
    report = {
        "generated_acc": 100.0 * float((pred == labels).float().mean()),
        "generated_color_acc": 100.0 * float((pred // num_shapes == labels // num_shapes).float().mean()),
        "generated_shape_acc": 100.0 * float((pred % num_shapes == labels % num_shapes).float().mean()),
        "chance": 100.0 / len(names),
    }
    if real is not None and real_labels is not None:
        real_pred = torch.cat([predict((real[i : i + 500] + 1) / 2) for i in range(0, len(real), 500)])
        report["real_acc"] = 100.0 * float((real_pred == real_labels).float().mean())
    return report


def _save(model: Any, output: Path, cfg: GeneratorPretrainConfig) -> None:
    """Write the diffusers folder (unet/, vae/, scheduler/) next to ``output``, then rename it into place."""
    tmp = output.with_name(f"{output.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.unet.save_pretrained(tmp / "unet")
    model.vae.save_pretrained(tmp / "vae")
    model.scheduler.save_pretrained(tmp / "scheduler")
    (tmp / "flora_pretrain.txt").write_text(f"flora pretrain-generator\n{asdict(cfg)}\n")
    old = output.with_name(f"{output.name}.old{os.getpid()}")
    if output.exists():
        output.rename(old)
    tmp.rename(output)
    shutil.rmtree(old, ignore_errors=True)


def weights_digest(folder: str | os.PathLike[str]) -> str:
    """sha256 over the generator folder's tensors (names, dtypes, shapes, bytes), independent of file metadata."""
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for sub in ("unet", "vae"):
        tensors = load_file(str(Path(folder) / sub / "diffusion_pytorch_model.safetensors"))
        for name in sorted(tensors):
            t = tensors[name].contiguous()
            h.update(f"{sub}/{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def pretrain_generator(
    output: str | os.PathLike[str], cfg: GeneratorPretrainConfig | None = None, progress: bool = True
) -> dict[str, Any]:
    """Train the tiny generator and write it as a diffusers folder at ``output``; returns a report."""
    from flora.clip import CLIPBackbone
    from flora.diffusion import build_tiny

    cfg = cfg or GeneratorPretrainConfig()
    _check(cfg)
    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    pool, labels, names = _photos(cfg, progress)
    backbone = CLIPBackbone(cfg.clip_model, cfg.clip_pretrained)
    cond, uncond = _conditioning(backbone, names, cfg.template)
    model = build_tiny(backbone.token_width, image_size=pool.shape[-1], seed=cfg.seed)
    render_s = time.perf_counter() - start

    vae_losses = _train_vae(model.vae, pool, cfg, progress)
    latents = _latents(model.vae, pool)
    scaling = 1.0 / float(latents.std())
    model.vae.register_to_config(scaling_factor=scaling)
    unet_losses = _train_unet(
        model.unet, model.scheduler, latents * scaling, labels, cond, uncond, cfg, progress
    )
    model.requires_grad_(False)
    train_s = time.perf_counter() - start - render_s

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    _save(model, output, cfg)
    quality = evaluate_generator(
        model,
        backbone,
        names,
        cfg.num_shapes,
        cfg.template,
        cfg.eval_per_class,
        cfg.eval_steps,
        cfg.eval_guidance,
        seed=cfg.seed,
        real=pool[:: max(1, cfg.images_per_class // cfg.eval_per_class)],
        real_labels=labels[:: max(1, cfg.images_per_class // cfg.eval_per_class)],
    )
    size = sum(f.stat().st_size for f in output.rglob("*") if f.is_file())
    return {
        "output": str(output),
        "sha256": weights_digest(output),
        "size_mb": size / 2**20,
        "parameters": model.num_parameters(),
        "render_s": render_s,
        "train_s": train_s,
        "vae_loss": float(np.mean(vae_losses[-50:])) if vae_losses else float("nan"),
        "unet_loss": float(np.mean(unet_losses[-50:])) if unet_losses else float("nan"),
        "scaling_factor": scaling,
        **quality,
    }
