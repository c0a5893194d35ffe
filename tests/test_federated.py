"""The federated trainer: sampling, client states, aggregation, devices, precision, resume."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from flora.data import FederatedDataModule
from flora.federated import ClientSampler, ClientState, DiskClientStore, FederatedTrainer, MemoryClientStore
from flora.federated.metrics import mean_std
from flora.federated.sampling import derive_seed
from flora.methods import LocalCoOp, PromptFL, ZeroShotCLIP

from .conftest import tiny_config

FLORA = [sys.executable, "-m", "flora"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


def _trainer(tmp_path: Path, **kw: object) -> FederatedTrainer:
    args = dict(rounds=2, output_dir=str(tmp_path / "runs"), name="t", progress=False, seed=0)
    args.update(kw)
    return FederatedTrainer(**args)  # type: ignore[arg-type]


def _dm(root: Path, **kw: object) -> FederatedDataModule:
    return FederatedDataModule(root=str(root), batch_size=8, **kw)  # type: ignore[arg-type]


def test_sampler_is_fixed_in_advance_and_seeded() -> None:
    s = ClientSampler(100, fraction=0.1, seed=7)
    assert s.per_round == 10
    sched = s.schedule(5)
    assert sched == ClientSampler(100, fraction=0.1, seed=7).schedule(5)
    assert sched != ClientSampler(100, fraction=0.1, seed=8).schedule(5)
    assert all(r == sorted(set(r)) and len(r) == 10 for r in sched)
    assert s.clients(3) == sched[3]  # any round can be drawn alone (resume)
    with pytest.raises(ValueError):
        ClientSampler(10, fraction=0.0)


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_store_copies_on_put_and_get(tmp_path: Path, kind: str) -> None:
    store = MemoryClientStore() if kind == "memory" else DiskClientStore(tmp_path / "s")
    t = torch.zeros(3)
    store.put(1, ClientState({"a": t}, {"state": {0: {"momentum_buffer": torch.ones(3)}}}))
    t.add_(5)
    got = store.get(1)
    assert got is not None and torch.equal(got.local["a"], torch.zeros(3))
    got.local["a"].add_(1)
    assert torch.equal(store.get(1).local["a"], torch.zeros(3))  # type: ignore[union-attr]
    assert store.get(2) is None and store.client_ids() == [1]
    if kind == "disk":
        reopened = DiskClientStore(tmp_path / "s")
        assert reopened.client_ids() == [1]
        assert torch.equal(reopened.get(1).optim["state"][0]["momentum_buffer"], torch.ones(3))  # type: ignore[union-attr,index]
    # evaluation's read: the local tensors alone (a disk store does not open the optimiser file)
    if kind == "disk":
        (tmp_path / "s" / "client-000001.optim.pt").unlink()
    local_only = store.get(1, optim=False)
    assert (
        local_only is not None
        and local_only.optim is None
        and torch.equal(local_only.local["a"], torch.zeros(3))
    )


def test_evaluation_reads_client_states_without_their_optimiser_state(
    tmp_path: Path, tiny_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[bool] = []
    get = MemoryClientStore.get

    def spy(self: MemoryClientStore, client_id: int, *, optim: bool = True) -> ClientState | None:
        reads.append(optim)
        return get(self, client_id, optim=optim)

    monkeypatch.setattr(MemoryClientStore, "get", spy)
    trainer = _trainer(tmp_path, rounds=1, eval_every=1, optimizer_state="persist")
    trainer.fit(LocalCoOp(n_ctx=4, lr=0.01), _dm(tiny_root))
    # every client trained reads its optimiser state (so does the checkpoint); the evaluation of every client does not
    trained = len(trainer.history[0]["clients"])
    assert reads[:trained] == [True] * trained
    assert reads.count(False) >= len(trainer.dm.evaluable_clients) > 0


def test_a_disk_store_that_is_not_the_writer_reads_what_the_writer_wrote(tmp_path: Path) -> None:
    writer, reader = DiskClientStore(tmp_path / "s"), DiskClientStore(tmp_path / "s", writer=False)
    state = ClientState({"a": torch.arange(3.0)}, None)
    reader.put(1, state)  # the same state every rank holds: only the writer's files are written
    assert list((tmp_path / "s").iterdir()) == [] and reader.client_ids() == [1]
    writer.put(1, state)
    assert torch.equal(reader.get(1).local["a"], torch.arange(3.0))  # type: ignore[union-attr]


def test_two_devices_with_client_states_on_disk_match_one_in_memory(tmp_path: Path, tiny_root: Path) -> None:
    """One rank writes the states both hold; the other reads them after the round's barrier."""
    one = _trainer(tmp_path / "one", rounds=2).fit(LocalCoOp(n_ctx=4, lr=0.01), _dm(tiny_root))
    two = _trainer(
        tmp_path / "two", rounds=2, accelerator="cpu", devices=2, strategy="ddp_spawn", state_store="disk"
    ).fit(LocalCoOp(n_ctx=4, lr=0.01), _dm(tiny_root))
    for key, value in _metrics(one).items():
        assert two["final"][key] == pytest.approx(value, abs=1e-4), key
    files = sorted(p.name for p in (tmp_path / "two" / "runs" / "t" / "client_states").iterdir())
    assert files == [f"client-{c:06d}.{ext}" for c in range(4) for ext in ("optim.pt", "safetensors")]


def test_fit_writes_run_folder_and_client_states_do_not_alias(tmp_path: Path, tiny_root: Path) -> None:
    trainer = _trainer(tmp_path, rounds=2)
    summary = trainer.fit(LocalCoOp(n_ctx=4, lr=0.01), _dm(tiny_root))
    run = tmp_path / "runs" / "t"
    for name in ("metrics.jsonl", "summary.json", "accuracy.png", "checkpoints/last.ckpt"):
        assert (run / name).exists(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    for key in ("local_acc_mean", "local_acc_std", "local_acc_worst10", "local_acc_pooled", "local_f1_mean"):
        assert 0.0 <= summary["final"][key] <= 100.0 or key == "local_acc_std"
    assert summary["final"]["bytes_up_total"] == 0  # Local CoOp never communicates
    # every client trained in both rounds, has its own state, and no two states share storage
    assert [r["clients"] for r in records] == [[0, 1, 2, 3]] * 2
    states = [trainer.store.get(c) for c in range(4)]
    assert all(s is not None for s in states)
    ptrs = {s.local["prompt.ctx"].untyped_storage().data_ptr() for s in states}  # type: ignore[union-attr]
    assert len(ptrs) == 4
    internal = [trainer.store._states[c].local["prompt.ctx"] for c in range(4)]  # type: ignore[attr-defined]
    assert len({t.untyped_storage().data_ptr() for t in internal}) == 4
    assert not torch.equal(internal[0], internal[1])  # clients really trained different prompts
    # each client kept its own optimiser (momentum) state
    moms = [trainer.store._states[c].optim["state"][0]["momentum_buffer"] for c in range(4)]  # type: ignore[attr-defined]
    assert len({m.untyped_storage().data_ptr() for m in moms}) == 4


def test_promptfl_global_prompt_is_fedavg_of_uploads(tmp_path: Path, tiny_root: Path) -> None:
    """One round by hand: the aggregated prompt equals the sample-weighted mean of the client uploads."""
    trainer = _trainer(tmp_path, rounds=1)
    uploads: list = []
    original = FederatedTrainer._train_client

    def spy(self, cid, r):  # type: ignore[no-untyped-def]
        res = original(self, cid, r)
        uploads.append((res.client_id, res.num_samples, res.upload["prompt.ctx"].clone()))
        return res

    FederatedTrainer._train_client = spy  # type: ignore[method-assign]
    try:
        trainer.fit(PromptFL(n_ctx=4, lr=0.01), _dm(tiny_root))
    finally:
        FederatedTrainer._train_client = original  # type: ignore[method-assign]
    total = sum(n for _, n, _ in uploads)
    expected = sum(t * (n / total) for _, n, t in uploads)
    torch.testing.assert_close(trainer.global_state["prompt.ctx"], expected, atol=1e-6, rtol=0)
    assert len({u[2].data_ptr() for u in uploads}) == len(uploads)


def test_zero_shot_evaluates_without_training(tmp_path: Path, tiny_root: Path) -> None:
    summary = _trainer(tmp_path, rounds=3).fit(ZeroShotCLIP(), _dm(tiny_root))
    assert summary["final"]["round"] == 0 and summary["final"]["bytes_up_total"] == 0


def test_bf16_mixed_runs(tmp_path: Path, tiny_root: Path) -> None:
    summary = _trainer(tmp_path, rounds=1, precision="bf16-mixed").fit(PromptFL(n_ctx=4), _dm(tiny_root))
    assert 0.0 <= summary["final"]["local_acc_mean"] <= 100.0


def test_feature_cache_on_and_off_agree(tmp_path: Path, tiny_root: Path) -> None:
    on = _trainer(tmp_path / "a", rounds=1).fit(PromptFL(n_ctx=4), _dm(tiny_root, feature_cache="memory"))
    off = _trainer(tmp_path / "b", rounds=1).fit(PromptFL(n_ctx=4), _dm(tiny_root, feature_cache="off"))
    assert on["final"]["local_acc_mean"] == pytest.approx(off["final"]["local_acc_mean"], abs=1e-6)


def _final_prompt(run: Path) -> torch.Tensor:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_state"]["prompt.ctx"]


def _metrics(summary: dict) -> dict:
    return {k: v for k, v in summary["final"].items() if k != "wall_time_s"}


def test_two_devices_match_one(tmp_path: Path, tiny_root: Path) -> None:
    one = _trainer(tmp_path / "one", rounds=2).fit(PromptFL(n_ctx=4, lr=0.01), _dm(tiny_root))
    two = _trainer(tmp_path / "two", rounds=2, accelerator="cpu", devices=2, strategy="ddp_spawn").fit(
        PromptFL(n_ctx=4, lr=0.01), _dm(tiny_root)
    )
    torch.testing.assert_close(
        _final_prompt(tmp_path / "two" / "runs" / "t"),
        _final_prompt(tmp_path / "one" / "runs" / "t"),
        atol=1e-6,
        rtol=0,
    )
    for key, value in _metrics(one).items():
        assert two["final"][key] == pytest.approx(value, abs=1e-4), key


def test_resume_after_kill_matches_uninterrupted(tmp_path: Path, tiny_root: Path) -> None:
    cfg = tiny_config(tmp_path, tiny_root, rounds=12)
    full_dir = tmp_path / "full"
    subprocess.run(
        [*FLORA, "fit", "--config", str(cfg), "--trainer.output_dir", str(full_dir)], env=ENV, check=True
    )
    full = json.loads((full_dir / "t" / "summary.json").read_text())

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [*FLORA, "fit", "--config", str(cfg), "--trainer.output_dir", str(run_dir)], env=ENV
    )
    metrics = run_dir / "t" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "t" / "summary.json").exists(), "the run finished before it could be killed"
    subprocess.run(
        [*FLORA, "fit", "--config", str(cfg), "--trainer.output_dir", str(run_dir), "--ckpt_path", "last"],
        env=ENV,
        check=True,
    )
    resumed = json.loads((run_dir / "t" / "summary.json").read_text())
    assert _metrics(resumed) == pytest.approx(_metrics(full), abs=1e-6)
    assert _metrics(resumed["best"] and {"final": resumed["best"]}) == pytest.approx(
        _metrics({"final": full["best"]})
    )
    lines = (run_dir / "t" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == list(range(1, 13))


def test_checkpoint_restores_every_clients_local_state(tmp_path: Path, tiny_root: Path) -> None:
    trainer = _trainer(tmp_path, rounds=1)
    trainer.fit(LocalCoOp(n_ctx=4, lr=0.01), _dm(tiny_root))
    again = _trainer(tmp_path, rounds=1)
    again.fit(LocalCoOp(n_ctx=4, lr=0.01), _dm(tiny_root), ckpt_path="last")
    for c in range(4):
        assert torch.equal(again.store.get(c).local["prompt.ctx"], trainer.store.get(c).local["prompt.ctx"])  # type: ignore[union-attr]


def test_disk_store_run_matches_memory(tmp_path: Path, tiny_root: Path) -> None:
    mem = _trainer(tmp_path / "m", rounds=2).fit(LocalCoOp(n_ctx=4, lr=0.01), _dm(tiny_root))
    disk_trainer = _trainer(tmp_path / "d", rounds=2, state_store="disk")
    disk = disk_trainer.fit(LocalCoOp(n_ctx=4, lr=0.01), _dm(tiny_root))
    assert _metrics(disk) == pytest.approx(_metrics(mem), abs=1e-6)
    assert len(list((tmp_path / "d" / "runs" / "t" / "client_states").glob("*.safetensors"))) == 4


def test_wandb_logger_offline(tmp_path: Path, tiny_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    trainer = _trainer(tmp_path, rounds=1, loggers=["csv", "wandb"])
    trainer.fit(PromptFL(n_ctx=4), _dm(tiny_root))
    runs = list((tmp_path / "runs" / "t" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_disk_feature_cache_is_reused(tmp_path: Path, tiny_root: Path) -> None:
    root = tmp_path / "fed"
    shutil.copytree(tiny_root, root)
    first = _dm(root, feature_cache="disk")
    a = _trainer(tmp_path / "a", rounds=1).fit(PromptFL(n_ctx=4), first)
    files = sorted((root / "features").glob("*.safetensors"))
    assert len(files) == 8  # 4 clients x (train, test)
    assert first.cache.misses == 8
    second = _dm(root, feature_cache="disk")
    b = _trainer(tmp_path / "b", rounds=1).fit(PromptFL(n_ctx=4), second)
    assert second.cache.misses == 0 and second.cache.hits >= 8
    assert a["final"]["local_acc_mean"] == b["final"]["local_acc_mean"]


def test_zero_shot_reference_equals_zero_shot_method(tmp_path: Path, tiny_root: Path) -> None:
    ref = _trainer(tmp_path / "a", rounds=1, zero_shot_reference=True).fit(PromptFL(n_ctx=4), _dm(tiny_root))
    zs = _trainer(tmp_path / "b", rounds=1).fit(ZeroShotCLIP(), _dm(tiny_root))
    for key in ("local_acc_mean", "local_acc_pooled", "local_f1_mean"):
        assert ref["zero_shot"][key] == pytest.approx(zs["final"][key]), key
    records = [
        json.loads(x) for x in (tmp_path / "a" / "runs" / "t" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(records[-1]["local_acc_clients"]) == 4
    assert sum(records[-1]["local_acc_clients"]) / 4 == pytest.approx(records[-1]["local_acc_mean"])


def test_training_batches_reach_the_method_unread_and_in_the_seeded_order(
    tmp_path: Path, tiny_root: Path
) -> None:
    """Reading a loader draws its shuffling generator: a method that ignores the batches leaves the order alone."""

    class Recorder(PromptFL):
        def __init__(self, **kw: object) -> None:
            super().__init__(**kw)  # type: ignore[arg-type]
            self.turns: list[
                list
            ] = []  # per client turn: [batches given to the method, first labels trained on]

        def before_local_training(self, batches: object) -> None:
            self.turns.append([batches, None])

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            if self.turns[-1][1] is None:
                self.turns[-1][1] = batch[1].clone()
            return super().training_step(batch, batch_idx)

    module = Recorder(n_ctx=4, lr=0.01)
    dm = _dm(tiny_root)
    _trainer(tmp_path, rounds=1).fit(module, dm)
    assert len(module.turns) == 4
    for cid, (batches, first) in enumerate(module.turns):
        seed = derive_seed(0, 3, 0, cid)  # round 0, client cid
        expected = next(iter(dm.client_loader(cid, "train", train=True, seed=seed)))[1]
        assert torch.equal(first.cpu(), expected)
        # the batches are still readable, on the device, as (inputs, labels)
        x, y = next(iter(batches))
        assert x.device == module.device and y.shape[0] == x.shape[0]


def test_client_states_of_the_previous_format_still_load(tmp_path: Path, tiny_root: Path) -> None:
    """Client states once also counted the rounds a client trained: checkpoints and disk stores holding it load."""
    old = {"local": {"a": torch.ones(2)}, "optim": None, "rounds_trained": 3}
    state = ClientState.from_dict(old)
    assert torch.equal(state.local["a"], torch.ones(2)) and state.optim is None
    store = DiskClientStore(tmp_path / "s")
    store.put(5, state)
    torch.save({"optim": None, "rounds_trained": 3}, tmp_path / "s" / "client-000005.optim.pt")
    got = DiskClientStore(tmp_path / "s").get(5)
    assert got is not None and torch.equal(got.local["a"], torch.ones(2))
    # a checkpoint whose client entries carry the old field resumes like any other
    first = _trainer(tmp_path / "run", rounds=1).fit(PromptFL(n_ctx=4, lr=0.01), _dm(tiny_root))
    ckpt_file = tmp_path / "run" / "runs" / "t" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_file, weights_only=True)
    assert set(next(iter(ckpt["clients"].values()))) == {"local", "optim"}
    for entry in ckpt["clients"].values():
        entry["rounds_trained"] = 1
    torch.save(ckpt, ckpt_file)
    again = _trainer(tmp_path / "run", rounds=2).fit(
        PromptFL(n_ctx=4, lr=0.01), _dm(tiny_root), ckpt_path="last"
    )
    assert again["final"]["round"] == 2 and first["final"]["round"] == 1


def test_mean_std_is_numpys_with_the_given_ddof() -> None:
    values = [61.25, 47.5, 90.0, 12.125, 33.0]
    assert mean_std(values) == (float(np.mean(values)), float(np.std(values)))
    assert mean_std(values, ddof=1)[1] == float(np.std(values, ddof=1))
    assert mean_std(values, ddof=1)[1] == pytest.approx(statistics.stdev(values), abs=1e-12)
    assert mean_std([4.0]) == (4.0, 0.0)
    assert all(math.isnan(v) for v in (*mean_std([]), mean_std([4.0], ddof=1)[1]))
