"""CMFL: clients exchange textual-inversion embeddings, generate images from them and fine-tune with LoRA.

A round has two phases. In ``"invert"`` every sampled client learns the token rows of its
class names (textual inversion, :class:`~flora.prompts.ClassNameEmbeddings`) against its
frozen image tower and sends the rows of the classes it holds, shuffled and without
labels. In ``"train"`` each client receives every word of the round's other senders,
generates images from ``"a photo of a <word>"`` with a frozen text-to-image diffusion
model, pseudo-labels each by its nearest own class, and fine-tunes LoRA on its image
tower with real and generated pairs. Nothing is aggregated: every part is local.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from flora.diffusion import TextToImage, build_tiny, load_pretrained, load_shipped, require_extra
from flora.errors import FloraConfigError
from flora.methods.base import FederatedPromptModule, Role, StateDict, Upload
from flora.methods.options import check_option
from flora.prompts import ClassNameEmbeddings
from flora.prompts.class_tokens import generator_conditioning

WORD_PREFIX = "word."
RECV_PREFIX = "recv."
_GENERATE_BATCH = 16  # images sampled per call of the diffusion model


class LoRADelta(nn.Module):
    """A parametrisation ``W -> W + (alpha / r) B A`` of a frozen weight ``W`` ``(out, in)``.

    ``nn.MultiheadAttention`` reads its projection weights directly (it never calls
    ``out_proj.forward``), so the low-rank update is added to the weights, not to the
    layer's output; the frozen ``W`` itself is never modified.
    """

    def __init__(self, out_features: int, in_features: int, r: int, alpha: float) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.zeros(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))
        self.scale = alpha / r
        self.active = True

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """``A`` as ``nn.Linear`` initialises a weight (uniform, bound ``1/sqrt(in)``), drawn on the CPU; ``B = 0``."""
        bound = 1.0 / math.sqrt(self.lora_A.shape[1])
        a = torch.empty(self.lora_A.shape).uniform_(-bound, bound, generator=generator)
        self.lora_A.copy_(a.to(self.lora_A.device))
        self.lora_B.zero_()

    def forward(self, weight: Tensor) -> Tensor:
        if not self.active:
            return weight
        return weight + self.scale * (self.lora_B @ self.lora_A).to(weight.dtype)


def add_lora(visual: nn.Module, r: int, alpha: float) -> list[LoRADelta]:
    """LoRA on the input (q, k, v) and output projections of every ``nn.MultiheadAttention`` in ``visual``."""
    deltas = []
    for module in list(visual.modules()):
        if not isinstance(module, nn.MultiheadAttention):
            continue
        if module.in_proj_weight is None:
            raise FloraConfigError("CMFL's LoRA needs attention with one packed q/k/v input projection")
        for owner, name in ((module, "in_proj_weight"), (module.out_proj, "weight")):
            out_f, in_f = getattr(owner, name).shape
            delta = LoRADelta(out_f, in_f, r, alpha).to(getattr(owner, name).device)
            parametrize.register_parametrization(owner, name, delta)
            deltas.append(delta)
    if not deltas:
        raise FloraConfigError(f"CMFL found no attention layer for LoRA in {type(visual).__name__}")
    return deltas


class CMFL(FederatedPromptModule):
    """CMFL: textual-inversion words exchanged between clients, generated images, LoRA on the image tower.

    Every learned part is local: the class-name embeddings (``embeddings``, built for the
    first task given) and LoRA (``A``, ``B``) on the attention projections of the image
    tower. The diffusion model and the rest of CLIP are frozen. One AdamW with two groups
    (embeddings: ``embedding_lr`` / ``embedding_weight_decay``; LoRA: ``lora_lr`` and the
    shared ``weight_decay``) serves both phases; in each phase only one group has
    gradients. The shared ``lr`` and ``momentum`` are not used.

    Args:
        embedding_lr, embedding_weight_decay: AdamW settings of the class-name embeddings.
        lora_r, lora_alpha: LoRA rank and scale (``alpha / r``).
        lora_lr: AdamW learning rate of LoRA.
        generated_weight: per-sample loss weight of a generated image (real ones weigh 1).
        images_per_embedding: images generated from every received word.
        diffusion_steps, guidance_scale: DDIM steps and classifier-free guidance weight.
        text_skip_layers: the generator reads the text tower's hidden states this many blocks
            before its last (Stable Diffusion 2 models such as BK-SDM-v2 read the penultimate: 1).
        diffusion: ``"tiny"`` (the small generator shipped with flora, trained for the shipped
            ``flora-tiny`` CLIP: :func:`flora.diffusion.load_shipped`), ``"tiny-random"`` (the
            same architecture randomly initialised, for tests and smoke runs) or the path of a
            local diffusers checkpoint folder whose cross-attention width is the CLIP text
            tower's.
    """

    display_name = "CMFL"
    personalised = True
    feature_kind = "image"
    local_params = ("embeddings",)
    share_eval_text = False  # the class features also follow embeddings_task, a plain attribute
    round_phases = ("invert", "train")

    def __init__(
        self,
        *,
        embedding_lr: float = 1e-3,
        embedding_weight_decay: float = 1e-3,
        lora_r: int = 8,
        lora_alpha: float = 16,
        lora_lr: float = 1e-4,
        generated_weight: float = 0.1,
        images_per_embedding: int = 2,
        diffusion_steps: int = 50,
        guidance_scale: float = 7.5,
        diffusion: str = "tiny",
        text_skip_layers: int = 0,
        **kwargs: Any,
    ) -> None:
        require_extra("CMFL")
        check_option("embedding_lr", embedding_lr, low=0, low_open=True)
        check_option("embedding_weight_decay", embedding_weight_decay, low=0)
        check_option("lora_r", lora_r, low=1, integer=True)
        check_option("lora_alpha", lora_alpha, low=0, low_open=True)
        check_option("lora_lr", lora_lr, low=0, low_open=True)
        check_option("generated_weight", generated_weight, low=0)
        check_option("images_per_embedding", images_per_embedding, low=1, integer=True)
        check_option("diffusion_steps", diffusion_steps, low=1, high=1000, integer=True)
        check_option("guidance_scale", guidance_scale, low=1)
        check_option("text_skip_layers", text_skip_layers, low=0, integer=True)
        if not isinstance(diffusion, str) or not diffusion:
            raise FloraConfigError(
                f"model.diffusion must be 'tiny', 'tiny-random' or a checkpoint folder, got {diffusion!r}"
            )
        super().__init__(**kwargs)
        self.embedding_lr, self.embedding_weight_decay = embedding_lr, embedding_weight_decay
        self.lora_lr, self.generated_weight = lora_lr, generated_weight
        self.images_per_embedding, self.diffusion_steps = images_per_embedding, diffusion_steps
        self.guidance_scale, self.text_skip_layers = guidance_scale, text_skip_layers
        self.lora = add_lora(self.backbone.model.visual, lora_r, lora_alpha)  # plain list: not a submodule
        self.diffusion = self._build_diffusion(diffusion)
        self.embeddings: ClassNameEmbeddings | None = None
        self.embeddings_task: list[str] = []
        self.received: list[Tensor] = []  # words downloaded for this phase
        self.round_words: dict[int, list[Tensor]] = {}  # server: this round's words, by sender
        self.register_buffer("present", torch.zeros(0, dtype=torch.bool), persistent=False)
        self.register_buffer("generated_x", torch.empty(0), persistent=False)
        self.register_buffer("generated_y", torch.empty(0, dtype=torch.long), persistent=False)
        self._cursor = 0

    def _build_diffusion(self, diffusion: str) -> TextToImage:
        width = self.backbone.token_width
        if diffusion == "tiny-random":
            return build_tiny(width, image_size=self.backbone.image_size)
        model = load_shipped() if diffusion == "tiny" else load_pretrained(diffusion)
        if model.cross_attention_dim != width:
            hint = (
                " (the shipped 'tiny' generator is made for clip_model flora-tiny)"
                if diffusion == "tiny"
                else ""
            )
            raise FloraConfigError(
                f"model.diffusion {diffusion!r} attends to {model.cross_attention_dim}-wide text states; "
                f"the CLIP text tower of {self.backbone.model_name} gives {width}{hint}"
            )
        return model

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled by its options, tasks and tensors (for ``ddp_spawn``): torch cannot pickle LoRA's parametrizations."""
        tasks = (
            [self.embeddings_task, self.class_names] if self.embeddings is not None else [self.class_names]
        )
        return (_rebuild, (type(self), dict(self.hparams), tasks, self.state_dict()))

    @classmethod
    def budget_options(cls, n_ctx: int, rank: int, lr: float) -> dict[str, Any]:
        """No learned context: the benchmark's shared ``rank`` is the LoRA rank."""
        return {"lora_r": rank}

    # ------------------------------------------------------------------ task
    def set_task(self, class_names: Sequence[str]) -> None:
        """The embeddings belong to the first task; under another (Novel) the template's features are used."""
        super().set_task(class_names)
        if self.embeddings is None:
            self.embeddings = ClassNameEmbeddings(self.backbone, self.class_names, self.template)
            self.embeddings.to(self.anchor.device)
            self.embeddings_task = list(self.class_names)
        self.present = torch.zeros(self.num_classes, dtype=torch.bool, device=self.anchor.device)

    @property
    def on_own_task(self) -> bool:
        return self.embeddings is not None and self.class_names == self.embeddings_task

    # ------------------------------------------------------------ parameters
    def parameter_roles(self) -> dict[str, Role]:
        roles = super().parameter_roles()
        for name, _ in self.named_parameters():
            if name.startswith("backbone.") and ".lora_" in name:
                roles[name] = Role.LOCAL
        return roles

    def reset_local_parameters(self, generator: torch.Generator) -> None:
        """Embeddings back to the class names' own rows; LoRA ``A`` from ``generator``, ``B = 0``."""
        if self.embeddings is not None:
            self.embeddings.reset_parameters()
        for delta in self.lora:
            delta.reset_parameters(generator)
        self._eval_text = None

    @property
    def has_global_model(self) -> bool:
        return False

    def configure_optimizers(self) -> torch.optim.Optimizer:
        embeddings = [] if self.embeddings is None else [self.embeddings.rows]
        lora = [p for d in self.lora for p in (d.lora_A, d.lora_B)]
        groups = [
            {"params": embeddings, "lr": self.embedding_lr, "weight_decay": self.embedding_weight_decay},
            {"params": lora, "lr": self.lora_lr, "weight_decay": self.hparams.weight_decay},
        ]
        return torch.optim.AdamW(groups)

    # ------------------------------------------------------ client messages
    def upload_state(self) -> StateDict:
        """Phase ``invert``: the words of the classes trained on, shuffled (no label, no class index)."""
        if self.phase != "invert" or self.embeddings is None:
            return {}
        words = self.embeddings.words()
        present = self.present.nonzero().flatten().cpu().tolist()
        order = torch.randperm(len(present)).tolist()  # the CPU RNG the trainer seeds per turn
        return {
            f"{WORD_PREFIX}{k}": words[present[i]].detach().to("cpu", copy=True) for k, i in enumerate(order)
        }

    def aggregate(self, uploads: Sequence[Upload], current: StateDict) -> StateDict:
        if self.phase == "invert":
            self.round_words = {
                u.client_id: [u.state[f"{WORD_PREFIX}{k}"] for k in range(len(u.state))]
                for u in sorted(uploads, key=lambda u: u.client_id)
            }
        else:  # the round is over: the server keeps nothing for the next one
            self.round_words = {}
        return current

    def download_state(self, client_id: int, global_state: StateDict) -> StateDict:
        """Phase ``train``: every word of the round's other senders, as ``recv.0``, ``recv.1``, ..."""
        if self.phase != "train":
            return global_state
        words = [w for c, ws in sorted(self.round_words.items()) if c != client_id for w in ws]
        return {**global_state, **{f"{RECV_PREFIX}{k}": w for k, w in enumerate(words)}}

    def evaluation_state(self, client_id: int, global_state: StateDict) -> StateDict:
        return global_state

    def load_global_state(self, state: StateDict) -> None:
        keys = sorted((k for k in state if k.startswith(RECV_PREFIX)), key=lambda k: int(k.split(".")[1]))
        device = self.anchor.device
        self.received = [state[k].to(device) for k in keys]
        super().load_global_state({k: v for k, v in state.items() if not k.startswith(RECV_PREFIX)})

    # ------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, words: Sequence[Tensor], generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``images_per_embedding`` CLIP-ready images per word and each one's nearest own class."""
        if self.embeddings is None:
            raise RuntimeError("CMFL.set_task(class_names) must be called first")
        backbone = self.backbone
        cond, uncond, x, eot = generator_conditioning(backbone, self.template, words, self.text_skip_layers)
        cond = cond.repeat_interleave(self.images_per_embedding, 0)
        own = self.embeddings.text_features(backbone)
        labels = (backbone.encode_embedded(x, eot) @ own.t().to(x.dtype)).argmax(-1)
        images = [
            self.diffusion.generate(
                cond[i : i + _GENERATE_BATCH], uncond, self.diffusion_steps, self.guidance_scale, generator
            )
            for i in range(0, len(cond), _GENERATE_BATCH)
        ]
        return backbone.normalise_images(torch.cat(images)), labels.repeat_interleave(
            self.images_per_embedding
        )

    def before_local_training(self, batches: Iterable[Sequence[Tensor]]) -> None:
        """Phase ``invert``: forget the classes seen; phase ``train``: generate from the received words."""
        self.present = torch.zeros(self.num_classes, dtype=torch.bool, device=self.anchor.device)
        self.generated_x = torch.empty(0, device=self.anchor.device)
        self.generated_y = torch.empty(0, dtype=torch.long, device=self.anchor.device)
        self._cursor = 0
        if self.phase == "train" and self.received and self.on_own_task:
            seed = int(torch.randint(0, 2**62, (1,)))  # from the global CPU RNG the trainer seeds
            x, y = self.generate(self.received, torch.Generator().manual_seed(seed))
            self.generated_x, self.generated_y = x.float(), y

    def _next_generated(self, n: int) -> tuple[Tensor, Tensor]:
        total = len(self.generated_y)
        if total == 0 or n == 0:
            return self.generated_x[:0], self.generated_y[:0]
        idx = (self._cursor + torch.arange(min(n, total))) % total
        self._cursor = (self._cursor + len(idx)) % total
        idx = idx.to(self.generated_y.device)
        return self.generated_x[idx], self.generated_y[idx]

    # --------------------------------------------------------------- forward
    @contextmanager
    def _lora_off(self) -> Iterator[None]:
        for delta in self.lora:
            delta.active = False
        try:
            yield
        finally:
            for delta in self.lora:
                delta.active = True

    def image_features(self, x: Tensor) -> Tensor:
        """Raw images through the image tower with LoRA (gradients only while training phase ``train``)."""
        if x.dim() != 4:
            return x
        if self.is_zero_shot:
            with self._lora_off():
                return self.backbone.encode_image(x)
        if self.training and self.phase == "train" and torch.is_grad_enabled():
            return self.backbone.model.encode_image(x)
        return self.backbone.encode_image(x)

    def text_features(self) -> Tensor:
        """The client's learned class-name features (the template's under a task other than its own)."""
        if not self.on_own_task:
            return super().text_features()
        assert self.embeddings is not None
        return self.embeddings.text_features(self.backbone)

    def compute_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if self.phase == "invert":
            self.present[y] = True
            logits = self.logits_from(self.image_side(self.image_features(x)), self.text_features())
            loss = F.cross_entropy(logits, y)
            return loss, {"ce": loss.detach()}
        gx, gy = self._next_generated(len(y))
        with torch.no_grad():
            text = self.text_features()
        images = torch.cat([x, gx.to(x.dtype)]) if len(gy) else x
        logits = self.logits_from(self.image_side(self.image_features(images)), text)
        ce = F.cross_entropy(logits, torch.cat([y, gy]), reduction="none")
        w = torch.cat([torch.ones_like(ce[: len(y)]), torch.full_like(ce[len(y) :], self.generated_weight)])
        loss = (w * ce).sum() / w.sum()
        return loss, {"ce": loss.detach()}

    # ----------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep LoRA (under ``backbone.``) in Lightning checkpoints; drop the frozen diffusion model."""
        lora = {k: v for k, v in checkpoint.get("state_dict", {}).items() if ".lora_" in k}
        super().on_save_checkpoint(checkpoint)
        sd = checkpoint.get("state_dict", {})
        for key in [k for k in sd if k.startswith("diffusion.")]:
            del sd[key]
        sd.update(lora)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        sd = checkpoint.get("state_dict", {})
        for key, value in self.state_dict().items():
            if key.startswith("diffusion."):
                sd.setdefault(key, value)


def _rebuild(cls: type[CMFL], options: dict[str, Any], tasks: list[list[str]], state: StateDict) -> CMFL:
    """The module :meth:`CMFL.__reduce__` describes: built from its options, its tasks set, its tensors loaded."""
    module = cls(**options)
    for task in tasks:
        if task:
            module.set_task(task)
    module.load_state_dict(state)
    return module
