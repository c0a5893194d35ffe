"""A frozen open_clip model exposing exactly what prompt learners need.

* image features: the pooled ``global`` embedding, or per-patch ``patch`` tokens after
  the final LayerNorm and projection;
* the prompted text tower: learned context vectors replace token positions
  ``1..n_ctx`` of ``"X X ... X {classname}."``; sequences are truncated at the longest
  EOT position + 1, which is exact because the text transformer is causal;
* tokenised class names and anchor features of a hand-written template.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

_CONFIG_DIR = Path(__file__).parent / "model_configs"
_WEIGHTS_DIR = Path(__file__).parent / "weights"
open_clip.add_model_config(_CONFIG_DIR)


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be found or downloaded."""


def list_flora_models() -> list[str]:
    """Model configs shipped with flora (usable as ``model_name``)."""
    return sorted(p.stem for p in _CONFIG_DIR.glob("*.json"))


#: flora models whose ViT patchifies with a small convolutional stem instead of one
#: patch-size convolution: channels of the stride-1 conv, then of each stride-2 conv
#: (log2(patch_size) of them). Early convolutions make a small ViT far more
#: data-efficient (Xiao et al., 2021), which is what a tower pretrained in minutes needs.
CONV_STEMS: dict[str, tuple[int, ...]] = {"flora-tiny": (32, 64, 128, 128)}


class ConvStem(nn.Sequential):
    """3x3 conv (stride 1), then 3x3 convs of stride 2 down to the ViT's patch grid, then a
    1x1 conv to its width; GELU between. A drop-in for the ViT's ``conv1``: same input,
    same ``(B, width, grid, grid)`` output."""

    def __init__(self, channels: tuple[int, ...], width: int, patch_size: int) -> None:
        if 2 ** (len(channels) - 1) != patch_size:
            raise ValueError(
                f"a conv stem for patch size {patch_size} needs {patch_size.bit_length()} channel "
                f"entries (one stride-1 conv, then one stride-2 conv per halving), got {list(channels)}"
            )
        layers: list[nn.Module] = [nn.Conv2d(3, channels[0], 3, 1, 1), nn.GELU()]
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, 2, 1), nn.GELU()]
        layers.append(nn.Conv2d(channels[-1], width, 1))
        super().__init__(*layers)


def _install_conv_stem(model: nn.Module, model_name: str) -> nn.Module:
    channels = CONV_STEMS.get(model_name)
    if channels is not None:
        visual = model.visual
        patch = visual.conv1.kernel_size[0]
        visual.conv1 = ConvStem(channels, visual.conv1.out_channels, patch)
    return model


def _shipped_weights(model_name: str) -> Path | None:
    for suffix in (".safetensors", ".pt"):
        path = _WEIGHTS_DIR / f"{model_name}{suffix}"
        if path.exists():
            return path
    return None


class ClassPrompts(nn.Module):
    """Tokenised ``"X X ... X {classname}."`` prompts, truncated at the longest EOT.

    Holds the frozen token embeddings of the parts that are not learned: ``prefix``
    (the start token) and ``suffix`` (class name, full stop, EOT and padding up to the
    truncation length). Buffers are non-persistent: they are rebuilt from the class
    names and never written into checkpoints.
    """

    def __init__(self, tokens: Tensor, eot: Tensor, prefix: Tensor, suffix: Tensor, n_ctx: int) -> None:
        super().__init__()
        self.n_ctx = n_ctx
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("eot", eot, persistent=False)
        self.register_buffer("prefix", prefix, persistent=False)
        self.register_buffer("suffix", suffix, persistent=False)

    @property
    def num_classes(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def length(self) -> int:
        return int(self.tokens.shape[1])


class CLIPBackbone(nn.Module):
    """A frozen open_clip model.

    Args:
        model_name: an open_clip architecture (``"ViT-B-16"``) or one shipped with flora
            (``"flora-tiny"``).
        pretrained: an open_clip pretrained tag (``"openai"``), a path to a checkpoint
            file, ``"shipped"`` for the weights bundled with flora, or ``None`` for a
            random initialisation (seeded by ``init_seed``).
        cache_dir: where open_clip caches downloaded weights.
        init_seed: seed of the random initialisation when ``pretrained`` is ``None``.
    """

    def __init__(
        self,
        model_name: str = "flora-tiny",
        pretrained: str | None = None,
        cache_dir: str | None = None,
        init_seed: int = 0,
    ) -> None:
        super().__init__()
        self.model_name = model_name
        self.model = _create_model(model_name, pretrained, cache_dir, init_seed)
        self.model.requires_grad_(False)
        self.model.eval()
        self.preprocess = open_clip.image_transform(
            self.model.visual.image_size,
            is_train=False,
            mean=getattr(self.model.visual, "image_mean", None),
            std=getattr(self.model.visual, "image_std", None),
        )
        self.tokenizer = open_clip.get_tokenizer(model_name)
        text = text_tower_parts(self.model, model_name)
        self._token_embedding = text["token_embedding"]
        self._positional_embedding = text["positional_embedding"]
        self._text_projection = text["text_projection"]
        self._text = text
        self._fingerprint: str | None = None
        #: when ``profiling`` is on, seconds spent in the image tower and the text tower
        self.profiling = False
        self.timings: dict[str, float] = {"image": 0.0, "text": 0.0}
        self._compiled_text: dict[Any, Any] | None = None  # compile_text()
        self._compile_options: dict[str, Any] = {}
        #: run the text tower's last block from the EOT token alone (:func:`run_text_tower`)
        self.pool_last = True
        #: compute the start token and a context shared by all classes once per context,
        #: not once per class (:func:`run_shared_text_tower`)
        self.share_prefix = True
        #: how the shared pass's tail queries attend: auto | sdpa | split (:func:`run_shared_text_tower`)
        self.tail_attention = "auto"

    def compile_text(self, enabled: bool = True, **options: Any) -> None:
        """Run the text tower through ``torch.compile`` (``enabled=False``: eagerly again).

        Compiling takes seconds to a minute the first time each shape is seen (a new
        number of prompts, training vs evaluation); after that the tower runs as fused
        kernels. Results equal the eager tower up to floating-point rounding. ``options``
        go to ``torch.compile`` (e.g. ``mode="reduce-overhead"``, ``backend="aot_eager"``).
        Not carried when the backbone is pickled or copied (a copy runs eagerly until this
        is called).
        """
        self._compiled_text = {} if enabled else None  # tower function -> compiled, made on first use
        self._compile_options = options

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        return {**state, "_compiled_text": None}  # a compiled function neither pickles nor copies

    @contextmanager
    def _timed(self, key: str) -> Iterator[None]:
        if not self.profiling:
            yield
            return
        sync = torch.cuda.synchronize if self.model.logit_scale.is_cuda else (lambda: None)
        sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            sync()
            self.timings[key] += time.perf_counter() - start

    # ------------------------------------------------------------------ structure
    def train(self, mode: bool = True) -> CLIPBackbone:
        """The backbone is frozen: it always stays in eval mode."""
        return super().train(False)

    @property
    def embed_dim(self) -> int:
        """Width of the joint image-text embedding space (``d``)."""
        proj = self._text_projection
        if isinstance(proj, nn.Linear):
            return proj.out_features
        return int(proj.shape[1]) if proj is not None else self.token_width

    @property
    def token_width(self) -> int:
        """Width of the text tower's token embeddings (``d_t``)."""
        return int(self._token_embedding.weight.shape[1])

    @property
    def context_length(self) -> int:
        return int(self._positional_embedding.shape[0])

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, tuple | list) else size)

    @property
    def logit_scale(self) -> Tensor:
        """CLIP's frozen temperature ``s = exp(logit_scale)``."""
        return self.model.logit_scale.detach().exp()

    def fingerprint(self) -> str:
        """A short hash of the architecture and weights (keys feature caches)."""
        if self._fingerprint is None:
            h = hashlib.sha256(self.model_name.encode())
            for name, tensor in sorted(self.model.state_dict().items()):
                h.update(name.encode())
                t = tensor.detach().float().cpu().contiguous()
                h.update(t.numpy().tobytes()[:4096])
                h.update(str(float(t.sum())).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    # --------------------------------------------------------------------- image
    def normalise_images(self, images: Tensor) -> Tensor:
        """Images in ``[0, 1]`` ``(B, 3, H, W)`` of any size -> the image tower's input.

        Resized (bicubic, antialiased) to :attr:`image_size` when they differ, then normalised
        with the model's mean and std, as :attr:`preprocess` does for a PIL image.
        """
        size = self.image_size
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)
        norm = next(t for t in self.preprocess.transforms if hasattr(t, "mean") and hasattr(t, "std"))
        mean = torch.tensor(norm.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(norm.std, device=images.device).view(1, -1, 1, 1)
        return (images - mean) / std

    @torch.no_grad()
    def encode_image(self, images: Tensor) -> Tensor:
        """Pooled image embedding (not normalised), shape ``(B, d)``."""
        with self._timed("image"):
            return self.model.encode_image(images)

    @torch.no_grad()
    def encode_image_tokens(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(global (B, d), patch (B, M, d))``, patch tokens after the final LayerNorm and projection."""
        visual = self.model.visual
        if not isinstance(visual, open_clip.transformer.VisionTransformer) or visual.attn_pool is not None:
            raise ValueError(
                f"patch features need a plain ViT image tower; {self.model_name} has {type(visual).__name__}"
            )
        with self._timed("image"):
            x = visual._embeds(images)
            x = visual.transformer(x)
            x = visual.ln_post(x)
            pooled, tokens = visual._global_pool(x)
            if visual.proj is not None:
                pooled = pooled @ visual.proj
                tokens = tokens @ visual.proj
        return pooled, tokens

    # ---------------------------------------------------------------------- text
    def tokenize(self, texts: list[str]) -> Tensor:
        return self.tokenizer(texts)

    @torch.no_grad()
    def build_class_prompts(self, class_names: list[str], n_ctx: int) -> ClassPrompts:
        """Tokenise ``"X" * n_ctx + classname + "."`` for every class and cache the frozen embeddings."""
        if n_ctx < 0:
            raise ValueError("n_ctx must be >= 0")
        placeholder = " ".join(["X"] * n_ctx)
        texts = [f"{placeholder} {name.replace('_', ' ')}.".strip() for name in class_names]
        for name, text in zip(class_names, texts):
            n_tokens = len(self.tokenizer.encode(text)) + 2 if hasattr(self.tokenizer, "encode") else 0
            if n_tokens > self.context_length:
                raise ValueError(
                    f"prompt for class {name!r} with n_ctx={n_ctx} needs {n_tokens} tokens, more than the text "
                    f"context length {self.context_length}; use a smaller n_ctx or a shorter class name"
                )
        tokens = self.tokenize(texts).to(self._token_embedding.weight.device)
        eot = tokens.argmax(dim=-1)
        length = int(eot.max()) + 1
        tokens = tokens[:, :length]
        emb = self._token_embedding(tokens)
        return ClassPrompts(tokens, eot, emb[:, :1].clone(), emb[:, 1 + n_ctx :].clone(), n_ctx)

    def _run_text(self, x: Tensor, eot: Tensor) -> Tensor:
        return self._run_tower(run_text_tower, x, eot)

    def _run_tower(self, tower: Any, *args: Tensor, **options: Any) -> Tensor:
        """``tower`` (:func:`run_text_tower` or :func:`run_shared_text_tower`), compiled if asked."""
        with self._timed("text"):
            if self._compiled_text is None:
                return tower(self._text, *args, pool_last=self.pool_last, **options)
            compiled = self._compiled_text.get(tower)
            if compiled is None:
                compiled = self._compiled_text[tower] = torch.compile(tower, **self._compile_options)
            try:
                return compiled(self._text, *args, pool_last=self.pool_last, **options)
            except (torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.TritonUnavailableError) as err:
                from flora.errors import FloraRunError

                inner = getattr(err, "inner_exception", None) or err
                reason = f"{type(inner).__name__}: {(str(inner).strip().splitlines() or [''])[0]}"
                raise FloraRunError(
                    f"compile_text: torch.compile could not compile the text tower on this machine ({reason}); "
                    "run with trainer.compile_text false"
                ) from err

    def encode_prompted(self, ctx: Tensor, prompts: ClassPrompts) -> Tensor:
        """Normalised text features of every class with learned context ``ctx``.

        ``ctx`` is ``(n_ctx, d_t)`` (one context shared by all classes), ``(P, n_ctx, d_t)``
        (P prompt variants in one batched call) or ``(P, n_cls, n_ctx, d_t)`` (class-specific
        context). Returns ``(n_cls, d)`` or ``(P, n_cls, d)``.
        """
        squeeze = ctx.dim() == 2
        if squeeze:
            ctx = ctx.unsqueeze(0)
        n_cls = prompts.num_classes
        shared = ctx.dim() == 3  # one context for every class
        if shared:
            ctx = ctx.unsqueeze(1).expand(-1, n_cls, -1, -1)
        if ctx.shape[1:3] != (n_cls, prompts.n_ctx):
            raise ValueError(
                f"context of shape {tuple(ctx.shape)} does not match {n_cls} classes x {prompts.n_ctx} tokens"
            )
        n_var = ctx.shape[0]
        if shared and self.share_prefix and shares_prefix(self._text):
            head = torch.cat([prompts.prefix[:1].expand(n_var, -1, -1).to(ctx.dtype), ctx[:, 0]], dim=1)
            tail = prompts.suffix.to(ctx.dtype).repeat(n_var, 1, 1)
            feats = self._run_tower(
                run_shared_text_tower,
                head,
                tail,
                prompts.eot.repeat(n_var),
                tail_attention=self.tail_attention,
            )
            feats = F.normalize(feats, dim=-1).reshape(n_var, n_cls, -1)
            return feats[0] if squeeze else feats
        prefix = prompts.prefix.unsqueeze(0).expand(n_var, -1, -1, -1).to(ctx.dtype)
        suffix = prompts.suffix.unsqueeze(0).expand(n_var, -1, -1, -1).to(ctx.dtype)
        x = torch.cat([prefix, ctx, suffix], dim=2).reshape(n_var * n_cls, prompts.length, -1)
        feats = F.normalize(self._run_text(x, prompts.eot.repeat(n_var)), dim=-1)
        feats = feats.reshape(n_var, n_cls, -1)
        return feats[0] if squeeze else feats

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """The frozen token embeddings ``(..., L, d_t)`` of token ids ``(..., L)``."""
        return self._token_embedding(tokens.to(self._token_embedding.weight.device))

    def encode_embedded(self, x: Tensor, eot: Tensor) -> Tensor:
        """Normalised text features of token embeddings ``x`` ``(B, L, d_t)`` pooled at ``eot`` ``(B,)``."""
        return F.normalize(self._run_text(x, eot), dim=-1)

    def text_hidden_states(self, x: Tensor, skip_last: int = 0) -> Tensor:
        """The text tower's hidden states ``(B, L, d_t)`` of token embeddings ``x``.

        The transformer's outputs after the final LayerNorm, every position: what a
        text-conditioned image generator attends to. ``skip_last`` takes them from an
        earlier layer (Stable Diffusion 2 models were trained on the penultimate: 1).
        """
        with self._timed("text"):
            return self._text["ln_final"](run_transformer(self._text, x, skip_last))

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        """Normalised features of plain texts through the same (truncated) path."""
        tokens = self.tokenize(texts).to(self._token_embedding.weight.device)
        return F.normalize(encode_token_ids(self._text, tokens), dim=-1)

    @torch.no_grad()
    def anchor_features(self, class_names: list[str], template: str = "a photo of a {}.") -> Tensor:
        """``z0``: normalised features of a hand-written template for every class."""
        return self.encode_text([template.format(n.replace("_", " ")) for n in class_names])


def text_tower_parts(model: nn.Module, model_name: str = "model") -> dict[str, Any]:
    """The pieces of an open_clip text tower (``CLIP`` or ``CustomTextCLIP``) needed to prompt it."""
    t = model.text if hasattr(model, "text") else model
    if getattr(t, "cls_emb", None) is not None:
        raise ValueError(f"{model_name}: text towers with a class token cannot be prompted")
    pool = getattr(t, "pool_type", getattr(model, "text_pool_type", "argmax"))
    if pool != "argmax":
        raise ValueError(f"{model_name}: only argmax (EOT) pooled text towers can be prompted, not {pool!r}")
    return {
        "token_embedding": t.token_embedding,
        "positional_embedding": t.positional_embedding,
        "transformer": t.transformer,
        "ln_final": t.ln_final,
        "text_projection": t.text_projection,
        "attn_mask": t.attn_mask,
    }


def run_transformer(parts: dict[str, Any], x: Tensor, skip_last: int = 0) -> Tensor:
    """Token embeddings ``(B, L, d_t)`` -> the causal transformer's outputs ``(B, L, d_t)``.

    ``skip_last`` leaves out that many final blocks (the output of an earlier layer).
    """
    length = x.shape[1]
    x = x + parts["positional_embedding"][:length].to(x.dtype)
    mask = parts["attn_mask"]
    if mask is not None:
        mask = mask[:length, :length].to(x.device)
    transformer = parts["transformer"]
    if skip_last == 0:
        return transformer(x, attn_mask=mask)
    blocks = transformer.resblocks
    if not 0 < skip_last < len(blocks):
        raise ValueError(f"skip_last must be in [0, {len(blocks)}), got {skip_last}")
    batch_first = getattr(transformer, "batch_first", True)
    x = x if batch_first else x.transpose(0, 1)
    for block in blocks[: len(blocks) - skip_last]:
        x = block(x, attn_mask=mask)
    return x if batch_first else x.transpose(0, 1)


def run_text_tower(parts: dict[str, Any], x: Tensor, eot: Tensor, *, pool_last: bool = True) -> Tensor:
    """Token embeddings ``(B, L, d_t)`` -> pooled, projected text features ``(B, d)``.

    ``L`` may be shorter than the model's context: the mask is causal, so the EOT feature
    only depends on the tokens before it and truncating at the longest EOT is exact.

    For the same reason only the EOT row of the last block's output is ever read: with
    ``pool_last`` (and a standard open_clip block) the last block attends from the EOT
    token alone and runs its MLP on that one row; keys and values still come from every
    position up to EOT. The result equals the full pass up to floating-point rounding and
    saves most of one block's work (a quarter of flora-tiny's 4-block text tower).
    """
    transformer = parts["transformer"]
    blocks = transformer.resblocks
    last = blocks[-1]
    # EOT-only is exact for a causal tower (the mask is what makes later keys irrelevant)
    pooled = pool_last and len(blocks) > 1 and parts["attn_mask"] is not None and _poolable(transformer, last)
    if pooled:
        x = _last_block_at(last, run_transformer(parts, x, skip_last=1), eot)
    else:
        x = run_transformer(parts, x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
    return _project(parts, x)  # LayerNorm is per token: pooling first is the same, and cheaper


def _project(parts: dict[str, Any], x: Tensor) -> Tensor:
    """Pooled tower outputs ``(B, d_t)`` -> text features ``(B, d)``: final LayerNorm and projection."""
    x = parts["ln_final"](x)
    proj = parts["text_projection"]
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return x


def _poolable(transformer: nn.Module, block: nn.Module) -> bool:
    """Whether ``block`` is open_clip's standard causal self-attention block, run batch-first."""
    return (
        type(block) is open_clip.transformer.ResidualAttentionBlock
        and not hasattr(block, "ln_1_kv")
        and getattr(transformer, "batch_first", False)
        and not getattr(transformer, "grad_checkpointing", False)
        and isinstance(block.attn, nn.MultiheadAttention)
        and block.attn.batch_first
    )


def _last_block_at(block: nn.Module, h: Tensor, eot: Tensor) -> Tensor:
    """The output ``(B, d_t)`` of a causal ``block`` at position ``eot`` of each sequence of ``h``."""
    rows = torch.arange(h.shape[0], device=h.device)
    eot = eot.to(h.device)
    kv = block.ln_1(h)
    query = kv[rows, eot].unsqueeze(1)
    # causal mask of the EOT query: every key after a sequence's own EOT is left out
    after = torch.arange(h.shape[1], device=h.device).unsqueeze(0) > eot.unsqueeze(1)
    attended = block.attn(query, kv, kv, need_weights=False, key_padding_mask=after)[0].squeeze(1)
    y = h[rows, eot] + block.ls_1(attended)
    return y + block.ls_2(block.mlp(block.ln_2(y)))


def run_shared_text_tower(
    parts: dict[str, Any],
    head: Tensor,
    tail: Tensor,
    eot: Tensor,
    *,
    pool_last: bool = True,
    tail_attention: str = "auto",
) -> Tensor:
    """Pooled, projected text features ``(N, d)`` of sequences that share their first tokens.

    ``tail`` ``(G * C, s, d_t)`` holds G groups of C sequences, one after the other;
    sequence ``i`` is ``cat(head[i // C], tail[i])``. ``head`` ``(G, p, d_t)`` holds the
    first ``p`` token embeddings, common to every sequence of a group (the start token and
    a learned context shared by all classes), ``tail`` the rest (class name, full stop,
    EOT), ``eot`` ``(G * C,)`` the EOT position in the whole sequence.

    The mask is causal, so the first ``p`` positions of every sequence of a group have
    the same activations in every block: each block computes them once per group, and
    the tail positions attend to the group's keys and values. With C classes and one
    context that is ``p + C s`` rows of work instead of ``C (p + s)``. The result equals
    :func:`run_text_tower` on the concatenated sequences up to floating-point rounding.
    Call it only where :func:`shares_prefix` holds.

    ``tail_attention`` is how the tail queries attend: ``sdpa`` gives every sequence a
    copy of its group's head keys and values and runs one fused attention;
    ``split`` scores the queries against each group's head keys in one product per group
    and against their own tail keys apart, with one softmax over both, and copies no keys
    (:func:`_split_attention`: faster on a CPU, where the fused kernel's cost grows with the
    number of short sequences); ``auto`` takes ``split`` on a CPU and ``sdpa`` elsewhere.
    """
    if tail_attention not in ("auto", "sdpa", "split"):
        raise ValueError(f"tail_attention must be auto, sdpa or split, got {tail_attention!r}")
    split_tail = tail_attention == "split" or (tail_attention == "auto" and tail.device.type == "cpu")
    blocks = parts["transformer"].resblocks
    p, s = head.shape[1], tail.shape[1]
    pos = parts["positional_embedding"]
    head = head + pos[:p].to(head.dtype)
    tail = tail + pos[p : p + s].to(tail.dtype)
    # tail position j sees the whole head and the tail up to j
    seen = torch.arange(p + s, device=tail.device).unsqueeze(0) <= (
        p + torch.arange(s, device=tail.device)
    ).unsqueeze(1)
    for block in blocks[:-1] if pool_last else blocks:
        head, tail = _shared_block(block, head, tail, seen, split_tail=split_tail)
    if pool_last:
        rows = torch.arange(tail.shape[0], device=tail.device)
        at = eot.to(tail.device) - p
        x = _shared_block(blocks[-1], head, tail, seen[at], query_at=at, split_tail=split_tail)[1][rows, 0]
    else:
        x = tail[torch.arange(tail.shape[0], device=tail.device), eot.to(tail.device) - p]
    return _project(parts, x)


def shares_prefix(parts: dict[str, Any]) -> bool:
    """Whether :func:`run_shared_text_tower` can run this text tower: standard open_clip
    causal blocks, batch-first, one fused input projection and no attention dropout."""
    transformer = parts["transformer"]
    return parts["attn_mask"] is not None and all(
        _poolable(transformer, b)
        and b.attn._qkv_same_embed_dim
        and b.attn.in_proj_weight is not None
        and b.attn.bias_k is None
        and not b.attn.add_zero_attn
        and b.attn.dropout == 0
        for b in transformer.resblocks
    )


def _shared_block(
    block: nn.Module,
    head: Tensor,
    tail: Tensor,
    seen: Tensor,
    query_at: Tensor | None = None,
    *,
    split_tail: bool = False,
) -> tuple[Tensor, Tensor]:
    """One causal block on shared ``head`` rows and the ``tail`` rows that continue them.

    ``seen`` ``(s, p + s)`` (or ``(N, p + s)`` with ``query_at``): which keys each tail
    query attends to. With ``query_at`` ``(N,)`` only that tail position of each sequence
    is computed (the last block, read at EOT) and the head is returned as it came. Head
    and tail rows go through the LayerNorms and linear layers as one matrix. ``split_tail``: the
    tail queries attend through :func:`_split_attention` instead of one fused attention.
    """
    attn = block.attn
    n_heads = attn.num_heads
    (n_groups, p, d), (n_seq, s, _) = head.shape, tail.shape

    def split(t: Tensor) -> Tensor:  # (B, L, d) -> (B, heads, L, d / heads)
        return t.unflatten(-1, (n_heads, -1)).transpose(1, 2)

    def merge(t: Tensor) -> Tensor:
        return t.transpose(1, 2).flatten(2)

    rows = torch.cat([head.reshape(-1, d), tail.reshape(-1, d)])
    normed = block.ln_1(rows)
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    if query_at is None:
        q, k, v = F.linear(normed, weight, bias).chunk(3, dim=-1)
        q_head, q_tail = q[: n_groups * p].view(n_groups, p, d), q[n_groups * p :].view(n_seq, s, d)
        residual = rows
    else:  # keys and values everywhere, one query per sequence
        k, v = F.linear(normed, weight[d:], None if bias is None else bias[d:]).chunk(2, dim=-1)
        at = n_groups * p + torch.arange(n_seq, device=tail.device) * s + query_at
        q_tail = F.linear(normed[at], weight[:d], None if bias is None else bias[:d]).unsqueeze(1)
        residual = rows[at]
        seen = seen[:, None, None]  # (N, 1, 1, p + s): each sequence its own
    k_head, k_tail = k[: n_groups * p].view(n_groups, p, d), k[n_groups * p :].view(n_seq, s, d)
    v_head, v_tail = v[: n_groups * p].view(n_groups, p, d), v[n_groups * p :].view(n_seq, s, d)
    per_group = n_seq // n_groups

    if split_tail:  # every tail query sees the whole head: only the tail part of the mask matters
        tail_seen = seen[..., p:] if query_at is None else seen[..., p:].view(n_groups, 1, per_group, 1, s)
        out = _split_attention(q_tail, k_head, v_head, k_tail, v_tail, tail_seen, n_heads)
    else:

        def grouped(t: Tensor) -> Tensor:  # (G, p, d) -> (G * C, p, d): each group's rows for its sequences
            return t.unsqueeze(1).expand(-1, per_group, -1, -1).reshape(n_seq, p, d)

        keys = torch.cat([grouped(k_head), k_tail], dim=1)
        values = torch.cat([grouped(v_head), v_tail], dim=1)
        out = merge(F.scaled_dot_product_attention(split(q_tail), split(keys), split(values), attn_mask=seen))
    out = out.reshape(-1, d)
    if query_at is None:
        out_head = merge(
            F.scaled_dot_product_attention(split(q_head), split(k_head), split(v_head), is_causal=True)
        )
        out = torch.cat([out_head.reshape(-1, d), out])
    x = residual + block.ls_1(attn.out_proj(out))
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    if query_at is not None:
        return head, x.unsqueeze(1)
    return x[: n_groups * p].view(n_groups, p, d), x[n_groups * p :].view(n_seq, s, d)


def _split_attention(
    q: Tensor, k_head: Tensor, v_head: Tensor, k_tail: Tensor, v_tail: Tensor, tail_seen: Tensor, n_heads: int
) -> Tensor:
    """Tail queries ``q`` ``(G * C, m, d)`` attending to their group's head keys ``(G, p, d)``
    (all of them) and to their own sequence's tail keys ``(G * C, s, d)`` where ``tail_seen``
    (broadcast to ``(G, heads, C, m, s)``) holds: scaled dot-product attention with one
    softmax over both parts, as :func:`torch.nn.functional.scaled_dot_product_attention`
    over the concatenated keys computes it. Returns ``(G * C, m, d)``.

    The head part is one product per group and head (``C * m`` queries against ``p`` keys),
    the tail part one small product per sequence; no sequence gets a copy of the head keys.
    """
    (n_groups, p, d), (n_seq, m, _) = k_head.shape, q.shape
    per_group, width = n_seq // n_groups, d // n_heads

    def tails(t: Tensor) -> Tensor:  # (G * C, L, d) -> (G, heads, C, L, d / heads)
        return t.view(n_groups, per_group, t.shape[1], n_heads, width).permute(0, 3, 1, 2, 4)

    def heads(t: Tensor) -> Tensor:  # (G, p, d) -> (G, heads, p, d / heads)
        return t.view(n_groups, p, n_heads, width).transpose(1, 2)

    queries = tails(q * width**-0.5).contiguous()
    to_head = queries.view(n_groups, n_heads, per_group * m, width) @ heads(k_head).transpose(-1, -2)
    to_tail = (queries @ tails(k_tail).transpose(-1, -2)).masked_fill(~tail_seen, float("-inf"))
    scores = torch.cat([to_head.view(n_groups, n_heads, per_group, m, p), to_tail], dim=-1)
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    weights = weights.to(v_head.dtype)
    out = weights[..., :p].reshape(n_groups, n_heads, per_group * m, p) @ heads(v_head)
    out = out.view(n_groups, n_heads, per_group, m, width) + weights[..., p:] @ tails(v_tail)
    return out.permute(0, 2, 3, 1, 4).reshape(n_seq, m, d)


def encode_token_ids(parts: dict[str, Any], tokens: Tensor) -> Tensor:
    """Text features of tokenised texts, truncated at the longest EOT (differentiable)."""
    eot = tokens.argmax(dim=-1)
    tokens = tokens[:, : int(eot.max()) + 1]
    return run_text_tower(parts, parts["token_embedding"](tokens), eot)


def _create_model(
    model_name: str, pretrained: str | None, cache_dir: str | None, init_seed: int
) -> nn.Module:
    if model_name not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip model {model_name!r}; flora ships {list_flora_models()}, "
            "open_clip knows e.g. ViT-B-16, ViT-B-32, RN50"
        )
    if pretrained is None:
        root_logger = logging.getLogger()
        level = root_logger.level
        root_logger.setLevel(logging.ERROR)  # open_clip warns that no weights were loaded: that is the point
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(init_seed)
                return _install_conv_stem(open_clip.create_model(model_name, pretrained=None), model_name)
        finally:
            root_logger.setLevel(level)
    if pretrained == "shipped":
        path = _shipped_weights(model_name)
        if path is None:
            raise PretrainedWeightsError(
                f"flora ships no weights for {model_name!r} (only for {[p.stem for p in _WEIGHTS_DIR.glob('*.safetensors')]}); "
                "set clip_pretrained to an open_clip tag (e.g. openai), a checkpoint file, or null for a random init"
            )
        pretrained = str(path)
    if os.path.isfile(pretrained):
        if model_name in CONV_STEMS:
            model = _create_model(model_name, None, cache_dir, init_seed)
            try:
                open_clip.load_checkpoint(model, pretrained)
            except RuntimeError as err:
                raise PretrainedWeightsError(
                    f"{pretrained} does not hold {model_name} weights (a conv-stem ViT; weights of the "
                    f"older patch-conv {model_name} do not fit): {' '.join(str(err).split())[:300]}"
                ) from err
            return model
        return open_clip.create_model(model_name, pretrained=pretrained)
    if any(sep in pretrained for sep in ("/", os.sep)) or pretrained.endswith(
        (".pt", ".bin", ".safetensors")
    ):
        raise PretrainedWeightsError(f"pretrained checkpoint file not found: {pretrained}")
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained not in tags:
        raise PretrainedWeightsError(
            f"{model_name!r} has no pretrained tag {pretrained!r}; known tags: {tags or 'none'}; "
            "or pass a local checkpoint file path"
        )
    hint = (
        f"could not load pretrained weights {model_name}/{pretrained}: not in the local cache and they "
        "cannot be downloaded here. Download the checkpoint on a machine with internet and pass its path, "
        "e.g. --model.init_args.clip_pretrained /path/to/open_clip_model.safetensors"
    )
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        try:
            return open_clip.create_model(model_name, pretrained=pretrained, cache_dir=cache_dir)
        except Exception as err:  # noqa: BLE001 - any failure here is "not cached"
            raise PretrainedWeightsError(hint) from err
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    try:
        return open_clip.create_model(model_name, pretrained=pretrained, cache_dir=cache_dir)
    except Exception as err:  # noqa: BLE001
        raise PretrainedWeightsError(f"{hint} ({type(err).__name__}: {err})") from err
