"""Shared fixtures: a tiny synthetic federation written once per test session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from flora.data import Dirichlet, SyntheticShapes, write_federated_shards  # noqa: E402

TINY_DATA = dict(num_colors=3, num_shapes=3, train_per_class=12, test_per_class=6, image_size=32, seed=0)
TINY_PARTITION = dict(num_clients=4, alpha=0.5, min_size=5, seed=0)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared 4-client, 9-class federation (read-only for tests: copy it before damaging it)."""
    root = tmp_path_factory.mktemp("tiny") / "fed"
    write_federated_shards(SyntheticShapes(**TINY_DATA), Dirichlet(**TINY_PARTITION), root, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_bn_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same federation under the base-to-novel protocol (base: 5 classes, novel: 4)."""
    root = tmp_path_factory.mktemp("tiny_bn") / "fed"
    part = Dirichlet(**{**TINY_PARTITION, "min_size": 3})
    write_federated_shards(SyntheticShapes(**TINY_DATA), part, root, progress=False, base_novel=True)
    return root


def tiny_config(
    tmp_path: Path, root: Path, method: str = "flora.methods.PromptFL", **trainer: object
) -> Path:
    """Write a small flora config for CLI tests and return its path."""
    import yaml

    model: dict = {"class_path": method, "init_args": {"clip_model": "flora-tiny"}}
    if method.endswith(("PromptFL", "LocalCoOp")):
        model["init_args"].update(n_ctx=4, lr=0.01)
    cfg = {
        "model": model,
        "data": {
            "root": str(root),
            "dataset": {"class_path": "flora.data.SyntheticShapes", "init_args": TINY_DATA},
            "partition": {"class_path": "flora.data.Dirichlet", "init_args": TINY_PARTITION},
            "batch_size": 8,
        },
        "trainer": {
            "name": "t",
            "output_dir": str(tmp_path / "runs"),
            "rounds": 2,
            "progress": False,
            **trainer,
        },
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
