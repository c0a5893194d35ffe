"""Textual inversion of class names: learned name rows inside a frozen template."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flora.clip import CLIPBackbone
from flora.prompts import ClassNameEmbeddings
from flora.prompts.class_tokens import compose

NAMES = ["red circle", "blue square", "green hexagon", "cyan half_moon"]
TEMPLATE = "a photo of a {}."


@pytest.fixture(scope="module")
def backbone() -> CLIPBackbone:
    return CLIPBackbone("flora-tiny", None, init_seed=0)


def _perturb(emb: ClassNameEmbeddings, cls: int | None = None) -> None:
    """Random rows (a constant shift would be removed by LayerNorm), for one class or all."""
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(emb.rows.shape, generator=gen)
    if cls is not None:
        keep = torch.ones(len(emb.rows), dtype=torch.bool)
        start = sum(emb.lengths[:cls])
        keep[start : start + emb.lengths[cls]] = False
        noise[keep] = 0
    with torch.no_grad():
        emb.rows.add_(noise)


def test_initial_rows_give_the_template_features(backbone: CLIPBackbone) -> None:
    emb = ClassNameEmbeddings(backbone, NAMES, TEMPLATE)
    expected = backbone.encode_text([TEMPLATE.format(n.replace("_", " ")) for n in NAMES])
    torch.testing.assert_close(emb.text_features(backbone), expected, atol=1e-5, rtol=1e-5)
    # every name keeps its own number of tokens; only the name rows are parameters
    assert emb.lengths == [len(backbone.tokenize([n.replace("_", " ")])[0].nonzero()) - 2 for n in NAMES]
    assert [name for name, _ in emb.named_parameters()] == ["rows"]


def test_a_class_rows_move_only_that_class(backbone: CLIPBackbone) -> None:
    emb = ClassNameEmbeddings(backbone, NAMES, TEMPLATE)
    before = emb.text_features(backbone).detach()
    _perturb(emb, cls=2)
    after = emb.text_features(backbone).detach()
    moved = (after - before).norm(dim=-1)
    assert moved[2] > 1e-2
    assert torch.all(moved[[0, 1, 3]] < 1e-6)
    emb.reset_parameters()
    torch.testing.assert_close(emb.text_features(backbone).detach(), before)


def test_gradients_reach_the_rows_and_nothing_of_the_backbone(backbone: CLIPBackbone) -> None:
    emb = ClassNameEmbeddings(backbone, NAMES, TEMPLATE)
    images = F.normalize(
        torch.randn(6, backbone.embed_dim, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    logits = backbone.logit_scale * images @ emb.text_features(backbone).t()
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 3, 0, 1])).backward()
    assert emb.rows.grad is not None and emb.rows.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.parameters())


def test_composed_words_are_read_like_the_classes_they_came_from(backbone: CLIPBackbone) -> None:
    emb = ClassNameEmbeddings(backbone, NAMES, TEMPLATE)
    _perturb(emb)
    x, eot = compose(backbone, TEMPLATE, [w.detach() for w in emb.words()])
    torch.testing.assert_close(
        backbone.encode_embedded(x, eot), emb.text_features(backbone).detach(), atol=1e-5, rtol=1e-5
    )
    # a single word, without the others, is composed the same way
    x1, eot1 = compose(backbone, TEMPLATE, [emb.words()[3].detach()])
    torch.testing.assert_close(
        backbone.encode_embedded(x1, eot1)[0], emb.text_features(backbone)[3].detach(), atol=1e-5, rtol=1e-5
    )


def test_hidden_states_pool_to_the_text_features(backbone: CLIPBackbone) -> None:
    """The hidden states a generator attends to are the text tower's own: pooled at EOT they give its features."""
    emb = ClassNameEmbeddings(backbone, NAMES, TEMPLATE)
    _perturb(emb)
    x, eot = compose(backbone, TEMPLATE, [w.detach() for w in emb.words()])
    hidden = backbone.text_hidden_states(x)
    assert hidden.shape == (*x.shape[:2], backbone.token_width)
    pooled = hidden[torch.arange(len(eot)), eot] @ backbone.model.text_projection
    torch.testing.assert_close(
        F.normalize(pooled, dim=-1), backbone.encode_embedded(x, eot), atol=1e-5, rtol=1e-5
    )


def test_bad_templates_are_refused(backbone: CLIPBackbone) -> None:
    with pytest.raises(ValueError, match="must contain"):
        ClassNameEmbeddings(backbone, NAMES, "a photo")
    with pytest.raises(ValueError, match="at least one class"):
        ClassNameEmbeddings(backbone, [], TEMPLATE)


def test_hidden_states_of_an_earlier_layer(backbone: CLIPBackbone) -> None:
    """``skip_last`` gives the output of an earlier block, as open_clip's own intermediates do."""
    x, _ = compose(backbone, TEMPLATE, ClassNameEmbeddings(backbone, NAMES, TEMPLATE).words())
    x = x.detach()
    transformer = backbone.model.transformer
    n = len(transformer.resblocks)
    length = x.shape[1]
    inputs = x + backbone.model.positional_embedding[:length]
    mask = backbone.model.attn_mask[:length, :length]
    _, inter = transformer.forward_intermediates(inputs, attn_mask=mask, indices=[n - 2])
    expected = backbone.model.ln_final(inter[0])
    torch.testing.assert_close(backbone.text_hidden_states(x, skip_last=1), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(backbone.text_hidden_states(x), expected, atol=1e-3)
    with pytest.raises(ValueError, match="skip_last"):
        backbone.text_hidden_states(x, skip_last=n)
