"""The procedural "captioned shapes" world: a `SourceDataset` drawn from code.

`SyntheticShapes` renders small images of coloured shapes.  Each class is a (colour, shape)
pair such as "red circle"; label = colour_index * num_shapes + shape_index.  Every image is a
pure function of (seed, split, style, index within the style), so the data set needs no
download and is bit-for-bit reproducible.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from functools import cache, lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from flora.data.source import SPLITS, SourceDataset, check_index, check_split
from flora.errors import FloraConfigError, check_range

__all__ = [
    "COLORS",
    "SHAPES",
    "SPLITS",  # defined in flora.data.source, importable from here too
    "STYLES",
    "SourceDataset",  # defined in flora.data.source, importable from here too
    "SyntheticShapes",
]

#: Bump whenever the renderer changes its output, so stale prepared shards are detected.
RENDER_VERSION = 2

#: Available colours, in label order.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "green": (40, 170, 60),
    "blue": (35, 75, 225),
    "yellow": (245, 220, 35),
    "orange": (250, 135, 20),
    "purple": (135, 45, 175),
    "pink": (250, 145, 195),
    "brown": (125, 75, 35),
    "gray": (128, 128, 128),
    "cyan": (35, 210, 225),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
}


# --------------------------------------------------------------------------------------------
# Shapes: each draws a filled mask (255 inside, 0 outside) centred at (cx, cy) with "radius" r
# (the shape fits in the circle of radius r) rotated by `angle` radians.

ShapeFn = Callable[[ImageDraw.ImageDraw, float, float, float, float], None]


def _place(points: np.ndarray, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Scale unit-radius points by r, rotate by angle and translate to (cx, cy)."""
    c, s = math.cos(angle), math.sin(angle)
    x = points[:, 0] * r
    y = points[:, 1] * r
    xs = cx + x * c - y * s
    ys = cy + x * s + y * c
    return list(zip(xs.tolist(), ys.tolist()))


@cache
def _regular(n: int, phase: float = -math.pi / 2, inner: float | None = None) -> np.ndarray:
    """Unit regular polygon (or star when `inner` is set) with a vertex at `phase`."""
    if inner is None:
        t = phase + 2 * math.pi * np.arange(n) / n
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    t = phase + math.pi * np.arange(2 * n) / n
    rad = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
    return np.stack([rad * np.cos(t), rad * np.sin(t)], axis=1)


_CROSS = (
    np.array(
        [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1)]
        + [(-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)],
        dtype=np.float64,
    )
    * 0.95
)
_DIAMOND = np.array([(0, -1), (0.62, 0), (0, 1), (-0.62, 0)], dtype=np.float64)
_ARROW = np.array(
    [(-1, -0.22), (0.1, -0.22), (0.1, -0.62), (1, 0), (0.1, 0.62), (0.1, 0.22), (-1, 0.22)],
    dtype=np.float64,
)


def _heart_points() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y + 2.5], axis=1)
    return pts / np.abs(pts).max() * 0.98


_HEART = _heart_points()


def _circle(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, angle: float) -> None:
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)


def _ring(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, angle: float) -> None:
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    h = 0.55 * r
    d.ellipse([cx - h, cy - h, cx + h, cy + h], fill=0)


def _moon(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, angle: float) -> None:
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    ox, oy = cx + 0.5 * r * math.cos(angle), cy + 0.5 * r * math.sin(angle)
    h = 0.85 * r
    d.ellipse([ox - h, oy - h, ox + h, oy + h], fill=0)


def _polygon(points: np.ndarray, scale: float = 1.0) -> ShapeFn:
    def draw(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, angle: float) -> None:
        d.polygon(_place(points, cx, cy, r * scale, angle), fill=255)

    return draw


#: Available shapes, in label order (name -> mask drawing function).
SHAPES: dict[str, ShapeFn] = {
    "circle": _circle,
    "square": _polygon(_regular(4, math.pi / 4), 0.97),
    "triangle": _polygon(_regular(3) + np.array([0.0, 0.15]), 1.0),
    "star": _polygon(_regular(5, inner=0.45)),
    "cross": _polygon(_CROSS),
    "diamond": _polygon(_DIAMOND),
    "hexagon": _polygon(_regular(6, 0.0)),
    "heart": _polygon(_HEART),
    "ring": _ring,
    "arrow": _polygon(_ARROW),
    "moon": _moon,
    "pentagon": _polygon(_regular(5)),
}

# --------------------------------------------------------------------------------------------
# Styles: turn a supersampled shape mask into an RGB image.

StyleFn = Callable[[np.random.Generator, np.ndarray, Image.Image, int], np.ndarray]
"""(rng, fill rgb float[3], mask at 2x resolution ("L"), output size) -> uint8 (size, size, 3)."""


@lru_cache(maxsize=16)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1], shape (size, size) each."""
    v = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(v, v, indexing="xy")


@lru_cache(maxsize=16)
def _interp_matrix(size: int, knots: int = 4) -> np.ndarray:
    """(size, knots) linear interpolation weights, used to upsample low-frequency noise."""
    pos = (np.arange(size) + 0.5) / size * (knots - 1)
    lo = np.minimum(np.floor(pos).astype(int), knots - 2)
    frac = (pos - lo).astype(np.float32)
    w = np.zeros((size, knots), dtype=np.float32)
    w[np.arange(size), lo] = 1 - frac
    w[np.arange(size), lo + 1] = frac
    return w


def _smooth_noise(rng: np.random.Generator, size: int, amp: float) -> np.ndarray:
    """Low-frequency noise field (size, size) with roughly unit-`amp` amplitude."""
    w = _interp_matrix(size)
    g = rng.standard_normal((w.shape[1], w.shape[1])).astype(np.float32)
    return (w @ g @ w.T) * amp


def _downsample(mask: Image.Image, size: int) -> np.ndarray:
    """Antialiased alpha in [0, 1] at the output size."""
    small = mask.reduce(mask.width // size) if mask.width % size == 0 else mask.resize((size, size))
    return np.asarray(small, dtype=np.float32) * (1.0 / 255.0)


def _edge(mask: Image.Image, eroded: Image.Image) -> Image.Image:
    """Boundary band of a mask: mask minus its erosion."""
    return ImageChops.subtract(mask, eroded)


def _luma(rgb: np.ndarray) -> float:
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


def _gray_background(rng: np.random.Generator, rgb: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """A desaturated background colour in [lo, hi] with enough contrast to the fill colour."""
    fill_luma = _luma(rgb)
    best, best_d = None, -1.0
    for _ in range(6):
        c = rng.uniform(lo, hi) + rng.normal(0.0, 18.0, 3)
        d = float(np.linalg.norm(c - rgb)) + 0.5 * abs(_luma(c) - fill_luma)
        if d > best_d:
            best, best_d = c, d
        if d >= 120:
            break
    return np.clip(best, 0, 255).astype(np.float32)


def _gradient(rng: np.random.Generator, c0: np.ndarray, size: int, spread: float) -> np.ndarray:
    """Linear gradient from c0 to a perturbed colour in a random direction, (size, size, 3)."""
    xx, yy = _grid(size)
    theta = rng.uniform(0, 2 * math.pi)
    t = (xx - 0.5) * math.cos(theta) + (yy - 0.5) * math.sin(theta)
    delta = rng.normal(0.0, spread, 3).astype(np.float32)
    return c0[None, None, :] + t[..., None] * delta[None, None, :]


def _shade(rng: np.random.Generator, size: int, strength: float) -> np.ndarray:
    """Directional light factor around 1.0, (size, size, 1)."""
    xx, yy = _grid(size)
    phi = rng.uniform(0, 2 * math.pi)
    t = (xx - 0.5) * math.cos(phi) + (yy - 0.5) * math.sin(phi)
    return (1.0 + strength * 2.0 * t)[..., None]


def _compose(bg: np.ndarray, fg: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None]
    return bg * (1.0 - a) + fg * a


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def _photo_layers(
    rng: np.random.Generator, rgb: np.ndarray, mask: Image.Image, size: int, lo: float, hi: float
) -> np.ndarray:
    """Textured gradient background, soft shadow and shaded fill (float array)."""
    alpha = _downsample(mask, size)
    c0 = _gray_background(rng, rgb, lo, hi)
    bg = _gradient(rng, c0, size, 40.0) + _smooth_noise(rng, size, 12.0)[..., None]
    shadow = np.roll(alpha, (1, 1), axis=(0, 1))
    bg = bg * (1.0 - 0.35 * shadow[..., None])
    fill = rgb[None, None, :] * _shade(rng, size, 0.22) + _smooth_noise(rng, size, 6.0)[..., None]
    out = _compose(bg, fill, alpha)
    return out + rng.normal(0.0, 4.0, out.shape).astype(np.float32)


def _style_photo(rng: np.random.Generator, rgb: np.ndarray, mask: Image.Image, size: int) -> np.ndarray:
    """Noisy gradient background with a soft shadow and a shaded fill."""
    return _to_uint8(_photo_layers(rng, rgb, mask, size, 35.0, 225.0))


def _style_noisy(rng: np.random.Generator, rgb: np.ndarray, mask: Image.Image, size: int) -> np.ndarray:
    """A cheap-camera photo: strong sensor noise and a cold white balance."""
    out = _photo_layers(rng, rgb, mask, size, 35.0, 225.0) * _COLD
    return _to_uint8(out + rng.normal(0.0, 32.0, out.shape).astype(np.float32))


#: white balance of the noisy style's camera (cold: red muted, blue boosted)
_COLD = np.array([0.6, 0.85, 1.1], np.float32)
#: colour of the lamp light in the dark style (dim and warm: blue almost gone)
_LAMP = np.array([0.75, 0.5, 0.25], np.float32)


def _style_dark(rng: np.random.Generator, rgb: np.ndarray, mask: Image.Image, size: int) -> np.ndarray:
    """A dim night photo under warm street-lamp light: every colour takes the lamp's cast."""
    out = _photo_layers(rng, rgb * _LAMP, mask, size, 5.0, 45.0)
    rim = _downsample(_edge(mask, mask.filter(ImageFilter.MinFilter(5))), size)
    return _to_uint8(out * 0.85 + rim[..., None] * (70.0 * _LAMP))


def _style_sketch(rng: np.random.Generator, rgb: np.ndarray, mask: Image.Image, size: int) -> np.ndarray:
    """Coloured pencil outline with a light wash on paper."""
    alpha = _downsample(mask, size)
    edge = _downsample(_edge(mask, mask.filter(ImageFilter.MinFilter(7))), size)
    paper_level = 90.0 if _luma(rgb) > 200 else rng.uniform(228, 250)
    paper = np.full((size, size, 3), paper_level, np.float32) + rng.normal(0.0, 3.0, 3).astype(np.float32)
    paper = paper + _smooth_noise(rng, size, 4.0)[..., None]
    out = _compose(paper, np.broadcast_to(rgb, paper.shape), 0.3 * alpha)
    out = _compose(out, np.broadcast_to(rgb * 0.9, paper.shape), np.minimum(edge * 1.3, 1.0))
    return _to_uint8(out + rng.normal(0.0, 3.0, out.shape).astype(np.float32))


def _style_cartoon(rng: np.random.Generator, rgb: np.ndarray, mask: Image.Image, size: int) -> np.ndarray:
    """Flat colours with a thick dark outline on a plain background."""
    alpha = _downsample(mask, size)
    outline = _downsample(mask.filter(ImageFilter.MaxFilter(5)), size)
    bg = np.broadcast_to(_gray_background(rng, rgb, 150.0, 240.0), (size, size, 3))
    ink = np.float32(25.0) if _luma(rgb) > 60 else np.float32(235.0)
    out = _compose(bg, np.full_like(bg, ink), outline)
    return _to_uint8(_compose(out, np.broadcast_to(rgb, bg.shape), alpha))


#: Rendering styles (name -> render function); a style is a "domain" for feature-shift studies.
STYLES: dict[str, StyleFn] = {
    "photo": _style_photo,
    "sketch": _style_sketch,
    "cartoon": _style_cartoon,
    "noisy": _style_noisy,
    "dark": _style_dark,
}

_CAPTION_PREFIX = {
    "photo": "a photo of a",
    "sketch": "a sketch of a",
    "cartoon": "a cartoon of a",
    "noisy": "a noisy photo of a",
    "dark": "a dark photo of a",
}

_SUPERSAMPLE = 2


def _stable_id(name: str) -> int:
    """Stable (process-independent) integer id of a name, for seeding."""
    return zlib.crc32(name.encode("utf-8"))


class SyntheticShapes(SourceDataset):
    """Procedural captioned-shapes dataset: classes are "<colour> <shape>" pairs.

    Sample order: within a split, the samples of each style form one contiguous block (styles
    in the given order); inside a block, sample j has label ``j % num_classes``, so each block
    holds ``per_class`` samples of every class.  Image j of a style block is a pure function of
    (seed, split, style name, j): adding or removing other styles never changes it.

    Args:
        num_colors: Number of colours used (the first ones of `COLORS`).
        num_shapes: Number of shapes used (the first ones of `SHAPES`).
        train_per_class: Train samples per class and style.
        test_per_class: Test samples per class and style.
        image_size: Side of the square RGB images, in pixels.
        styles: Rendering styles (keys of `STYLES`); default ["photo"].
        seed: Seed of the whole world.
    """

    def __init__(
        self,
        num_colors: int = 10,
        num_shapes: int = 10,
        train_per_class: int = 50,
        test_per_class: int = 20,
        image_size: int = 32,
        styles: list[str] | None = None,
        seed: int = 0,
    ) -> None:
        styles = ["photo"] if styles is None else list(styles)
        check_range("data.dataset.num_colors", num_colors, low=1, high=len(COLORS))
        check_range("data.dataset.num_shapes", num_shapes, low=1, high=len(SHAPES))
        check_range("data.dataset.train_per_class", train_per_class, low=1)
        check_range("data.dataset.test_per_class", test_per_class, low=0)
        check_range("data.dataset.image_size", image_size, low=8)
        check_range("data.dataset.seed", seed, low=0)
        if not styles:
            raise FloraConfigError("data.dataset.styles must name at least one style")
        unknown = [s for s in styles if s not in STYLES]
        if unknown:
            raise FloraConfigError(
                f"data.dataset.styles: unknown style(s) {unknown}; valid styles: {sorted(STYLES)}"
            )
        if len(set(styles)) != len(styles):
            raise FloraConfigError(f"data.dataset.styles must not repeat, got {styles}")
        self.num_colors = num_colors
        self.num_shapes = num_shapes
        self.train_per_class = train_per_class
        self.test_per_class = test_per_class
        self.image_size = image_size
        self.styles = styles
        self.seed = seed
        self._colors = list(COLORS)[:num_colors]
        self._shapes = list(SHAPES)[:num_shapes]
        self._class_names = [f"{c} {s}" for c in self._colors for s in self._shapes]

    # -- metadata -----------------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        """Class names "<colour> <shape>" in label order."""
        return list(self._class_names)

    def _per_class(self, split: str) -> int:
        check_split(split)
        return self.train_per_class if split == "train" else self.test_per_class

    def _block(self, split: str) -> int:
        """Number of samples of one style in `split`."""
        return self._per_class(split) * self.num_classes

    def size(self, split: str) -> int:
        """Number of samples in `split` (all styles)."""
        return self._block(split) * len(self.styles)

    def labels(self, split: str) -> np.ndarray:
        """Labels of all samples of `split` (no rendering)."""
        block = np.arange(self._block(split), dtype=np.int64) % self.num_classes
        return np.tile(block, len(self.styles))

    def domains(self, split: str) -> np.ndarray:
        """Style index (position in `styles`) of every sample of `split`."""
        return np.repeat(np.arange(len(self.styles), dtype=np.int64), self._block(split))

    def describe(self) -> dict[str, Any]:
        """Parameters identifying this dataset (stored in manifests)."""
        return {
            "class": "SyntheticShapes",
            "num_colors": self.num_colors,
            "num_shapes": self.num_shapes,
            "train_per_class": self.train_per_class,
            "test_per_class": self.test_per_class,
            "image_size": self.image_size,
            "styles": list(self.styles),
            "seed": self.seed,
            "render_version": RENDER_VERSION,
        }

    # -- samples ------------------------------------------------------------------------------
    def _locate(self, split: str, index: int) -> tuple[str, int, int]:
        """(style, index within the style block, label) of a sample."""
        block = self._block(split)
        index = check_index(split, index, block * len(self.styles))
        d, j = divmod(index, block)
        return self.styles[d], j, j % self.num_classes

    def caption(self, split: str, index: int) -> str:
        """E.g. "a photo of a red circle" (the prefix depends on the style)."""
        style, _, label = self._locate(split, index)
        return f"{_CAPTION_PREFIX.get(style, 'a photo of a')} {self._class_names[label]}"

    def image(self, split: str, index: int) -> Image.Image:
        """Render sample `index` of `split` as an RGB image of image_size x image_size."""
        style, j, label = self._locate(split, index)
        rng = np.random.default_rng([self.seed, SPLITS.index(split), _stable_id(style), j])
        color = np.asarray(COLORS[self._colors[label // self.num_shapes]], dtype=np.float32)
        shape = SHAPES[self._shapes[label % self.num_shapes]]
        big = self.image_size * _SUPERSAMPLE
        r = big * rng.uniform(0.2, 0.34)
        margin = big * 0.04
        cx, cy = rng.uniform(r + margin, big - r - margin, 2)
        angle = rng.uniform(-math.pi / 6, math.pi / 6)
        mask = Image.new("L", (big, big), 0)
        shape(ImageDraw.Draw(mask), float(cx), float(cy), float(r), float(angle))
        pixels = STYLES[style](rng, color, mask, self.image_size)
        return Image.fromarray(pixels, "RGB")

    def __repr__(self) -> str:
        args = ", ".join(
            f"{k}={v!r}" for k, v in self.describe().items() if k not in ("class", "render_version")
        )
        return f"SyntheticShapes({args})"
