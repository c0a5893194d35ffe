"""Bad input and interrupted runs: one clear line, checked before anything is written, no data lost."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from flora.cli import main
from flora.errors import FloraConfigError, FloraRunError
from flora.federated import FederatedTrainer
from flora.federated.checkpoint import CheckpointError
from flora.federated.client import ClientRunner
from flora.federated.rundir import RunLock
from flora.methods import PromptFL, PromptFLFT

from .conftest import tiny_config
from .test_federated import _dm, _trainer


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ trainer options
@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("rounds", -2, "trainer.rounds must be >= 0, got -2"),
        ("local_epochs", 0, "trainer.local_epochs must be >= 1, got 0"),
        ("client_fraction", 0, "trainer.client_fraction must be in (0, 1], got 0"),
        ("client_fraction", 1.5, "trainer.client_fraction must be in (0, 1], got 1.5"),
        ("clients_per_round", 0, "trainer.clients_per_round must be >= 1, got 0"),
        ("eval_every", 0, "trainer.eval_every must be >= 1, got 0"),
        ("checkpoint_every", -1, "trainer.checkpoint_every must be >= 1, got -1"),
        ("max_steps_per_round", 0, "trainer.max_steps_per_round must be >= 1, got 0"),
        ("num_nodes", 0, "trainer.num_nodes must be >= 1, got 0"),
        ("devices", 0, "trainer.devices must be >= 1 (or -1 / 'auto' for all), got 0"),
        ("precision", "64", "trainer.precision must be one of 32-true, 32, bf16-mixed, 16-mixed, got '64'"),
        ("optimizer_state", "keep", "trainer.optimizer_state must be 'persist' or 'reset', got 'keep'"),
        ("state_store", "s3", "trainer.state_store must be 'memory' or 'disk', got 's3'"),
        (
            "loggers",
            ["tensorboard"],
            "trainer.loggers: unknown logger(s) ['tensorboard']; use csv and/or wandb",
        ),
        ("name", "../x", "trainer.name must be a relative folder name inside output_dir, got '../x'"),
    ],
)
def test_trainer_options_out_of_range_are_one_line_errors(
    tmp_path: Path, option: str, value: object, message: str
) -> None:
    with pytest.raises(FloraConfigError) as info:
        _trainer(tmp_path, **{option: value})
    assert str(info.value) == message
    assert not (tmp_path / "runs").exists()


def _cli_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run ``flora`` in-process; it must fail with exactly one stderr line and no traceback."""
    capsys.readouterr()
    rc = main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc != 0
    assert len(lines) == 1 and lines[0].startswith("flora: error: "), err
    return lines[0][len("flora: error: ") :]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--trainer.rounds", "-2"], "trainer.rounds must be >= 0, got -2"),
        (["--trainer.client_fraction", "1.5"], "trainer.client_fraction must be in (0, 1], got 1.5"),
        (["--trainer.precision", "16-mixed", "--trainer.accelerator", "cpu"], "16-mixed needs a GPU"),
        (["--trainer.clients_per_round", "20"], "trainer.clients_per_round must be in [1, 4]"),
        (["--data.partition.init_args.alpha", "0"], "data.partition.alpha must be > 0, got 0"),
        (["--data.partition.init_args.alpha", "-1"], "data.partition.alpha must be > 0, got -1"),
        (["--data.partition.init_args.num_clients", "0"], "data.partition.num_clients must be >= 1, got 0"),
        (["--data.batch_size", "0"], "data.batch_size must be >= 1, got 0"),
        (["--data.feature_cache", "ram"], "data.feature_cache must be"),
    ],
)
def test_cli_range_errors_are_one_line_and_write_nothing(
    tmp_path: Path, tiny_root: Path, capsys: pytest.CaptureFixture[str], override: list[str], message: str
) -> None:
    cfg = tiny_config(tmp_path, tiny_root)
    line = _cli_error(capsys, "fit", "--config", str(cfg), *override)
    assert message in line
    assert not (tmp_path / "runs").exists()


def _finished_cli_run(tmp_path: Path, root: Path) -> tuple[Path, Path]:
    """A one-round ``flora fit`` of the tiny config: its config file and its checkpoint."""
    cfg = tiny_config(tmp_path, root, rounds=1)
    assert main(["fit", "--config", str(cfg)]) == 0
    return cfg, tmp_path / "runs" / "t" / "checkpoints" / "last.ckpt"


def test_cli_yaml_syntax_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [\n  class_path: flora.methods.PromptFL\n")
    line = _cli_error(capsys, "fit", "--config", str(bad))
    assert line.startswith(f"config {bad} is not valid YAML:")


def test_cli_truncated_checkpoint_is_one_line(
    tmp_path: Path, tiny_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, ckpt = _finished_cli_run(tmp_path, tiny_root)
    truncated = tmp_path / "half.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    line = _cli_error(
        capsys, "fit", "--config", str(cfg), "--trainer.name", "u", "--ckpt_path", str(truncated)
    )
    assert line.startswith(f"cannot read checkpoint {truncated}")
    assert not (tmp_path / "runs" / "u").exists()


def test_cli_unwritable_output_folder_is_one_line(
    tmp_path: Path, tiny_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output folder should be")
    cfg = tiny_config(tmp_path, tiny_root, rounds=1)
    line = _cli_error(capsys, "fit", "--config", str(cfg), "--trainer.output_dir", str(blocker))
    assert line.startswith(f"cannot write the run folder {blocker / 't'}")
    if os.geteuid() != 0:  # root ignores permission bits; the file case above holds for everyone
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        line = _cli_error(capsys, "fit", "--config", str(cfg), "--trainer.output_dir", str(ro))
        assert line.startswith(f"cannot write the run folder {ro / 't'}")


def test_checkpoint_hyperparameters_never_override_the_config(
    tmp_path: Path, tiny_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, ckpt_file = _finished_cli_run(tmp_path, tiny_root)
    run = ckpt_file.parents[1]
    ckpt = torch.load(ckpt_file, weights_only=True)
    ckpt["hyper_parameters"] = {"lr": 123.0, "n_ctx": 4}
    torch.save(ckpt, ckpt_file)
    assert main(["fit", "--config", str(cfg), "--trainer.rounds", "2", "--ckpt_path", "last"]) == 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["init_args"]["lr"] == 0.01


# ------------------------------------------------------------------ run folders
def test_second_run_with_the_same_name_keeps_the_first_runs_results(tmp_path: Path, tiny_root: Path) -> None:
    _trainer(tmp_path, rounds=2).fit(PromptFL(n_ctx=4, lr=0.01), _dm(tiny_root))
    run = tmp_path / "runs" / "t"
    before = _snapshot(run)
    with pytest.raises(
        FloraRunError, match="already holds a run.*--ckpt_path last.*--trainer.overwrite true"
    ):
        _trainer(tmp_path, rounds=1).fit(PromptFL(n_ctx=4, lr=0.01), _dm(tiny_root))
    assert _snapshot(run) == before
    # explicitly replacing it is allowed
    summary = _trainer(tmp_path, rounds=1, overwrite=True).fit(PromptFL(n_ctx=4, lr=0.01), _dm(tiny_root))
    assert summary["final"]["round"] == 1 and len(_history(run)) == 1


def test_a_running_run_holds_its_folder(tmp_path: Path, tiny_root: Path) -> None:
    run = tmp_path / "runs" / "t"
    run.mkdir(parents=True)
    lock = RunLock(run)
    lock.acquire()  # another process writing this run
    try:
        with pytest.raises(FloraRunError, match=f"run folder {run} is in use by another flora process"):
            _trainer(tmp_path, rounds=1).fit(PromptFL(n_ctx=4, lr=0.01), _dm(tiny_root), ckpt_path="last")
    finally:
        lock.release()
    assert not (run / "metrics.jsonl").exists()
    _trainer(tmp_path, rounds=1).fit(PromptFL(n_ctx=4, lr=0.01), _dm(tiny_root))


def test_resume_without_a_checkpoint_starts_fresh_with_a_warning(
    tmp_path: Path, tiny_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ref = _trainer(tmp_path / "a", rounds=1).fit(PromptFL(n_ctx=4, lr=0.01), _dm(tiny_root))
    # a run killed before its first checkpoint: config and an empty metrics file, plus a temporary file
    run = tmp_path / "b" / "runs" / "t"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    (run / "checkpoints" / "last.tmp4242").write_bytes(b"half a checkpoint")
    capsys.readouterr()
    got = _trainer(tmp_path / "b", rounds=1).fit(PromptFL(n_ctx=4, lr=0.01), _dm(tiny_root), ckpt_path="last")
    assert "warning: no checkpoint at" in capsys.readouterr().err
    assert got["final"] == {**ref["final"], "wall_time_s": got["final"]["wall_time_s"]}
    assert not list(run.rglob("*.tmp4242"))
    # an explicit checkpoint path that does not exist is still an error
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        _trainer(tmp_path / "c").fit(PromptFL(n_ctx=4), _dm(tiny_root), ckpt_path=str(tmp_path / "nope.ckpt"))


def test_resume_past_the_end_says_so(
    tmp_path: Path, tiny_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _trainer(tmp_path, rounds=2).fit(PromptFL(n_ctx=4, lr=0.01), _dm(tiny_root))
    run = tmp_path / "runs" / "t"
    before = _snapshot(run)
    with pytest.raises(
        FloraConfigError, match="trainer.rounds is 1, but checkpoint .* already completed 2 rounds"
    ):
        _trainer(tmp_path, rounds=1).fit(PromptFL(n_ctx=4, lr=0.01), _dm(tiny_root), ckpt_path="last")
    assert _snapshot(run) == before
    capsys.readouterr()
    summary = _trainer(tmp_path, rounds=2, progress=True).fit(
        PromptFL(n_ctx=4, lr=0.01), _dm(tiny_root), ckpt_path="last"
    )
    assert "already completed its 2 rounds" in capsys.readouterr().out
    assert summary["final"] == json.loads(before["summary.json"])["final"]


def test_resume_with_another_seed_is_refused(tmp_path: Path, tiny_root: Path) -> None:
    _trainer(tmp_path, rounds=1).fit(PromptFL(n_ctx=4, lr=0.01), _dm(tiny_root))
    with pytest.raises(CheckpointError, match="trainer.seed 0, but this run has trainer.seed 1"):
        _trainer(tmp_path, rounds=2, seed=1).fit(PromptFL(n_ctx=4, lr=0.01), _dm(tiny_root), ckpt_path="last")


def test_learning_rate_override_on_resume_takes_effect(tmp_path: Path, tiny_root: Path) -> None:
    _trainer(tmp_path, rounds=1).fit(PromptFL(n_ctx=4, lr=0.01), _dm(tiny_root))
    _trainer(tmp_path, rounds=2).fit(PromptFL(n_ctx=4, lr=0.05), _dm(tiny_root), ckpt_path="last")
    ckpt = torch.load(tmp_path / "runs" / "t" / "checkpoints" / "last.ckpt", weights_only=True)
    lrs = {g["lr"] for c in ckpt["clients"].values() for g in c["optim"]["param_groups"]}
    assert lrs == {0.05}
    # momentum buffers survived the override (the client's optimiser state persists)
    assert all(c["optim"]["state"] for c in ckpt["clients"].values())


def test_rounds_zero_evaluates_the_initial_model(tmp_path: Path, tiny_root: Path) -> None:
    summary = _trainer(tmp_path, rounds=0).fit(PromptFL(n_ctx=4), _dm(tiny_root))
    assert summary["final"]["round"] == 0 and summary["rounds"] == 0
    assert 0.0 <= summary["final"]["local_acc_mean"] <= 100.0


def test_csv_holds_every_round_after_a_resume(tmp_path: Path, tiny_root: Path) -> None:
    _trainer(tmp_path, rounds=2).fit(PromptFL(n_ctx=4, lr=0.01), _dm(tiny_root))
    _trainer(tmp_path, rounds=3).fit(PromptFL(n_ctx=4, lr=0.01), _dm(tiny_root), ckpt_path="last")
    run = tmp_path / "runs" / "t"
    with open(run / "csv" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert [float(r["local_acc_mean"]) for r in rows] == [r["local_acc_mean"] for r in _history(run)]


# ------------------------------------------------------------------ what a round records and refuses
def test_bytes_are_recorded_per_client(tmp_path: Path, tiny_root: Path) -> None:
    module = PromptFL(n_ctx=4)
    _trainer(tmp_path, rounds=1, clients_per_round=3).fit(module, _dm(tiny_root))
    (record,) = _history(tmp_path / "runs" / "t")
    (prompt,) = module.global_state().values()
    prompt_bytes = prompt.numel() * 4  # n_ctx x width, fp32
    assert prompt.shape[0] == 4
    assert len(record["bytes_up_clients"]) == len(record["clients"]) == 3
    assert record["bytes_up_clients"] == [prompt_bytes] * 3 == record["bytes_down_clients"]
    assert sum(record["bytes_up_clients"]) == record["bytes_up"]


def test_evaluation_fine_tuning_is_not_capped_by_max_steps_per_round(
    tmp_path: Path, tiny_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps_seen: list[tuple[str, int]] = []
    original = ClientRunner.local_training

    def recording(self, client_id, epochs, seed, previous, label, max_steps=None):  # type: ignore[no-untyped-def]
        out = original(self, client_id, epochs, seed, previous, label, max_steps)
        steps_seen.append((label, out.steps))
        return out

    monkeypatch.setattr(ClientRunner, "local_training", recording)
    trainer = FederatedTrainer(
        rounds=1, max_steps_per_round=1, output_dir=str(tmp_path / "runs"), name="t", progress=False
    )
    trainer.fit(PromptFLFT(n_ctx=4, ft_epochs=1), _dm(tiny_root))
    train = [s for label, s in steps_seen if label.startswith("round")]
    tune = [s for label, s in steps_seen if label == "evaluation fine-tuning"]
    assert train and all(s == 1 for s in train)
    assert tune and max(tune) > 1  # a full epoch: each client has more than one batch


class _PoisoningTrainer(FederatedTrainer):
    def _train_client(self, client_id, round_idx):  # type: ignore[no-untyped-def]
        result = super()._train_client(client_id, round_idx)
        if round_idx == 1 and client_id == 2:
            key = next(iter(result.upload))
            result.upload[key] = torch.full_like(result.upload[key], float("nan"))
        return result


def test_non_finite_upload_is_refused_and_the_last_checkpoint_kept(tmp_path: Path, tiny_root: Path) -> None:
    trainer = _PoisoningTrainer(rounds=3, output_dir=str(tmp_path / "runs"), name="t", progress=False)
    with pytest.raises(FloraRunError, match=r"round 2: client 2 produced non-finite values in its upload"):
        trainer.fit(PromptFL(n_ctx=4, lr=0.01), _dm(tiny_root))
    run = tmp_path / "runs" / "t"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["completed_rounds"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["global_state"].values())
    assert [r["round"] for r in _history(run)] == [1]
