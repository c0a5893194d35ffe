"""Per-client webdataset shards and the manifest that describes them.

Layout under ``root``::

    manifest.json
    train/client-00000-000000.tar   # samples: __key__, png (encoded image), cls (label)
    test/client-00000-000000.tar

Shards are written with a fixed mtime, so preparing twice gives byte-identical files
and manifests. Everything is written into a temporary folder first and moved into
place at the end; the manifest is the last file written, so a crash never leaves a
manifest that points at missing or half-written shards.

Where a pathological partition shares classes between clients
(``num_clients x classes_per_client > num_classes``), the manifest also has
``"class_holders": {"<class name>": [client ids, ...], ...}`` (class names in label order,
client ids ascending); it is absent when every class has one owner, so disjoint
partitions keep exactly the manifest they always had.

Every client must have training and test samples: a partition that leaves a client
without either is refused before anything is written, and a manifest with such a
client (written by an older flora) is refused by ``FederatedDataModule.setup``.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import shutil
import tarfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from flora.data.partition import Partitioner, base_novel_split
from flora.data.source import SPLITS, SourceDataset
from flora.errors import FloraDataError, FloraDataWarning
from flora.fileio import atomic_write_text

FORMAT_VERSION = 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def write_federated_shards(
    source: SourceDataset,
    partitioner: Partitioner,
    root: str | os.PathLike,
    maxcount: int = 1000,
    progress: bool = True,
    base_novel: bool = False,
) -> dict[str, Any]:
    """Partition ``source`` and write every client's shards plus ``manifest.json`` under ``root``.

    With ``base_novel`` only the base classes (the first ``ceil(C / 2)`` labels) are
    partitioned over clients; the whole base-class test set and the novel-class test set
    are written once as ``global/base-*.tar`` and ``global/novel-*.tar``.
    """
    root = Path(root)
    labels = {s: np.asarray(source.labels(s), dtype=np.int64) for s in SPLITS}
    domains = {s: source.domains(s) for s in SPLITS}
    num_classes = source.num_classes
    keep = {s: np.arange(len(labels[s])) for s in SPLITS}
    base, novel = base_novel_split(num_classes)
    if base_novel:
        if len(novel) == 0:
            raise FloraDataError(
                f"base_novel needs at least 2 classes; {type(source).__name__} has {num_classes}"
            )
        num_classes = len(base)
        keep = {s: np.flatnonzero(labels[s] < len(base)) for s in SPLITS}
    sub_dom = {s: None if domains[s] is None else np.asarray(domains[s])[keep[s]] for s in SPLITS}
    part = partitioner.partition(
        labels["train"][keep["train"]],
        labels["test"][keep["test"]],
        num_classes,
        sub_dom["train"],
        sub_dom["test"],
    )
    part.train = [keep["train"][idx] for idx in part.train]  # back to source indices
    part.test = [keep["test"][idx] for idx in part.test]
    for cid, idx in enumerate(part.train):
        if len(idx) == 0:
            raise FloraDataError(f"client {cid} received no training data from {type(partitioner).__name__}")
    no_test = [cid for cid, idx in enumerate(part.test) if len(idx) == 0]
    if no_test and len(keep["test"]) == 0:
        raise FloraDataError(
            f"{type(source).__name__} has no test samples{' of the base classes' if base_novel else ''}; "
            "every client needs test samples to be evaluated"
        )
    if no_test:  # they train; evaluation leaves them out and counts them (clients_without_test)
        warnings.warn(
            f"{type(partitioner).__name__}: {empty_test_message(no_test, part.num_clients, 'got')}; "
            "they train but are left out of evaluation (counted as clients_without_test). For every "
            "client to be evaluated use fewer clients (data.partition.num_clients), a larger "
            "data.partition.min_size or data.partition.test: all",
            FloraDataWarning,
            stacklevel=2,
        )
    train_counts = part.counts("train", labels["train"])
    test_counts = part.counts("test", labels["test"])

    _remove_stale_temporaries(root)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        for s in SPLITS:
            (tmp / s).mkdir(parents=True)
        clients = []
        global_sets: dict[str, list[dict[str, Any]]] = {}
        if base_novel:
            (tmp / "global").mkdir(parents=True)
            for name, mask in (("base", labels["test"] < len(base)), ("novel", labels["test"] >= len(base))):
                global_sets[name] = _write_shards(
                    source, "test", np.flatnonzero(mask), labels["test"], tmp, f"global/{name}", maxcount
                )
        from rich.progress import Progress

        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task(f"writing shards to {root}", total=part.num_clients)
            for cid in range(part.num_clients):
                entry: dict[str, Any] = {
                    "id": cid,
                    "num_train": int(len(part.train[cid])),
                    "num_test": int(len(part.test[cid])),
                    "train_counts": train_counts[cid].tolist(),
                    "test_counts": test_counts[cid].tolist(),
                    "shards": {},
                }
                if domains["train"] is not None:
                    entry["domains"] = sorted(set(np.asarray(domains["train"])[part.train[cid]].tolist()))
                for s, idx in (("train", part.train[cid]), ("test", part.test[cid])):
                    entry["shards"][s] = _write_shards(
                        source, s, idx, labels[s], tmp, f"{s}/client-{cid:05d}", maxcount
                    )
                clients.append(entry)
                bar.advance(task)

        manifest = {
            "format_version": FORMAT_VERSION,
            "dataset": _jsonable(source.describe()),
            "class_names": list(source.class_names),
            "partition": _jsonable(partitioner.describe()),
            "seed": partitioner.seed,
            "num_clients": part.num_clients,
            "num_classes": source.num_classes,
            "base_novel": base_novel,
            "clients": clients,
        }
        if part.class_holders is not None:
            manifest["class_holders"] = {
                source.class_names[k]: list(part.class_holders[k]) for k in range(num_classes)
            }
        if base_novel:
            manifest["base_classes"] = [source.class_names[k] for k in base]
            manifest["novel_classes"] = [source.class_names[k] for k in novel]
            manifest["global"] = global_sets
        root.mkdir(parents=True, exist_ok=True)
        # drop the old manifest before touching its shards: a crash below leaves no manifest
        # (so the data is re-prepared) rather than one that points at replaced or deleted shards
        (root / "manifest.json").unlink(missing_ok=True)
        for s in (*SPLITS, "global"):
            if (root / s).exists():
                shutil.rmtree(root / s)
            if (tmp / s).exists():
                os.replace(tmp / s, root / s)
        atomic_write_text(root / "manifest.json", json.dumps(manifest, indent=2))
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def empty_test_message(client_ids: list[int], num_clients: int, verb: str = "have") -> str:
    """``"3 of 200 clients have no test samples (clients 4, 9, 17)"``, listing at most five ids."""
    shown = ", ".join(str(c) for c in client_ids[:5])
    more = f" and {len(client_ids) - 5} more" if len(client_ids) > 5 else ""
    return f"{len(client_ids)} of {num_clients} clients {verb} no test samples (clients {shown}{more})"


def manifest_not_found(path: Path) -> FloraDataError:
    """The error for a data root without ``manifest.json`` (``path`` is the manifest's path)."""
    return FloraDataError(
        f"manifest not found: {path}; run `flora prepare --config ...` "
        "(or give data.dataset and data.partition with data.prepare: true)"
    )


def unknown_client(root: str | os.PathLike, client_id: int, num_clients: int) -> FloraDataError:
    """The error for a client id that the manifest under ``root`` does not have."""
    return FloraDataError(f"unknown client {client_id}: {root} has clients 0..{num_clients - 1}")


def shard_missing(path: Path) -> FloraDataError:
    """The error for a shard file that the manifest lists but the disk lacks."""
    return FloraDataError(f"shard {path} is missing; re-run `flora prepare`")


def _remove_stale_temporaries(root: Path) -> None:
    """Delete the temporary folders of earlier prepares of ``root`` whose process is gone."""
    for stale in root.parent.glob(glob.escape(f".{root.name}.tmp-") + "*"):
        try:
            pid = int(stale.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except (ValueError, PermissionError, OSError):
            continue  # not ours, or a live process of another user


def _write_shards(
    source: SourceDataset,
    split: str,
    idx: np.ndarray,
    labels: np.ndarray,
    tmp: Path,
    stem: str,
    maxcount: int,
) -> list[dict[str, Any]]:
    """Write the samples ``idx`` of ``split`` into ``<stem>-000000.tar``, ``<stem>-000001.tar``, ..."""
    shards = []
    n_shards = max(1, -(-len(idx) // maxcount))
    for shard in range(n_shards):
        chunk = idx[shard * maxcount : (shard + 1) * maxcount]
        rel = f"{stem}-{shard:06d}.tar"
        path = tmp / rel
        with wds.TarWriter(str(path), mtime=0.0) as sink:
            for i in chunk.tolist():
                sink.write(
                    {
                        "__key__": f"{split}-{i:08d}",
                        "png": _encode_png(source.image(split, i)),
                        "cls": str(int(labels[i])).encode(),
                    }
                )
        shards.append({"file": rel, "sha256": _sha256(path), "count": int(len(chunk))})
    return shards


def _every_shard(urls: Any) -> Any:
    yield from urls


def load_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """Read ``root/manifest.json``; a missing or unreadable manifest is a :class:`FloraDataError`."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise manifest_not_found(path)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise FloraDataError(f"manifest {path} is not valid JSON ({err}); re-run `flora prepare`") from err
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FloraDataError(
            f"manifest {path} has format_version {manifest.get('format_version')!r}, "
            f"this flora reads {FORMAT_VERSION}; re-run `flora prepare`"
        )
    return manifest


def manifest_matches(
    manifest: dict[str, Any], source: SourceDataset, partitioner: Partitioner, base_novel: bool = False
) -> bool:
    """Whether ``manifest`` was prepared from exactly this dataset, partition and protocol."""
    return (
        manifest.get("dataset") == _jsonable(source.describe())
        and manifest.get("partition") == _jsonable(partitioner.describe())
        and bool(manifest.get("base_novel", False)) == base_novel
    )


def read_client_samples(
    root: str | os.PathLike, manifest: dict[str, Any], client_id: int, split: str, verify: bool = True
) -> tuple[list[Image.Image], np.ndarray]:
    """Decoded images and labels of one client's split, from its (checksum-verified) shards."""
    clients = manifest["clients"]
    if not 0 <= client_id < len(clients):
        raise unknown_client(root, client_id, len(clients))
    return read_shards(root, clients[client_id]["shards"][split], verify)


def read_global_samples(
    root: str | os.PathLike, manifest: dict[str, Any], name: str, verify: bool = True
) -> tuple[list[Image.Image], np.ndarray]:
    """The shared ``base`` or ``novel`` test set of a base/novel manifest (original labels)."""
    sets = manifest.get("global", {})
    if name not in sets:
        raise FloraDataError(
            f"{Path(root) / 'manifest.json'} has no global {name!r} test set (prepared without base_novel)"
        )
    return read_shards(root, sets[name], verify)


def read_shards(
    root: str | os.PathLike, shards: list[dict[str, Any]], verify: bool = True
) -> tuple[list[Image.Image], np.ndarray]:
    """Decoded images and labels of the listed shards (checksums verified first)."""
    root = Path(root)
    images: list[Image.Image] = []
    labels: list[int] = []
    for shard in shards:
        path = root / shard["file"]
        if not path.is_file():
            raise shard_missing(path)
        if verify:
            digest = _sha256(path)
            if digest != shard["sha256"]:
                raise FloraDataError(
                    f"shard {path} is corrupt: sha256 mismatch (expected {shard['sha256'][:12]}.., "
                    f"got {digest[:12]}..); re-run `flora prepare`"
                )
        n_before = len(labels)
        try:
            # each process reads whole clients, so no node/worker splitting of a client's shards
            # a list (not a string) so that braces in the path are not expanded as shard ranges
            ds = wds.WebDataset(
                [str(path.resolve())], shardshuffle=False, empty_check=False, nodesplitter=_every_shard
            )
            for sample in ds:
                img = Image.open(io.BytesIO(sample["png"]))
                img.load()
                images.append(img.convert("RGB"))
                labels.append(int(sample["cls"]))
        except (tarfile.TarError, OSError, KeyError, ValueError) as err:
            raise FloraDataError(f"shard {path} is corrupt: {type(err).__name__}: {err}") from err
        if len(labels) - n_before != shard["count"]:
            raise FloraDataError(
                f"shard {path} is corrupt: {len(labels) - n_before} samples, manifest says {shard['count']}"
            )
    return images, np.asarray(labels, dtype=np.int64)
