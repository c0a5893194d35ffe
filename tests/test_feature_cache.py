"""The disk feature cache never gives silently wrong features: damaged entries and changed shards."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flora.data import FeatureCache, FederatedDataModule, FloraDataError


def _encoder(x: torch.Tensor) -> torch.Tensor:
    """A stand-in for the frozen image tower: a fixed slice of the pixels."""
    return x.flatten(1)[:, ::97].clone()


def _copy(tiny_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "fed"
    shutil.copytree(tiny_root, root)
    shutil.rmtree(root / "features", ignore_errors=True)
    return root


def _features(root: Path, client_id: int = 0, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The cached features of one client split, read by a fresh datamodule (empty memory cache)."""
    dm = FederatedDataModule(str(root), feature_cache="disk")
    dm.setup()
    feats, labels = dm.feature_dataset(client_id, split, _encoder, "test-encoder").tensors
    return feats, labels


def _entries(root: Path) -> list[Path]:
    return sorted((root / "features").glob("*.safetensors"))


def _flip_data_byte(path: Path, tensor: str, offset: int = 5) -> None:
    """Flip one byte of ``tensor``'s data (located through the safetensors JSON header)."""
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    begin, _ = json.loads(data[8 : 8 + n])[tensor]["data_offsets"]
    data[8 + n + begin + offset] ^= 0x55
    path.write_bytes(bytes(data))


def _flip_shard(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 32] = bytes(b ^ 0xFF for b in data[mid : mid + 32])
    path.write_bytes(bytes(data))


def test_entries_store_a_checksum(tiny_root: Path, tmp_path: Path) -> None:
    root = _copy(tiny_root, tmp_path)
    feats, labels = _features(root)
    (entry,) = _entries(root)
    with safe_open(str(entry), "pt") as fh:
        meta = fh.metadata()
    assert meta["sha256"] == FeatureCache.checksum(feats, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an intact entry loads silently
        again = _features(root)
    assert torch.equal(again[0], feats) and torch.equal(again[1], labels)


@pytest.mark.parametrize("where", ["features", "labels"])
def test_corrupted_cache_entry_is_recomputed_not_trusted(tiny_root: Path, tmp_path: Path, where: str) -> None:
    root = _copy(tiny_root, tmp_path)
    feats, labels = _features(root)
    (entry,) = _entries(root)
    _flip_data_byte(entry, where, 5 if where == "features" else 0)
    with pytest.warns(RuntimeWarning, match=r"feature cache entry .*\.safetensors is corrupt.*recomputing"):
        got = _features(root)
    assert torch.equal(got[0], feats) and torch.equal(
        got[1], labels
    )  # the right features, not the damaged ones
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the entry was rewritten
        again = _features(root)
    assert torch.equal(again[0], feats)


def test_unreadable_or_unchecksummed_entries_are_recomputed(tiny_root: Path, tmp_path: Path) -> None:
    root = _copy(tiny_root, tmp_path)
    feats, labels = _features(root)
    (entry,) = _entries(root)
    save_file({"features": feats + 1, "labels": labels}, str(entry))  # an entry without a checksum
    with pytest.warns(RuntimeWarning, match="has no checksum"):
        got = _features(root)
    assert torch.equal(got[0], feats)
    entry.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.warns(RuntimeWarning, match="cannot be read"):
        got = _features(root)
    assert torch.equal(got[0], feats)


def test_warm_cache_does_not_hide_a_corrupted_shard(tiny_root: Path, tmp_path: Path) -> None:
    root = _copy(tiny_root, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    _features(root, 1)  # warm disk cache
    shard = root / manifest["clients"][1]["shards"]["train"][0]["file"]
    _flip_shard(shard)
    with pytest.raises(FloraDataError, match=r"client-00001-000000\.tar is corrupt: sha256"):
        _features(root, 1)
    # the same within one process: the memory cache does not hide it either
    shutil.rmtree(root)
    root = _copy(tiny_root, tmp_path)
    dm = FederatedDataModule(str(root), feature_cache="disk")
    dm.setup()
    dm.feature_dataset(1, "test", _encoder, "test-encoder")
    _flip_shard(root / manifest["clients"][1]["shards"]["test"][0]["file"])
    with pytest.raises(FloraDataError, match=r"client-00001-000000\.tar is corrupt"):
        dm.feature_dataset(1, "test", _encoder, "test-encoder")


def test_warm_cache_does_not_hide_a_replaced_or_missing_shard(tiny_root: Path, tmp_path: Path) -> None:
    root = _copy(tiny_root, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    _features(root, 1)
    ours = root / manifest["clients"][1]["shards"]["train"][0]["file"]
    other = root / manifest["clients"][0]["shards"]["train"][0]["file"]
    shutil.copyfile(other, ours)  # a valid shard, but not this client's
    with pytest.raises(FloraDataError, match=r"client-00001-000000\.tar is corrupt: sha256 mismatch"):
        _features(root, 1)
    ours.unlink()
    with pytest.raises(FloraDataError, match=r"client-00001-000000\.tar is missing"):
        _features(root, 1)


def test_unchanged_shards_keep_hitting_the_cache(tiny_root: Path, tmp_path: Path) -> None:
    root = _copy(tiny_root, tmp_path)
    _features(root, 2)
    dm = FederatedDataModule(str(root), feature_cache="disk")
    dm.setup()
    dm.feature_dataset(2, "train", _encoder, "test-encoder")
    assert (dm.cache.hits, dm.cache.misses) == (1, 0)
    assert len(_entries(root)) == 1


def test_a_failed_entry_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries are written to a temporary file and renamed: a failed write leaves nothing behind."""
    import flora.data.features as features

    feats, labels = torch.ones(2, 3), torch.tensor([0, 1])
    cache = FeatureCache("disk", tmp_path / "features")
    cache.get_or_compute("ok", lambda: (feats, labels))
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == ["ok.safetensors"]

    def failing_save(tensors, filename, metadata=None):  # type: ignore[no-untyped-def]
        Path(filename).write_bytes(b"half an entry")
        raise OSError("disk full")

    monkeypatch.setattr(features, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        FeatureCache("disk", tmp_path / "features").get_or_compute("bad", lambda: (feats, labels))
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == ["ok.safetensors"]


def test_cached_feature_loader_gives_the_per_sample_batches(tiny_root: Path, tmp_path: Path) -> None:
    """One indexing per batch: the same shuffled batches, values and types as stacking sample by sample."""
    from torch.utils.data import DataLoader, TensorDataset

    dm = FederatedDataModule(str(_copy(tiny_root, tmp_path)), batch_size=4)
    dm.setup()
    loader = dm.client_loader(0, "train", train=True, seed=7, encoder=_encoder, encoder_key="test-encoder")
    feats, labels = loader.dataset.tensors
    assert len(feats) > 4 and len(feats) % 4  # several batches, the last one short
    per_sample = DataLoader(
        TensorDataset(feats, labels), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(7)
    )
    got, expected = list(loader), list(per_sample)
    assert len(got) == len(expected)
    for (x, y), (ex, ey) in zip(got, expected, strict=True):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    assert sorted(torch.cat([y for _, y in got]).tolist()) == sorted(
        labels.tolist()
    )  # shuffled, every sample once
    calls = []
    get_item = TensorDataset.__getitem__
    type(loader.dataset).__getitem__ = lambda self, i: calls.append(i) or get_item(self, i)  # type: ignore[method-assign]
    try:
        list(loader)
    finally:
        del type(loader.dataset).__getitem__
    assert calls == []  # no per-sample access
