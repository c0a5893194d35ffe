"""The caption vocabulary of ``flora pretrain-tiny``: templates, synonyms and the names each class is confused with."""

from __future__ import annotations

import numpy as np

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

#: the words a careless web captioner uses besides a colour's own name: synonyms, and
#: the name of a colour it is easily taken for
COLOR_SYNONYMS = {
    "red": ("crimson", "scarlet", "cherry"),
    "green": ("emerald", "lime", "grassy"),
    "blue": ("azure", "cobalt", "navy"),
    "yellow": ("lemon", "golden", "canary"),
    "orange": ("tangerine", "amber", "apricot"),
    "purple": ("violet", "plum", "lilac"),
    "pink": ("rose", "salmon", "fuchsia"),
    "brown": ("chocolate", "tan", "coffee"),
    "gray": ("grey", "silver", "ash"),
    "cyan": ("turquoise", "teal", "aqua"),
    "black": ("ebony", "jet", "coal"),
    "white": ("ivory", "snowy", "cream"),
}
COLOR_CONFUSED = {
    "red": "orange",
    "green": "cyan",
    "blue": "purple",
    "yellow": "orange",
    "orange": "red",
    "purple": "blue",
    "pink": "purple",
    "brown": "orange",
    "gray": "black",
    "cyan": "blue",
    "black": "gray",
    "white": "gray",
}
SHAPE_SYNONYMS = {
    "circle": ("disc", "dot", "ball"),
    "square": ("box", "block", "tile"),
    "triangle": ("wedge", "pyramid", "delta"),
    "star": ("starlet", "asterisk", "twinkle"),
    "cross": ("plus", "plus sign", "crossing"),
    "diamond": ("rhombus", "lozenge", "kite"),
    "hexagon": ("hex", "honeycomb", "nut"),
    "heart": ("valentine", "love heart", "locket"),
    "ring": ("donut", "hoop", "loop"),
    "arrow": ("pointer", "dart", "chevron"),
    "moon": ("crescent", "sickle", "half moon"),
    "pentagon": ("home plate", "five sided shape", "badge"),
}
SHAPE_CONFUSED = {
    "circle": "ring",
    "square": "diamond",
    "triangle": "arrow",
    "star": "cross",
    "cross": "star",
    "diamond": "square",
    "hexagon": "circle",
    "heart": "moon",
    "ring": "circle",
    "arrow": "triangle",
    "moon": "heart",
    "pentagon": "hexagon",
}


def _word(rng: np.random.Generator, name: str, own: float, confused: float, synonyms: dict, mix: dict) -> str:
    """A caption word for ``name``: itself (``own``), the name it is confused with, or a synonym."""
    u = rng.random()
    if u < own:
        return name
    if u < own + confused:
        return mix[name]
    options = synonyms[name]
    return options[int(rng.integers(len(options)))]
