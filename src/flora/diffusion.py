"""A frozen text-conditioned latent diffusion model that turns text hidden states into images.

This is the image generator of CMFL (cross-modality federated learning): a receiver turns
the hidden states of ``"a photo of a <received embedding>"`` (from the CLIP text tower)
into images, which it then pseudo-labels and trains on. The component only generates;
it knows nothing about CLIP, prompts or clients.

The diffusion libraries are an optional extra (``pip install 'flora[cmfl]'``). This module
imports without them; :func:`build_tiny` and :func:`load_pretrained` import ``diffusers``
when called and raise a one-line :class:`~flora.errors.FloraConfigError` if it is missing.

* :class:`TextToImage` holds a UNet (``UNet2DConditionModel``), a VAE (``AutoencoderKL``) and
  a DDIM scheduler, all frozen, and samples images with :meth:`TextToImage.generate`.
* :func:`build_tiny` builds a small randomly initialised pipeline (about 1.5 MB) for tests and
  smoke runs, with a chosen cross-attention width.
* :func:`load_pretrained` loads a real diffusers checkpoint folder (e.g. BK-SDM-v2-small).
* :func:`load_shipped` loads the tiny generator shipped with flora: ``build_tiny``'s
  architecture trained by ``flora pretrain-generator`` on the synthetic world's photos,
  conditioned on the shipped ``flora-tiny`` CLIP's text hidden states.

Every random number is drawn on a CPU :class:`torch.Generator` and then moved to the
model's device, so a seed gives the same initial noise on every device.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flora.errors import FloraConfigError, check_range

__all__ = [
    "EXTRA_MODULES",
    "TextToImage",
    "SHIPPED_GENERATOR",
    "build_tiny",
    "load_pretrained",
    "load_shipped",
    "require_extra",
]

#: the import names the ``cmfl`` extra provides
EXTRA_MODULES: tuple[str, ...] = ("diffusers",)

#: the shipped tiny generator (a diffusers folder written by ``flora pretrain-generator``)
SHIPPED_GENERATOR = Path(__file__).parent / "diffusion_weights" / "flora-tiny"

#: subfolders (and the config file each must hold) of a diffusers checkpoint folder
_LAYOUT: tuple[tuple[str, str], ...] = (
    ("unet", "config.json"),
    ("vae", "config.json"),
    ("scheduler", "scheduler_config.json"),
)


def require_extra(what: str, modules: Sequence[str] = EXTRA_MODULES) -> None:
    """Raise a one-line :class:`FloraConfigError` unless the ``cmfl`` extra can be imported.

    Args:
        what: the feature that needs the extra, as the user knows it (``"CMFL"``); it starts
            the message.
        modules: the import names to check (by default ``diffusers``).

    The message reads ``CMFL needs the optional extra 'cmfl' (diffusers): pip install
    'flora[cmfl]'`` followed by which module failed to import and why.
    """
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as err:  # ImportError, or a broken install failing at import time
            reason = " ".join(str(err).split()) or type(err).__name__
            raise FloraConfigError(
                f"{what} needs the optional extra 'cmfl' ({', '.join(EXTRA_MODULES)}): "
                f"pip install 'flora[cmfl]' ({name} could not be imported: {reason})"
            ) from None


def _diffusers() -> Any:
    require_extra("flora.diffusion")
    import diffusers

    return diffusers


class TextToImage(nn.Module):
    """A frozen latent diffusion pipeline: text hidden states ``(B, L, D)`` in, images out.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` predicting the noise (or ``v`` / the sample,
            as the scheduler's ``prediction_type`` says) from latents, a timestep and
            ``encoder_hidden_states`` of width ``unet.config.cross_attention_dim``.
        vae: a diffusers ``AutoencoderKL``; only its decoder is used.
        scheduler: a diffusers scheduler; :func:`build_tiny` and :func:`load_pretrained` give a
            ``DDIMScheduler`` (with ``eta = 0`` it adds no noise after the initial latents).

    The UNet and VAE are frozen (``requires_grad_(False)``) and the module stays in eval mode.
    Move it with ``.to(device)`` like any module.
    """

    def __init__(self, unet: nn.Module, vae: nn.Module, scheduler: Any) -> None:
        super().__init__()
        self.unet = unet
        self.vae = vae
        self.scheduler = scheduler
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> TextToImage:
        """The pipeline is frozen: it always stays in eval mode."""
        return super().train(False)

    # ------------------------------------------------------------------ structure
    @property
    def cross_attention_dim(self) -> int:
        """Width ``D`` of the conditioning hidden states the UNet attends to."""
        dim = self.unet.config.cross_attention_dim
        return int(dim[0] if isinstance(dim, list | tuple) else dim)

    @property
    def vae_scale_factor(self) -> int:
        """How many pixels one latent cell covers along each side."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def image_size(self) -> int:
        """Side of the square images the UNet was built (trained) for."""
        size = self.unet.config.sample_size
        size = size[0] if isinstance(size, list | tuple) else size
        return int(size) * self.vae_scale_factor

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ sampling
    def _check_inputs(self, cond: Tensor, uncond: Tensor | None, steps: int, guidance_scale: float) -> None:
        if cond.ndim != 3 or cond.shape[-1] != self.cross_attention_dim or cond.shape[0] < 1:
            raise FloraConfigError(
                f"cond must have shape (B, L, {self.cross_attention_dim}) with B >= 1, got {tuple(cond.shape)}"
            )
        if uncond is not None and (
            uncond.ndim != 3
            or uncond.shape[0] not in (1, cond.shape[0])
            or uncond.shape[1:] != cond.shape[1:]
        ):
            raise FloraConfigError(
                f"uncond must have shape ({cond.shape[0]} or 1, {cond.shape[1]}, {cond.shape[2]}) like cond, "
                f"got {tuple(uncond.shape)}"
            )
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise FloraConfigError(f"steps must be an integer, got {steps!r}")
        check_range("steps", steps, low=1, high=int(self.scheduler.config.num_train_timesteps))
        check_range("guidance_scale", guidance_scale, low=1.0)

    @torch.no_grad()
    def generate(
        self,
        cond: Tensor,
        uncond: Tensor | None = None,
        steps: int = 25,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        image_size: int | None = None,
    ) -> Tensor:
        """Sample one image per row of ``cond``.

        Args:
            cond: conditioning hidden states ``(B, L, D)``, ``D == cross_attention_dim``.
            uncond: the unconditional hidden states (e.g. of the empty prompt), ``(B, L, D)`` or
                ``(1, L, D)``; used only when ``guidance_scale > 1``.
            steps: number of denoising steps.
            guidance_scale: classifier-free guidance weight ``w``: the noise estimate is
                ``e_u + w (e_c - e_u)``. With ``w == 1`` (or ``uncond=None``) only the
                conditional estimate is computed.
            generator: a CPU :class:`torch.Generator` for the initial latents (the only random
                numbers drawn). ``None`` uses a fresh generator seeded with 0.
            image_size: side of the square output; a multiple of :attr:`vae_scale_factor`,
                :attr:`image_size` by default.

        Returns:
            float32 images ``(B, 3, H, W)`` in ``[0, 1]`` on the model's device.

        The same generator state gives bit-identical images on a given device and build
        (GPU kernels may differ from CPU in the last bits). Works under ``torch.autocast``.
        """
        self._check_inputs(cond, uncond, steps, guidance_scale)
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        if generator.device.type != "cpu":
            raise FloraConfigError(
                f"generator must be a CPU torch.Generator (noise is drawn on the CPU and moved), "
                f"got one on {generator.device}"
            )
        size = self.image_size if image_size is None else image_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % self.vae_scale_factor:
            raise FloraConfigError(
                f"image_size must be a positive multiple of {self.vae_scale_factor}, got {image_size!r}"
            )

        device, dtype = self.device, self.dtype
        batch = cond.shape[0]
        guided = uncond is not None and guidance_scale > 1.0
        context = cond.to(device=device, dtype=dtype)
        if guided:
            assert uncond is not None
            context = torch.cat([uncond.to(device=device, dtype=dtype).expand_as(context), context])

        side = size // self.vae_scale_factor
        shape = (batch, self.latent_channels, side, side)
        latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
        scheduler = self.scheduler
        scheduler.set_timesteps(steps, device=device)
        latents = latents * float(scheduler.init_noise_sigma)
        for t in scheduler.timesteps:
            model_in = torch.cat([latents, latents]) if guided else latents
            model_in = scheduler.scale_model_input(model_in, t)
            out = self.unet(model_in.to(dtype), t, encoder_hidden_states=context, return_dict=False)[0]
            out = out.float()
            if guided:
                out_u, out_c = out.chunk(2)
                out = out_u + guidance_scale * (out_c - out_u)
            latents = scheduler.step(out, t, latents, return_dict=False)[0].float()

        scaling = float(self.vae.config.scaling_factor)
        shift = self.vae.config.get("shift_factor", None) or 0.0
        z = latents / scaling + float(shift)
        images = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0].float()
        return ((images + 1.0) / 2.0).clamp(0.0, 1.0)


def build_tiny(cross_attention_dim: int, image_size: int = 32, seed: int = 0) -> TextToImage:
    """A tiny randomly initialised pipeline (about 1.5 MB of weights) for tests and smoke runs.

    Args:
        cross_attention_dim: width ``D`` of the conditioning hidden states (e.g. the CLIP text
            tower's width, ``CLIPBackbone.token_width``).
        image_size: side of the square images; a multiple of 2 (latents are half the size).
        seed: the weights are drawn from ``torch.manual_seed(seed)`` inside a forked RNG, so
            two builds with the same seed are identical and the global RNG is untouched.

    Architecture: a VAE with two encoder/decoder levels of 16 and 32 channels (4 latent
    channels, one 2x downsampling), a UNet with levels of 16 and 32 channels (one
    cross-attention down block, one plain down block, a cross-attention mid block, mirrored
    up blocks; one layer per block, 4 attention heads) and a DDIM scheduler with Stable
    Diffusion's noise schedule. With ``cross_attention_dim=128``: 0.39 M parameters, 1.5 MB.
    """
    if isinstance(cross_attention_dim, bool) or not isinstance(cross_attention_dim, int):
        raise FloraConfigError(f"cross_attention_dim must be an integer, got {cross_attention_dim!r}")
    check_range("cross_attention_dim", cross_attention_dim, low=1)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8 or image_size % 8:
        raise FloraConfigError(f"image_size must be a positive multiple of 8, got {image_size!r}")
    diffusers = _diffusers()
    channels = (16, 32)
    groups = 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = diffusers.AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(channels),
            up_block_types=("UpDecoderBlock2D",) * len(channels),
            block_out_channels=channels,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=groups,
            sample_size=image_size,
        )
        unet = diffusers.UNet2DConditionModel(
            sample_size=image_size // 2,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=channels,
            layers_per_block=1,
            norm_num_groups=groups,
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=4,
        )
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return TextToImage(unet, vae, scheduler)


def load_pretrained(
    path: str, local_files_only: bool = True, dtype: torch.dtype | None = None
) -> TextToImage:
    """Load a diffusers checkpoint folder (e.g. BK-SDM-v2-small) as a :class:`TextToImage`.

    Args:
        path: a folder laid out like a diffusers Stable Diffusion pipeline, with ``unet/``
            (``config.json`` + weights), ``vae/`` (``config.json`` + weights) and
            ``scheduler/`` (``scheduler_config.json``). Text encoder and tokenizer folders are
            ignored: the conditioning comes from flora's CLIP text tower. With
            ``local_files_only=False`` it may also be a Hugging Face Hub repository id.
        local_files_only: never touch the network (the default); ``path`` must then be a
            local folder.
        dtype: load the weights in this dtype (e.g. ``torch.float16``); float32 by default.

    The checkpoint's scheduler config (noise schedule, prediction type, timestep spacing) is
    loaded into a ``DDIMScheduler`` whatever scheduler class it names, with
    ``clip_sample=False``, so sampling is deterministic given the initial noise.
    """
    is_dir = os.path.isdir(path)
    if is_dir or local_files_only:
        missing = [
            f"{sub}/{name}" for sub, name in _LAYOUT if not os.path.isfile(os.path.join(path, sub, name))
        ]
        if not is_dir or missing:
            what = "does not exist" if not is_dir else f"lacks {', '.join(missing)}"
            raise FloraConfigError(
                f"diffusion checkpoint {path!r} {what}: expected a diffusers folder with "
                f"unet/config.json, vae/config.json (each with its weights) and scheduler/scheduler_config.json"
            )
    diffusers = _diffusers()
    kwargs: dict[str, Any] = {"local_files_only": local_files_only}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    try:
        unet = diffusers.UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kwargs)
        vae = diffusers.AutoencoderKL.from_pretrained(path, subfolder="vae", **kwargs)
        # clip_sample would clamp the predicted latents to [-1, 1], which is meant for pixels
        scheduler = diffusers.DDIMScheduler.from_pretrained(
            path, subfolder="scheduler", local_files_only=local_files_only, clip_sample=False
        )
    except (OSError, ValueError) as err:
        reason = " ".join(str(err).split())
        raise FloraConfigError(f"cannot load diffusion checkpoint {path!r}: {reason}") from err
    return TextToImage(unet, vae, scheduler)


def load_shipped() -> TextToImage:
    """The tiny generator shipped with flora (:data:`SHIPPED_GENERATOR`).

    It attends to the 128-wide text hidden states of the shipped ``flora-tiny`` CLIP and makes
    32x32 images; docs/diffusion.md says what its images reach.
    """
    return load_pretrained(str(SHIPPED_GENERATOR))
