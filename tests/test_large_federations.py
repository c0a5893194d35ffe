"""Many small clients: clients without test samples, and evaluation of a seeded sample of clients."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from flora.data import IID, FederatedDataModule, SyntheticShapes, write_federated_shards
from flora.errors import FloraConfigError, FloraDataWarning
from flora.federated import FederatedTrainer
from flora.federated.evaluation import clients_to_evaluate
from flora.methods import PromptFL

SMALL = dict(num_colors=3, num_shapes=3, train_per_class=8, test_per_class=2, image_size=32, seed=0)


@pytest.fixture(scope="module")
def sparse_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 clients, 18 test images: matched test splits leave some clients without any."""
    root = tmp_path_factory.mktemp("sparse") / "fed"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_federated_shards(SyntheticShapes(**SMALL), IID(num_clients=10), root, progress=False)
    assert any(issubclass(w.category, FloraDataWarning) for w in caught)
    return root


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _fit(tmp_path: Path, root: Path, **kw: object) -> tuple[dict, list[dict]]:
    args = dict(rounds=3, output_dir=str(tmp_path / "runs"), name="t", progress=False, seed=0)
    trainer = FederatedTrainer(**{**args, **kw})  # type: ignore[arg-type]
    summary = trainer.fit(PromptFL(n_ctx=4, lr=0.01), FederatedDataModule(str(root), batch_size=8))
    return summary, _records(tmp_path / "runs" / "t")


def test_clients_without_test_samples_train_and_are_counted_not_evaluated(
    tmp_path: Path, sparse_root: Path
) -> None:
    manifest = json.loads((sparse_root / "manifest.json").read_text())
    evaluable = [c["id"] for c in manifest["clients"] if c["num_test"] > 0]
    missing = 10 - len(evaluable)
    assert 0 < missing < 10
    summary, records = _fit(tmp_path, sparse_root, rounds=2)
    for r in records:
        assert r["clients"] == list(range(10))  # every client trained, also those without test samples
        assert r["eval_client_ids"] == evaluable and r["eval_sampled"] is False
        assert r["clients_without_test"] == missing and r["clients_evaluated"] == len(evaluable)
        assert r["local_acc_mean"] == pytest.approx(sum(r["local_acc_clients"]) / len(evaluable))
    assert summary["final"]["clients_without_test"] == missing
    trainer = FederatedTrainer(output_dir=str(tmp_path / "runs"), name="t", progress=False)
    result = trainer.validate(
        PromptFL(n_ctx=4, lr=0.01), FederatedDataModule(str(sparse_root)), ckpt_path="last"
    )
    assert [c["client_id"] for c in result["clients"]] == evaluable
    assert result["local_acc_mean"] == pytest.approx(summary["final"]["local_acc_mean"], abs=1e-9)


def test_sample_of_clients_is_seeded_per_round_and_within_the_evaluable_ones(sparse_root: Path) -> None:
    dm = FederatedDataModule(str(sparse_root))
    dm.setup()
    evaluable = dm.evaluable_clients
    k = len(evaluable) - 2
    samples = {r: clients_to_evaluate(dm, k, seed=0, round_no=r) for r in range(8)}
    for r, ids in samples.items():
        assert ids == sorted(ids) and len(set(ids)) == k and set(ids) <= set(evaluable)
        assert clients_to_evaluate(dm, k, seed=0, round_no=r) == ids  # a pure function of seed and round
    assert len({tuple(v) for v in samples.values()}) > 1  # rounds draw different samples
    assert any(clients_to_evaluate(dm, k, seed=1, round_no=r) != samples[r] for r in range(8))
    assert clients_to_evaluate(dm, None, 0, 3) == evaluable
    assert clients_to_evaluate(dm, len(evaluable) + 5, 0, 3) == evaluable
    with pytest.raises(FloraConfigError, match="trainer.eval_clients must be >= 1, got 0"):
        FederatedTrainer(eval_clients=0)


def test_sampled_evaluation_matches_full_evaluation_on_its_clients_for_any_device_count(
    tmp_path: Path, tiny_root: Path
) -> None:
    """Intermediate rounds evaluate 2 of 4 clients (on 2 devices), the last all 4; training is unchanged."""
    full, full_records = _fit(tmp_path / "full", tiny_root)
    sampled, records = _fit(
        tmp_path / "sampled", tiny_root, eval_clients=2, accelerator="cpu", devices=2, strategy="ddp_spawn"
    )
    dm = FederatedDataModule(str(tiny_root))
    dm.setup()
    for r, f in zip(records[:-1], full_records[:-1], strict=True):
        assert r["eval_sampled"] is True and r["clients_evaluated"] == 2
        assert r["eval_client_ids"] == clients_to_evaluate(dm, 2, seed=0, round_no=r["round"])
        by_id = dict(zip(f["eval_client_ids"], f["local_acc_clients"], strict=True))
        assert r["local_acc_clients"] == pytest.approx([by_id[c] for c in r["eval_client_ids"]], abs=1e-4)
    last = records[-1]
    assert last["eval_sampled"] is False and last["eval_client_ids"] == [0, 1, 2, 3]
    assert last["local_acc_clients"] == pytest.approx(full_records[-1]["local_acc_clients"], abs=1e-4)
    # best and last5 read only the rounds that evaluated every client
    assert sampled["best"]["round"] == 3 and sampled["last5"]["rounds"] == [3]
    assert full["last5"]["rounds"] == [1, 2, 3]
