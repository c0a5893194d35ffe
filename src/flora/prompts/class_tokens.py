"""Textual inversion: learned token embeddings of every class name inside a frozen template.

For every class the template (``"a photo of a {}."``) is tokenised; the class name's own
BPE tokens become learned rows, initialised from the token-embedding table, while every
other token (start, template words, full stop, end, padding) stays frozen. With the
initial rows the text features are exactly the template's (CLIP's zero-shot classifier).

A class's rows (:meth:`ClassNameEmbeddings.words`) can be placed into the template on
their own, without the class they came from (:func:`compose`), which is how a receiver
turns an embedding it was sent into a text the text tower can read.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flora.clip import CLIPBackbone

#: a word that the CLIP tokenizer keeps as one token; it marks where the class name goes
_PLACEHOLDER = "x"


def _template_text(template: str, name: str) -> str:
    if "{}" not in template:
        raise ValueError(f"the template must contain {{}} where the class name goes, got {template!r}")
    return template.format(name.replace("_", " "))


def _name_ids(backbone: CLIPBackbone, name: str) -> list[int]:
    """The BPE token ids of ``name`` alone (without the start and end tokens)."""
    ids = backbone.tokenize([name.replace("_", " ")])[0]
    return ids[1 : int(ids.argmax())].tolist()


def _find(sequence: list[int], part: list[int]) -> int:
    for start in range(len(sequence) - len(part) + 1):
        if sequence[start : start + len(part)] == part:
            return start
    return -1


class ClassNameEmbeddings(nn.Module):
    """The learned token rows of every class name (``rows``: all names' tokens, in class order).

    Args:
        backbone: the frozen CLIP whose token table initialises the rows.
        class_names: the task's classes in label order.
        template: the frozen sentence around each name.
    """

    def __init__(
        self, backbone: CLIPBackbone, class_names: Sequence[str], template: str = "a photo of a {}."
    ) -> None:
        super().__init__()
        names = list(class_names)
        if not names:
            raise ValueError("a task needs at least one class name")
        tokens = backbone.tokenize([_template_text(template, n) for n in names])
        eot = tokens.argmax(dim=-1)
        tokens = tokens[:, : int(eot.max()) + 1]
        mask = torch.zeros(tokens.shape, dtype=torch.bool)
        lengths = []
        for c, name in enumerate(names):
            ids = _name_ids(backbone, name)
            start = _find(tokens[c].tolist(), ids) if ids else -1
            if start < 0:
                raise ValueError(
                    f"class name {name!r} does not tokenise the same inside the template {template!r}; "
                    "use a template that keeps the name a separate word"
                )
            mask[c, start : start + len(ids)] = True
            lengths.append(len(ids))
        with torch.no_grad():
            base = backbone.embed_tokens(tokens).detach().float().cpu()
        self.template = template
        self.lengths = lengths
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("eot", eot, persistent=False)
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("base", base, persistent=False)
        self.register_buffer("initial", base[mask].clone(), persistent=False)
        self.rows = nn.Parameter(self.initial.clone())

    @property
    def num_classes(self) -> int:
        return len(self.lengths)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Back to the class names' own token rows (nothing is random: ``generator`` is unused)."""
        self.rows.copy_(self.initial)

    def token_embeddings(self) -> Tensor:
        """``(n_cls, L, d_t)``: the template's frozen embeddings with the learned name rows in place."""
        x = self.base.to(self.rows.dtype).clone()
        x[self.mask] = self.rows
        return x

    def text_features(self, backbone: CLIPBackbone) -> Tensor:
        """Normalised ``(n_cls, d)`` features of the template with every class's learned name."""
        return backbone.encode_embedded(self.token_embeddings(), self.eot)

    def words(self) -> list[Tensor]:
        """Each class's learned rows ``(n_tokens_c, d_t)``, in class order (what a client can send)."""
        return list(torch.split(self.rows, self.lengths))


@torch.no_grad()
def _template_parts(backbone: CLIPBackbone, template: str) -> tuple[Tensor, Tensor, Tensor]:
    """Frozen embeddings of the template before and after the name, and of the padding token."""
    ids = backbone.tokenize([_template_text(template, _PLACEHOLDER)])[0]
    marker = _name_ids(backbone, _PLACEHOLDER)
    at = _find(ids.tolist(), marker)
    if len(marker) != 1 or at < 0:
        raise ValueError(f"cannot find where the name goes in the template {template!r}")
    end = int(ids.argmax())
    emb = backbone.embed_tokens(ids)
    return emb[:at], emb[at + 1 : end + 1], emb[end + 1 : end + 2]


def compose(backbone: CLIPBackbone, template: str, words: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Token embeddings ``(B, L, d_t)`` and EOT positions ``(B,)`` of the template around each of ``words``.

    ``words[i]`` is a name's rows ``(n_i, d_t)`` of any length; shorter sequences are padded
    with the padding token's embedding, as the tokenizer pads, so the text tower reads
    them as it would read the tokenised sentence.
    """
    if not words:
        raise ValueError("compose needs at least one word")
    before, after, pad = _template_parts(backbone, template)
    seqs = [torch.cat([before.to(w), w, after.to(w)]) for w in words]
    length = max(len(s) for s in seqs)
    eot = torch.tensor([len(s) - 1 for s in seqs], device=words[0].device)
    x = torch.stack([torch.cat([s, pad.to(s).expand(length - len(s), -1)]) for s in seqs])
    return x, eot


def generator_conditioning(
    backbone: CLIPBackbone, template: str, words: Sequence[Tensor], skip_last: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """What a text-conditioned image generator attends to for the template around each word.

    Returns ``(cond, uncond, x, eot)``: the text tower's hidden states ``(B, L, d_t)`` of the
    composed prompts at the tokenizer's full context length (the positions after each prompt
    hold the empty prompt's padding, as a tokenised sentence would), those of the empty prompt
    ``(1, L, d_t)`` (for classifier-free guidance), and :func:`compose`'s token embeddings and
    EOT positions. ``skip_last`` reads the hidden states that many blocks before the last.
    """
    x, eot = compose(backbone, template, list(words))
    device = words[0].device
    empty = backbone.embed_tokens(backbone.tokenize([""]).to(device)).to(x.dtype)
    full = torch.cat([x, empty[:, x.shape[1] :].expand(len(x), -1, -1)], dim=1)
    cond = backbone.text_hidden_states(full, skip_last)
    uncond = backbone.text_hidden_states(empty, skip_last)
    return cond, uncond, x, eot
