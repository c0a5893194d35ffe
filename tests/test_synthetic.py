"""The procedural captioned-shapes world."""

from __future__ import annotations

import numpy as np
import pytest

from flora.data import SyntheticShapes


def test_class_names_in_label_order() -> None:
    ds = SyntheticShapes(num_colors=2, num_shapes=3)
    assert ds.class_names[:4] == ["red circle", "red square", "red triangle", "green circle"]
    assert ds.num_classes == 6 and len(set(ds.class_names)) == 6


def test_images_are_pure_functions_of_seed_split_style_index() -> None:
    a = SyntheticShapes(num_colors=3, num_shapes=3, styles=["photo", "sketch"], seed=1)
    b = SyntheticShapes(num_colors=3, num_shapes=3, styles=["photo", "sketch"], seed=1)
    c = SyntheticShapes(num_colors=3, num_shapes=3, styles=["photo", "sketch"], seed=2)
    for i in (0, 5, a.size("train") - 1):
        assert np.array_equal(np.asarray(a.image("train", i)), np.asarray(b.image("train", i)))
    assert not np.array_equal(np.asarray(a.image("train", 0)), np.asarray(c.image("train", 0)))
    assert not np.array_equal(np.asarray(a.image("train", 0)), np.asarray(a.image("test", 0)))
    img = a.image("test", 3)
    assert img.size == (32, 32) and img.mode == "RGB"


def test_labels_domains_and_sizes() -> None:
    ds = SyntheticShapes(
        num_colors=2, num_shapes=2, train_per_class=5, test_per_class=2, styles=["photo", "dark"]
    )
    assert ds.size("train") == 2 * 4 * 5 and ds.size("test") == 2 * 4 * 2
    assert np.bincount(ds.labels("train")).tolist() == [10, 10, 10, 10]
    assert np.bincount(ds.domains("test")).tolist() == [8, 8]


def test_bad_arguments_are_clear() -> None:
    with pytest.raises(ValueError, match="valid styles"):
        SyntheticShapes(styles=["oil painting"])
    with pytest.raises(ValueError, match="num_colors"):
        SyntheticShapes(num_colors=1000)


def _mean_fill(style: str, color: str) -> np.ndarray:
    """Mean pixel of a style's rendering when the shape covers the whole image."""
    from PIL import Image

    from flora.data.synthetic import COLORS, STYLES

    mask = Image.new("L", (128, 128), 255)
    rgb = np.asarray(COLORS[color], np.float32)
    return STYLES[style](np.random.default_rng(0), rgb, mask, 32).reshape(-1, 3).mean(0)


def test_lighting_styles_shift_what_colour_names_look_like() -> None:
    photo = {c: _mean_fill("photo", c) for c in ("yellow", "orange", "pink", "red")}
    # under the warm lamp a yellow shape looks like a photo of an orange one
    dark_yellow = _mean_fill("dark", "yellow")
    assert np.linalg.norm(
        dark_yellow / dark_yellow.max() - photo["orange"] / photo["orange"].max()
    ) < np.linalg.norm(dark_yellow / dark_yellow.max() - photo["yellow"] / photo["yellow"].max())
    # and everything is dim
    assert _mean_fill("dark", "pink").max() < 0.8 * photo["pink"].max()
    # the cheap camera's cold white balance: less red, relative to blue, than the photo
    noisy_pink = _mean_fill("noisy", "pink")
    assert noisy_pink[0] / noisy_pink[2] < 0.75 * photo["pink"][0] / photo["pink"][2]
    # photo and cartoon keep the colour's hue
    for style in ("photo", "cartoon"):
        fill = _mean_fill(style, "yellow")
        assert fill[2] < 0.4 * fill[1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_colors=0), "data.dataset.num_colors must be in [1, 12], got 0"),
        (dict(num_shapes=13), "data.dataset.num_shapes must be in [1, 12], got 13"),
        (dict(train_per_class=0), "data.dataset.train_per_class must be >= 1, got 0"),
        (dict(test_per_class=-1), "data.dataset.test_per_class must be >= 0, got -1"),
        (dict(image_size=4), "data.dataset.image_size must be >= 8, got 4"),
        (dict(seed=-1), "data.dataset.seed must be >= 0, got -1"),
        (dict(styles=[]), "data.dataset.styles must name at least one style"),
        (dict(styles=["photo", "photo"]), "data.dataset.styles must not repeat, got ['photo', 'photo']"),
    ],
)
def test_bad_dataset_options_are_one_line_config_errors(kwargs, message) -> None:  # type: ignore[no-untyped-def]
    from flora.errors import FloraConfigError

    with pytest.raises(FloraConfigError) as info:
        SyntheticShapes(**kwargs)
    assert str(info.value) == message
