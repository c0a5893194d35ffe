"""Per-client webdataset shards: round trip, determinism, and clear errors for damaged files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flora.data import (
    IID,
    FederatedDataModule,
    FloraDataError,
    SyntheticShapes,
    load_manifest,
    read_client_samples,
    write_federated_shards,
)

SOURCE = dict(num_colors=3, num_shapes=3, train_per_class=6, test_per_class=3, image_size=16, seed=0)


def _write(root: Path, maxcount: int = 1000) -> dict:
    return write_federated_shards(
        SyntheticShapes(**SOURCE), IID(num_clients=3), root, maxcount=maxcount, progress=False
    )


def test_round_trip_is_pixel_exact(tmp_path: Path) -> None:
    manifest = _write(tmp_path / "a")
    source = SyntheticShapes(**SOURCE)
    assert manifest["class_names"] == source.class_names
    total = 0
    for cid in range(3):
        images, labels = read_client_samples(tmp_path / "a", manifest, cid, "train")
        assert len(images) == manifest["clients"][cid]["num_train"]
        assert np.bincount(labels, minlength=9).tolist() == manifest["clients"][cid]["train_counts"]
        total += len(images)
    assert total == source.size("train")
    # the first client's first image is exactly the source image it came from
    images, labels = read_client_samples(tmp_path / "a", manifest, 0, "test")
    src_labels = source.labels("test")
    idx = IID(num_clients=3).partition(source.labels("train"), src_labels, 9).test[0]
    assert labels.tolist() == src_labels[idx].tolist()
    assert np.array_equal(np.asarray(images[0]), np.asarray(source.image("test", int(idx[0]))))


def test_preparing_twice_is_byte_identical(tmp_path: Path) -> None:
    a, b = _write(tmp_path / "a"), _write(tmp_path / "b")
    assert a == b
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()


def test_small_maxcount_gives_several_shards(tmp_path: Path) -> None:
    manifest = _write(tmp_path / "a", maxcount=5)
    shards = manifest["clients"][0]["shards"]["train"]
    assert len(shards) == -(-manifest["clients"][0]["num_train"] // 5) > 1
    _, labels = read_client_samples(tmp_path / "a", manifest, 0, "train")
    assert len(labels) == manifest["clients"][0]["num_train"]


def test_corrupt_and_truncated_shards_are_named(tmp_path: Path) -> None:
    manifest = _write(tmp_path / "a")
    shard = tmp_path / "a" / manifest["clients"][1]["shards"]["train"][0]["file"]
    data = bytearray(shard.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 32] = bytes(x ^ 0xFF for x in data[mid : mid + 32])
    shard.write_bytes(bytes(data))
    with pytest.raises(FloraDataError, match=r"client-00001-000000\.tar is corrupt: sha256"):
        read_client_samples(tmp_path / "a", manifest, 1, "train")
    shard.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(FloraDataError, match=r"client-00001-000000\.tar is corrupt"):
        read_client_samples(tmp_path / "a", manifest, 1, "train", verify=False)
    (shard).unlink()
    with pytest.raises(FloraDataError, match="missing"):
        read_client_samples(tmp_path / "a", manifest, 1, "train")


def test_missing_and_broken_manifest(tmp_path: Path) -> None:
    with pytest.raises(FloraDataError, match="manifest not found"):
        load_manifest(tmp_path / "nothing")
    _write(tmp_path / "a")
    (tmp_path / "a" / "manifest.json").write_text("{not json")
    with pytest.raises(FloraDataError, match="not valid JSON"):
        load_manifest(tmp_path / "a")


def test_datamodule_prepares_and_refuses_other_parameters(tmp_path: Path) -> None:
    dm = FederatedDataModule(str(tmp_path / "d"), SyntheticShapes(**SOURCE), IID(num_clients=3))
    dm.prepare_data()
    dm.setup()
    assert dm.num_clients == 3 and dm.class_names[0] == "red circle"
    x, y = next(iter(dm.client_loader(0, "train", train=True)))
    assert x.shape[1:] == (3, 16, 16) and y.dtype.is_floating_point is False
    other = FederatedDataModule(str(tmp_path / "d"), SyntheticShapes(**SOURCE), IID(num_clients=4))
    with pytest.raises(FloraDataError, match="other dataset/partition parameters"):
        other.prepare_data()
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["num_clients"] == 3  # nothing was overwritten


def test_client_with_no_data_is_an_error(tmp_path: Path) -> None:
    from flora.data import Pathological

    class Empty(Pathological):
        def assign_train(self, labels, num_classes, domains, rng):  # type: ignore[no-untyped-def]
            parts = super().assign_train(labels, num_classes, domains, rng)
            parts[1] = parts[1][:0]
            return parts

    with pytest.raises(FloraDataError, match="client 1 received no training data"):
        write_federated_shards(SyntheticShapes(**SOURCE), Empty(3, 3), tmp_path / "e", progress=False)
    assert not (tmp_path / "e" / "manifest.json").exists()


def test_domains_manifest_matches_a_fresh_partitioner(tmp_path: Path) -> None:
    from flora.data import Domains, manifest_matches

    styles = dict(SOURCE, styles=["photo", "sketch"])
    write_federated_shards(SyntheticShapes(**styles), Domains(), tmp_path / "d", progress=False)
    manifest = load_manifest(tmp_path / "d")
    assert manifest["num_clients"] == 2
    assert manifest_matches(manifest, SyntheticShapes(**styles), Domains())
    assert not manifest_matches(manifest, SyntheticShapes(**styles), Domains(seed=1))


def test_crash_while_replacing_shards_leaves_no_stale_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flora.data.shards as shards

    _write(tmp_path / "a")

    def crash(*args: object) -> None:
        raise OSError("simulated crash")

    monkeypatch.setattr(shards.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        write_federated_shards(
            SyntheticShapes(**SOURCE), IID(num_clients=3, seed=1), tmp_path / "a", progress=False
        )
    # the old manifest no longer points at the (now removed) shards: data must be re-prepared
    with pytest.raises(FloraDataError, match="manifest not found"):
        load_manifest(tmp_path / "a")


def test_paths_with_brace_and_glob_characters(tmp_path: Path) -> None:
    """A data root may contain characters that webdataset or glob would otherwise expand."""
    root = tmp_path / "run{1,2}[a]" / "data"
    manifest = _write(root)
    images, labels = read_client_samples(root, manifest, 1, "train")
    assert len(images) == manifest["clients"][1]["num_train"] == len(labels)


def test_failed_or_killed_prepares_leave_no_temporary_folder(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    # a temporary folder left by a process that no longer exists (e.g. killed mid-write)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = tmp_path / f".a.tmp-{int(dead.stdout)}"
    (stale / "train").mkdir(parents=True)
    live = tmp_path / f".a.tmp-{os.getppid()}"  # a running process's folder is left alone
    live.mkdir()
    _write(tmp_path / "a")
    assert not stale.exists() and live.exists()

    class Exploding(SyntheticShapes):
        def image(self, split: str, index: int):  # type: ignore[no-untyped-def]
            if index > 5:
                raise RuntimeError("renderer failed")
            return super().image(split, index)

    with pytest.raises(RuntimeError, match="renderer failed"):
        write_federated_shards(Exploding(**SOURCE), IID(num_clients=3), tmp_path / "b", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a", live.name])
    assert load_manifest(tmp_path / "a")["num_clients"] == 3  # the earlier data is untouched


# ---------------------------------------------------------------- pathological manifests


def _strip_checksums(obj):  # type: ignore[no-untyped-def]
    """The manifest without shard sha256s (PNG bytes may differ between zlib builds)."""
    if isinstance(obj, dict):
        return {k: _strip_checksums(v) for k, v in obj.items() if k != "sha256"}
    if isinstance(obj, list):
        return [_strip_checksums(v) for v in obj]
    return obj


def test_pathological_disjoint_manifest_is_unchanged(tmp_path: Path) -> None:
    """3 clients x 3 classes over 9 classes: the manifest written before classes could be shared."""
    import hashlib

    from flora.data import Pathological

    manifest = write_federated_shards(
        SyntheticShapes(**SOURCE), Pathological(3, 3, seed=0), tmp_path / "p", progress=False
    )
    assert "class_holders" not in manifest
    assert [c["train_counts"] for c in manifest["clients"]] == [
        [0, 0, 6, 0, 6, 6, 0, 0, 0],
        [0, 0, 0, 6, 0, 0, 6, 0, 6],
        [6, 6, 0, 0, 0, 0, 0, 6, 0],
    ]
    text = json.dumps(_strip_checksums(manifest), sort_keys=True).encode()
    # computed with the pre-sharing code (flora 3b7dcd1)
    assert (
        hashlib.sha256(text).hexdigest() == "fc767e4119d92a40bd690d0ad39becebf3f6b1b524dc0126ef80e0ca6c523dc2"
    )


def test_shared_pathological_manifest_records_class_holders(tmp_path: Path) -> None:
    from flora.data import Pathological

    manifest = write_federated_shards(
        SyntheticShapes(**SOURCE), Pathological(6, 3, seed=0), tmp_path / "p", progress=False
    )  # 6 x 3 = 18 > 9 classes: every class held by 2 clients
    holders = manifest["class_holders"]
    assert list(holders) == manifest["class_names"]  # keyed by class name, in label order
    counts = np.array([c["train_counts"] for c in manifest["clients"]])
    for k, name in enumerate(manifest["class_names"]):
        assert holders[name] == np.flatnonzero(counts[:, k] > 0).tolist()
        assert len(holders[name]) == 2 and counts[holders[name], k].tolist() == [3, 3]
    assert ((counts > 0).sum(1) == 3).all()
    assert load_manifest(tmp_path / "p") == manifest


# ---------------------------------------------------------------- clients without test samples


def test_clients_without_test_samples_are_written_with_a_warning(tmp_path: Path) -> None:
    """12 clients, one test sample per class: matched test splits leave 10 clients without any."""
    from flora.errors import FloraDataWarning

    source = SyntheticShapes(**{**SOURCE, "test_per_class": 1})
    with pytest.warns(
        FloraDataWarning,
        match=r"^IID: 10 of 12 clients got no test samples \(clients 1, 2, 3, 4, 5 and 5 more\); "
        r"they train but are left out of evaluation .*test: all$",
    ):
        manifest = write_federated_shards(source, IID(num_clients=12), tmp_path / "e", progress=False)
    assert [c["num_test"] for c in manifest["clients"]].count(0) == 10
    assert all(c["num_train"] > 0 for c in manifest["clients"])
    dm = FederatedDataModule(str(tmp_path / "e"), prepare=False)
    dm.setup()
    assert dm.evaluable_clients == [i for i, c in enumerate(manifest["clients"]) if c["num_test"] > 0]
    for cid in range(12):  # every client's training split reads back, also those without a test split
        assert len(dm.read_split(cid, "train")[1]) == manifest["clients"][cid]["num_train"]
    # test: all gives every client the whole test split
    write_federated_shards(source, IID(num_clients=12, test="all"), tmp_path / "all", progress=False)


def test_manifest_in_which_no_client_has_test_samples_fails_at_setup(tmp_path: Path) -> None:
    """Some clients without test samples are evaluated without them; none with any fails at setup."""
    _write(tmp_path / "a")
    path = tmp_path / "a" / "manifest.json"
    manifest = json.loads(path.read_text())
    for cid in (0, 2):
        manifest["clients"][cid]["num_test"] = 0
        manifest["clients"][cid]["shards"]["test"][0]["count"] = 0
    path.write_text(json.dumps(manifest))
    dm = FederatedDataModule(str(tmp_path / "a"), prepare=False)
    dm.setup()
    assert dm.evaluable_clients == [1]
    dm.client_id = 2  # a plain lightning.Trainer validating a client without test samples
    with pytest.raises(FloraDataError, match=r"^client 2 has no test samples in .*: \[1\]\)$"):
        dm.val_dataloader()
    manifest["clients"][1]["num_test"] = 0
    path.write_text(json.dumps(manifest))
    with pytest.raises(
        FloraDataError, match=r"3 of 3 clients have no test samples \(clients 0, 1, 2\), so none"
    ):
        FederatedDataModule(str(tmp_path / "a"), prepare=False).setup()


def test_many_clients_without_test_samples_are_listed_briefly() -> None:
    from flora.data.shards import empty_test_message

    msg = empty_test_message(list(range(0, 400, 2)), 400)
    assert msg.startswith("200 of 400 clients") and "clients 0, 2, 4, 6, 8 and 195 more" in msg
    assert "\n" not in msg


# ---------------------------------------------------------------- range checks of the options


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_size=0), "data.batch_size must be >= 1, got 0"),
        (dict(eval_batch_size=-4), "data.eval_batch_size must be >= 1, got -4"),
        (dict(num_workers=-1), "data.num_workers must be >= 0, got -1"),
        (dict(client_id=-1), "data.client_id must be >= 0, got -1"),
        (dict(feature_cache="ram"), "data.feature_cache must be 'memory', 'disk' or 'off', got 'ram'"),
    ],
)
def test_bad_datamodule_options_are_one_line_config_errors(tmp_path: Path, kwargs, message) -> None:  # type: ignore[no-untyped-def]
    from flora.errors import FloraConfigError

    with pytest.raises(FloraConfigError) as info:
        FederatedDataModule(str(tmp_path / "d"), **kwargs)
    assert str(info.value) == message
    assert info.value.__context__ is None


def test_prepare_leaves_only_the_manifest_and_the_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    _write(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["manifest.json", "test", "train"]

    replace = os.replace

    def crash_on_manifest(src: object, dst: object) -> None:
        if Path(str(dst)).name == "manifest.json":
            raise OSError("simulated crash")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_manifest)
    with pytest.raises(OSError, match="simulated crash"):
        _write(tmp_path / "b")
    # shards in place, but no manifest (so the data is prepared again) and no temporary file
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["test", "train"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
