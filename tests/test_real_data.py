"""Real-dataset loaders (flora.data.real) on tiny fake trees in the real on-disk layouts."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flora.data.errors import FloraDataError
from flora.data.partition import Domains, Pathological
from flora.data.real import (
    CIFAR,
    COOP_PRESETS,
    OFFICE_CALTECH10_CLASSES,
    CoOpDataset,
    DomainNet,
    OfficeCaltech10,
)
from flora.data.shards import load_manifest, read_client_samples, write_federated_shards


def _pixels(seed: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _write_png(path: Path, seed: int) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    px = _pixels(seed)
    Image.fromarray(px, "RGB").save(path)
    return px


def _roundtrip(ds) -> None:  # type: ignore[no-untyped-def]
    """describe() is JSON-serialisable and rebuilds an identical dataset."""
    d = json.loads(json.dumps(ds.describe()))
    assert d["class"] == type(ds).__name__
    again = type(ds)(**{k: v for k, v in d.items() if k != "class"})
    assert again.describe() == ds.describe()


# --------------------------------------------------------------------------------------------
# CIFAR


def _write_cifar(root: Path, name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write a tiny CIFAR pickle tree; cifar10 uses bytes keys, cifar100 str keys (both occur)."""
    rng = np.random.default_rng(1)
    if name == "cifar10":
        folder, train_files, test_file, meta = (
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            "test_batch",
            "batches.meta",
        )
        label_key, names_key, key = "labels", "label_names", (lambda k: k.encode())
        names = [b"airplane", b"automobile", b"bird"]
    else:
        folder, train_files, test_file, meta = "cifar-100-python", ["train"], "test", "meta"
        label_key, names_key, key = "fine_labels", "fine_label_names", (lambda k: k)
        names = ["apple", "aquarium_fish", "baby"]
    out: dict[str, list] = {"train": [], "test": []}
    d = root / folder
    d.mkdir(parents=True)
    for split, files in (("train", train_files), ("test", [test_file])):
        for fname in files:
            x = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
            y = rng.integers(0, 3, 2).tolist()
            out[split].append((x, np.asarray(y)))
            with open(d / fname, "wb") as fh:
                pickle.dump({key("data"): x, key(label_key): y, key("filenames"): ["a", "b"]}, fh)
    with open(d / meta, "wb") as fh:
        pickle.dump({key(names_key): names}, fh)
    return {s: (np.concatenate([a for a, _ in v]), np.concatenate([b for _, b in v])) for s, v in out.items()}


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reads_pickles(tmp_path: Path, name: str) -> None:
    expected = _write_cifar(tmp_path, name)
    ds = CIFAR(name=name, root=str(tmp_path))
    want = ["airplane", "automobile", "bird"] if name == "cifar10" else ["apple", "aquarium fish", "baby"]
    assert ds.class_names == want
    for split in ("train", "test"):
        x, y = expected[split]
        assert (
            ds.size(split)
            == len(y)
            == (10 if name == "cifar10" else 2) * (split == "train") + 2 * (split == "test")
        )
        labels = ds.labels(split)
        assert labels.dtype == np.int64 and labels.tolist() == y.tolist()
        for i in range(len(y)):
            img = ds.image(split, i)
            assert img.mode == "RGB" and img.size == (32, 32)
            np.testing.assert_array_equal(np.asarray(img), x[i].reshape(3, 32, 32).transpose(1, 2, 0))
    assert ds.domains("train") is None
    with pytest.raises(IndexError):
        ds.image("test", 2)
    _roundtrip(ds)


def test_cifar_errors(tmp_path: Path) -> None:
    ds = CIFAR(name="cifar10", root=str(tmp_path / "nowhere"))  # lazy: constructing is fine
    with pytest.raises(FloraDataError, match=r"cifar-10-batches-py.*download: true"):
        ds.labels("train")
    with pytest.raises(ValueError, match="cifar100"):
        CIFAR(name="cifar1000")
    _write_cifar(tmp_path, "cifar100")
    (tmp_path / "cifar-100-python" / "test").unlink()
    ds = CIFAR(name="cifar100", root=str(tmp_path))
    assert ds.size("train") == 2
    with pytest.raises(FloraDataError, match=r"cifar-100-python/test"):
        ds.size("test")


class _Payload:
    """Unpickling this runs a command (what a malicious "CIFAR" download could contain)."""

    def __init__(self, call: object, arg: str) -> None:
        self.call, self.arg = call, arg

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (self.call, (self.arg,))


@pytest.mark.parametrize("which", ["data_batch_1", "batches.meta"])
@pytest.mark.parametrize("how", ["os.system", "builtins.exec"])
def test_cifar_refuses_pickles_that_would_run_code(tmp_path: Path, which: str, how: str) -> None:
    import os

    _write_cifar(tmp_path, "cifar10")
    marker = tmp_path / "pwned"
    if how == "os.system":
        payload = _Payload(os.system, f"touch {marker}")
    else:
        payload = _Payload(exec, f"open({str(marker)!r}, 'w').write('x')")
    path = tmp_path / "cifar-10-batches-py" / which
    with open(path, "wb") as fh:
        pickle.dump({b"data": payload, b"labels": [0, 1], b"label_names": payload}, fh)
    ds = CIFAR(name="cifar10", root=str(tmp_path))
    name = "posix.system" if how == "os.system" else "builtins.exec"
    with pytest.raises(FloraDataError, match=rf"{which}.* refers to {name}, .*refusing to load it") as info:
        ds.labels("train") if which == "data_batch_1" else ds.class_names
    assert "\n" not in str(info.value)
    assert not marker.exists()  # nothing ran


def test_cifar_reads_numpy_pickles_of_every_protocol(tmp_path: Path) -> None:
    """The restricted unpickler still reads CIFAR files written with any pickle protocol."""
    expected = _write_cifar(tmp_path, "cifar100")
    for proto in (2, 3, 4, 5):
        d = tmp_path / "cifar-100-python"
        for fname in ("train", "test", "meta"):
            with open(d / fname, "rb") as fh:
                obj = pickle.load(fh)
            if fname != "meta":
                obj["fine_labels"] = np.asarray(obj["fine_labels"], dtype=np.int64)  # numpy scalars too
            with open(d / fname, "wb") as fh:
                pickle.dump(obj, fh, protocol=proto)
        ds = CIFAR(name="cifar100", root=str(tmp_path))
        assert ds.labels("train").tolist() == expected["train"][1].tolist()
        assert ds.class_names == ["apple", "aquarium fish", "baby"]


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: CIFAR(name="cifar1000"),
            "data.dataset.name must be one of ['cifar10', 'cifar100'], got 'cifar1000'",
        ),
        (
            lambda: CoOpDataset(name="flowers"),
            "data.dataset.name must be one of ['caltech101', 'dtd', 'food101', "
            "'oxford_flowers', 'oxford_pets'], got 'flowers'",
        ),
        (
            lambda: OfficeCaltech10(test_fraction=1.0),
            "data.dataset.test_fraction must be in [0.0, 1.0), got 1.0",
        ),
        (
            lambda: OfficeCaltech10(test_fraction=-0.1),
            "data.dataset.test_fraction must be in [0.0, 1.0), got -0.1",
        ),
        (lambda: OfficeCaltech10(seed=-1), "data.dataset.seed must be >= 0, got -1"),
        (lambda: OfficeCaltech10(domains=[]), "data.dataset.domains must name at least one domain"),
        (
            lambda: DomainNet(domains=["real", "real"]),
            "data.dataset.domains must not repeat, got ['real', 'real']",
        ),
        (
            lambda: DomainNet(classes=[]),
            "data.dataset.classes must name at least one class (or set all_classes: true)",
        ),
        (
            lambda: DomainNet(classes=["tiger", "tiger"]),
            "data.dataset.classes must not repeat, got ['tiger', 'tiger']",
        ),
    ],
)
def test_bad_real_dataset_options_are_one_line_config_errors(make, message) -> None:  # type: ignore[no-untyped-def]
    from flora.errors import FloraConfigError

    with pytest.raises(FloraConfigError) as info:
        make()
    assert str(info.value) == message


# --------------------------------------------------------------------------------------------
# CoOp datasets


def _write_coop(root: Path, name: str = "oxford_pets", n_train: int = 2) -> dict[str, np.ndarray]:
    """3 classes; label 2 appears first in the JSON, so names must come from the labels."""
    ds_dir, img_dir, split_file = COOP_PRESETS[name]
    classes = ["abyssinian", "american_bulldog", "pug"]
    content: dict[str, list] = {"train": [], "val": [], "test": []}
    pixels: dict[str, np.ndarray] = {}
    seed = 0
    counts = {"train": n_train, "val": 1, "test": 1}
    for split in ("train", "val", "test"):
        for k in (2, 0, 1):
            for i in range(counts[split]):
                rel = f"{classes[k]}/{split}_{i}.png"
                pixels[rel] = _write_png(root / ds_dir / img_dir / rel, seed)
                seed += 1
                content[split].append([rel, k, classes[k]])
    (root / ds_dir / split_file).write_text(json.dumps(content))
    return pixels


@pytest.mark.parametrize("name", ["oxford_pets", "caltech101"])
def test_coop_dataset(tmp_path: Path, name: str) -> None:
    pixels = _write_coop(tmp_path, name)
    ds = CoOpDataset(name=name, root=str(tmp_path))
    assert ds.class_names == ["abyssinian", "american bulldog", "pug"]
    assert ds.size("train") == 6 and ds.size("test") == 3
    assert ds.labels("train").tolist() == [2, 2, 0, 0, 1, 1]
    assert ds.labels("test").tolist() == [2, 0, 1]
    assert ds.domains("train") is None
    img = ds.image("train", 2)
    assert img.mode == "RGB" and img.size == (8, 8)
    np.testing.assert_array_equal(np.asarray(img), pixels["abyssinian/train_0.png"])
    np.testing.assert_array_equal(np.asarray(ds.image("test", 0)), pixels["pug/test_0.png"])
    with_val = CoOpDataset(name=name, root=str(tmp_path), include_val=True)
    assert with_val.size("train") == 9 and with_val.labels("train").tolist()[6:] == [2, 0, 1]
    np.testing.assert_array_equal(np.asarray(with_val.image("train", 6)), pixels["pug/val_0.png"])
    _roundtrip(with_val)


def test_coop_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="oxford_flowers"):
        CoOpDataset(name="imagenet")
    with pytest.raises(FloraDataError, match="dataset root not found"):
        CoOpDataset(root=str(tmp_path / "missing")).labels("train")
    pixels = _write_coop(tmp_path)
    split_file = tmp_path / "oxford_pets" / "split_zhou_OxfordPets.json"
    split_file.rename(tmp_path / "elsewhere.json")
    with pytest.raises(FloraDataError, match="split_zhou_OxfordPets.json"):
        CoOpDataset(root=str(tmp_path)).size("train")
    (tmp_path / "elsewhere.json").rename(split_file)
    (tmp_path / "oxford_pets" / "images" / next(iter(pixels))).unlink()  # pug/train_0.png
    ds = CoOpDataset(root=str(tmp_path))
    assert ds.size("train") == 6  # indexing does not open images
    with pytest.raises(FloraDataError, match=r"pug/train_0\.png"):
        ds.image("train", 0)


# --------------------------------------------------------------------------------------------
# DomainNet

# original DomainNet label numbers (alphabetical over all 345 classes)
_DN_LABELS = {"aircraft_carrier": 0, "bird": 1, "ice_cream": 2, "zebra": 3}


def _write_domainnet(root: Path) -> dict[str, np.ndarray]:
    pixels: dict[str, np.ndarray] = {}
    seed = 100
    for d in ("clipart", "sketch"):
        for split, n in (("train", 2), ("test", 1)):
            lines = []
            for cls, label in _DN_LABELS.items():
                for i in range(n):
                    rel = f"{d}/{cls}/{d}_{split}_{i:03d}.png"
                    pixels[rel] = _write_png(root / rel, seed)
                    seed += 1
                    lines.append(f"{rel} {label}")
            lines.reverse()  # the loader must sort
            (root / f"{d}_{split}.txt").write_text("\n".join(lines) + "\n")
    return pixels


def test_domainnet_subset(tmp_path: Path) -> None:
    pixels = _write_domainnet(tmp_path)
    ds = DomainNet(root=str(tmp_path), domains=["sketch", "clipart"], classes=["zebra", "bird", "ice_cream"])
    assert ds.class_names == ["zebra", "bird", "ice cream"]
    assert ds.size("train") == 12 and ds.size("test") == 6
    assert ds.domains("train").tolist() == [0] * 6 + [1] * 6
    assert ds.domains("test").tolist() == [0] * 3 + [1] * 3
    # within a domain: lines sorted by path (bird < ice_cream < zebra)
    assert ds.labels("train").tolist() == [1, 1, 2, 2, 0, 0] * 2
    assert ds.labels("test").tolist() == [1, 2, 0] * 2
    np.testing.assert_array_equal(
        np.asarray(ds.image("train", 0)), pixels["sketch/bird/sketch_train_000.png"]
    )
    np.testing.assert_array_equal(
        np.asarray(ds.image("test", 5)), pixels["clipart/zebra/clipart_test_000.png"]
    )
    _roundtrip(ds)


def test_domainnet_all_classes_and_errors(tmp_path: Path) -> None:
    _write_domainnet(tmp_path)
    ds = DomainNet(root=str(tmp_path), domains=["clipart"], all_classes=True)
    assert ds.class_names == ["aircraft carrier", "bird", "ice cream", "zebra"]
    assert ds.labels("train").tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert ds.domains("test").tolist() == [0] * 4
    # default classes = the 10-class FL subset, most of which this fake tree lacks
    with pytest.raises(FloraDataError, match="feather"):
        DomainNet(root=str(tmp_path), domains=["clipart"]).size("train")
    with pytest.raises(FloraDataError, match="DomainNet root not found"):
        DomainNet(root=str(tmp_path / "missing")).labels("train")
    with pytest.raises(FloraDataError, match="infograph"):  # default domains: infograph folder missing
        DomainNet(root=str(tmp_path), classes=["bird"]).labels("train")
    (tmp_path / "sketch_test.txt").unlink()
    with pytest.raises(FloraDataError, match=r"sketch_test\.txt"):
        DomainNet(root=str(tmp_path), domains=["clipart", "sketch"], classes=["bird"]).size("train")


# --------------------------------------------------------------------------------------------
# Office-Caltech-10


def _write_office(root: Path, per_class: dict[str, int]) -> dict[Path, np.ndarray]:
    pixels: dict[Path, np.ndarray] = {}
    seed = 1000
    for d, n in per_class.items():
        for cls in OFFICE_CALTECH10_CLASSES:
            for i in range(n):
                path = root / d / cls / f"frame_{i:04d}.png"
                pixels[path] = _write_png(path, seed)
                seed += 1
            (root / d / cls / ".DS_Store").write_bytes(b"junk")  # ignored: not an image
    return pixels


def test_office_caltech10(tmp_path: Path) -> None:
    pixels = _write_office(tmp_path, {"amazon": 5, "dslr": 2})
    Image.fromarray(_pixels(0), "RGB").save(tmp_path / "dslr" / "mug" / "frame_0002.jpg")
    ds = OfficeCaltech10(root=str(tmp_path), domains=["dslr", "amazon"], test_fraction=0.2, seed=3)
    assert ds.class_names[0] == "back pack" and ds.class_names[5] == "laptop computer"
    assert ds.num_classes == 10
    # dslr: 2 images per class (3 for mug) -> 1 test each; amazon: 5 -> 1 test each
    assert ds.size("test") == 20 and ds.size("train") == 9 * 1 + 2 + 10 * 4
    for split in ("train", "test"):
        labels, doms = ds.labels(split), ds.domains(split)
        assert labels.dtype == np.int64 and doms.dtype == np.int64
        assert np.all(np.diff(doms) >= 0) and set(doms.tolist()) == {0, 1}
        paths = [ds.image_path(split, i) for i in range(ds.size(split))]
        assert all(p.parent.parent.name == ["dslr", "amazon"][d] for p, d in zip(paths, doms))
        assert all(p.parent.name == OFFICE_CALTECH10_CLASSES[k] for p, k in zip(paths, labels))
    assert np.bincount(ds.labels("test"), minlength=10).tolist() == [2] * 10
    train = {ds.image_path("train", i) for i in range(ds.size("train"))}
    test = {ds.image_path("test", i) for i in range(ds.size("test"))}
    assert not train & test and len(train | test) == len(pixels) + 1
    for i in range(ds.size("train")):
        p = ds.image_path("train", i)
        img = ds.image("train", i)
        assert img.mode == "RGB" and img.size == (8, 8)
        if p.suffix == ".png":
            np.testing.assert_array_equal(np.asarray(img), pixels[p])
    # deterministic, and the seed matters
    again = OfficeCaltech10(root=str(tmp_path), domains=["dslr", "amazon"], test_fraction=0.2, seed=3)
    assert [again.image_path("test", i) for i in range(again.size("test"))] == [
        ds.image_path("test", i) for i in range(ds.size("test"))
    ]
    other = OfficeCaltech10(root=str(tmp_path), domains=["dslr", "amazon"], test_fraction=0.2, seed=4)
    assert {other.image_path("test", i) for i in range(other.size("test"))} != test
    _roundtrip(ds)


def test_office_caltech10_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        OfficeCaltech10(test_fraction=1.0)
    with pytest.raises(FloraDataError, match="Office-Caltech-10 root not found"):
        OfficeCaltech10(root=str(tmp_path / "missing")).labels("train")
    _write_office(tmp_path, {"amazon": 1})
    with pytest.raises(FloraDataError, match="caltech"):  # default domains include caltech
        OfficeCaltech10(root=str(tmp_path)).labels("train")
    ds = OfficeCaltech10(root=str(tmp_path), domains=["amazon"])
    assert ds.size("train") == 10 and ds.size("test") == 0  # single images stay in train
    for f in (tmp_path / "amazon" / "projector").iterdir():
        f.unlink()
    (tmp_path / "amazon" / "projector").rmdir()
    with pytest.raises(FloraDataError, match=r"amazon/projector"):
        OfficeCaltech10(root=str(tmp_path), domains=["amazon"]).labels("train")


# --------------------------------------------------------------------------------------------
# End to end: shards from real-layout data


def test_shards_from_coop_pathological(tmp_path: Path) -> None:
    _write_coop(tmp_path / "raw", n_train=2)
    source = CoOpDataset(name="oxford_pets", root=str(tmp_path / "raw"))
    part = Pathological(num_clients=2, classes_per_client=1, num_shots=1)
    manifest = write_federated_shards(source, part, tmp_path / "fed", progress=False)
    assert manifest["num_clients"] == 2 and manifest["class_names"] == source.class_names
    assert manifest["dataset"] == source.describe()
    assert load_manifest(tmp_path / "fed") == manifest
    images, labels = read_client_samples(tmp_path / "fed", manifest, 0, "train")
    assert len(images) == 1 and images[0].size == (8, 8)
    assert sum(c["num_train"] for c in manifest["clients"]) == 1 + 2  # last client owns 2 classes


def test_shards_from_office_domains(tmp_path: Path) -> None:
    _write_office(tmp_path / "raw", {"amazon": 3, "webcam": 2})
    source = OfficeCaltech10(root=str(tmp_path / "raw"), domains=["amazon", "webcam"])
    manifest = write_federated_shards(source, Domains(), tmp_path / "fed", progress=False)
    assert manifest["num_clients"] == 2
    assert [c["domains"] for c in manifest["clients"]] == [[0], [1]]
    assert [c["num_train"] for c in manifest["clients"]] == [20, 10]
    assert [c["num_test"] for c in manifest["clients"]] == [10, 10]


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_layout_is_torchvisions(name: str) -> None:
    """Folder, file and key names come from torchvision's CIFAR10 / CIFAR100."""
    import torchvision.datasets as tvd

    from flora.data.real.cifar import _RELEASES

    tv = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]
    release = _RELEASES[name]
    assert CIFAR(name=name, root="r").folder == Path("r") / tv.base_folder
    assert release.files == {
        "train": [f for f, _ in tv.train_list],
        "test": [f for f, _ in tv.test_list],
    }
    assert (release.meta, release.names_key) == (tv.meta["filename"], tv.meta["key"])


def test_cifar_download_uses_torchvisions_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets as tvd
    import torchvision.datasets.utils as tvu

    calls: list[tuple] = []

    def fake_download(url: str, root: str, filename: str, md5: str) -> None:
        calls.append((url, root, filename, md5))

    monkeypatch.setattr(tvu, "download_and_extract_archive", fake_download)
    ds = CIFAR(name="cifar100", root=str(tmp_path), download=True)
    with pytest.raises(
        FloraDataError, match=r"CIFAR folder not found: .*cifar-100-python; the download did not"
    ):
        _ = ds.class_names
    assert calls == [(tvd.CIFAR100.url, str(tmp_path), tvd.CIFAR100.filename, tvd.CIFAR100.tgz_md5)]


def _rewrite(path: Path, obj: object) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda p: p.write_bytes(b"not a pickle"),
            r"cannot read CIFAR file .*test_batch \(.*\); re-download",
        ),
        (lambda p: p.write_bytes(p.read_bytes()[:100]), r"cannot read CIFAR file .*test_batch"),
        (lambda p: _rewrite(p, [1, 2]), r"test_batch has no 'data' entry; the file is not a CIFAR"),
        (
            lambda p: _rewrite(p, {"data": np.zeros((2, 10), np.uint8), "labels": [0, 1]}),
            r"test_batch holds data of shape \(2, 10\) with 2 labels, expected \(N, 3072\)",
        ),
        (
            lambda p: _rewrite(p, {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 3]}),
            r"cifar-10-batches-py has labels outside \[0, 3\); re-download the data",
        ),
    ],
)
def test_corrupt_cifar_files_are_named(tmp_path: Path, damage, message) -> None:  # type: ignore[no-untyped-def]
    _write_cifar(tmp_path, "cifar10")
    damage(tmp_path / "cifar-10-batches-py" / "test_batch")
    ds = CIFAR(name="cifar10", root=str(tmp_path))
    assert ds.size("train") == 10  # the other split is unaffected
    with pytest.raises(FloraDataError, match=message) as info:
        ds.labels("test")
    assert "\n" not in str(info.value)


def test_split_and_index_errors_are_the_same_for_every_source(tmp_path: Path) -> None:
    from flora.data import SyntheticShapes

    _write_cifar(tmp_path, "cifar10")
    _write_coop(tmp_path)
    sources = [
        SyntheticShapes(num_colors=1, num_shapes=2, train_per_class=1, test_per_class=1),
        CIFAR(name="cifar10", root=str(tmp_path)),
        CoOpDataset(root=str(tmp_path)),
    ]
    for ds in sources:
        with pytest.raises(ValueError) as info:
            ds.labels("val")
        assert str(info.value) == "unknown split 'val'; valid splits: ['train', 'test']"
        n = ds.size("test")
        with pytest.raises(IndexError) as info:
            ds.image("test", n)
        assert str(info.value) == f"index {n} out of range for split 'test' of size {n}"


def test_public_names_keep_their_homes() -> None:
    """Every public name of the data package is importable from where it always was."""
    import flora.data
    import flora.data.real
    import flora.data.shards
    import flora.data.source
    import flora.data.synthetic

    for name in flora.data.real.__all__:
        assert hasattr(flora.data.real, name)
    for name in ("CIFAR", "CoOpDataset", "DomainNet", "OfficeCaltech10", "SourceDataset"):
        assert getattr(flora.data, name) is not None
    assert flora.data.synthetic.SourceDataset is flora.data.SourceDataset is flora.data.source.SourceDataset
    assert flora.data.synthetic.SPLITS is flora.data.shards.SPLITS is flora.data.source.SPLITS
