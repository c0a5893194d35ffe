"""wandb sweeps: every file in configs/sweeps/ gives command lines `flora fit` runs, each run in its own folder.

A sweep needs the wandb server, so these tests do what an agent does without it: they sample
parameters from each sweep file, build the command line with wandb's own sweep-command
helpers (as ``wandb agent`` does), set the variables an agent sets (``WANDB_SWEEP_ID``,
``WANDB_RUN_ID``) and run it offline; the offline run file is read back.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from wandb.proto import wandb_internal_pb2
from wandb.sdk.launch.sweeps import utils as sweep_utils

from flora.cli import main

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
# where a test run writes, and how long it runs (appended after the agent's arguments)
SHORT = ["--trainer.rounds=1", "--trainer.eval_every=1", "--trainer.zero_shot_reference=false"]


def sample(spec: dict[str, Any], pick: int = 0) -> Any:
    """A value the sweep can draw for one parameter (the ``pick``-th listed value, or mid-range)."""
    if "values" in spec:
        return spec["values"][pick % len(spec["values"])]
    if "value" in spec:
        return spec["value"]
    low, high = spec["min"], spec["max"]
    if spec.get("distribution", "").startswith("log_uniform"):
        return math.sqrt(low * high)
    mid = (low + high) / 2
    return int(mid) if isinstance(low, int) and isinstance(high, int) else mid


def agent_command(sweep: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """The command line ``wandb agent`` runs for ``params`` (its substitution of ``${...}`` macros)."""
    values = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    values.update(env=["/usr/bin/env"], interpreter=["python"], program=[sweep["program"]])
    command: list[str] = []
    for chunk in sweep_utils.create_sweep_command(list(sweep["command"])):
        chunk = str(chunk)
        command += values.get(chunk[2:-1], []) if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    return command


def read_wandb_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """The records of an offline ``.wandb`` file (a header, then LevelDB-log framed protobuf records)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the rest of a block is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


@pytest.fixture
def agent_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    import wandb

    monkeypatch.chdir(ROOT)  # an agent runs from the repository root: the config paths are relative
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep7")
    monkeypatch.setenv("WANDB_RUN_ID", "run0042")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.teardown()  # wandb reads its settings once per process: start from these variables
    yield
    wandb.teardown()


def test_there_are_sweeps_and_each_names_flora_fit() -> None:
    assert {p.name for p in SWEEPS} >= {"flora.yaml", "promptfl_lr.yaml", "methods_seeds.yaml"}
    for path in SWEEPS:
        sweep = yaml.safe_load(path.read_text())
        assert sweep["program"] == "flora" and sweep["metric"]["name"].startswith("final/")
        command = agent_command(sweep, {k: sample(v) for k, v in sweep["parameters"].items()})
        assert command[:3] == ["/usr/bin/env", "flora", "fit"], path.name


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_listed_value_parses(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every combination of listed values (mid-range for distributions) is a valid `flora fit` command."""
    sweep = yaml.safe_load(path.read_text())
    names = list(sweep["parameters"])
    listed = [sweep["parameters"][n].get("values", [sample(sweep["parameters"][n])]) for n in names]
    for combo in itertools.product(*listed):
        command = agent_command(sweep, dict(zip(names, combo)))
        with pytest.raises(SystemExit) as stop:
            main([*command[2:], "--print_config"])
        assert stop.value.code == 0, command
        printed = yaml.safe_load(capsys.readouterr().out)
        for name, value in zip(names, combo):
            if name == "config":
                continue
            node = printed
            for key in name.split("."):
                node = node[key]
            assert node == value, (name, command)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_an_agent_run_trains_a_round_in_its_own_folder(
    path: Path, tmp_path: Path, agent_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = yaml.safe_load(path.read_text())
    params = {k: sample(v) for k, v in sweep["parameters"].items()}
    command = agent_command(sweep, params)
    out, data = tmp_path / "runs", tmp_path / "data"
    assert main([*command[2:], *SHORT, f"--trainer.output_dir={out}", f"--data.root={data}"]) == 0
    capsys.readouterr()
    (run_dir,) = out.iterdir()
    assert run_dir.name.endswith("-run0042")  # keyed by the wandb run id
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final"]["round"] == 1
    # a second agent run of the same sweep lands beside it, never in it
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_RUN_ID", "run0043")
        assert main([*command[2:], *SHORT, f"--trainer.output_dir={out}", f"--data.root={data}"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([run_dir.name, run_dir.name[:-4] + "0043"])


def test_offline_run_file_holds_config_metrics_and_summary(
    tmp_path: Path, agent_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = yaml.safe_load((ROOT / "configs" / "sweeps" / "flora.yaml").read_text())
    params = {"model.init_args.mu": 0.37, "model.init_args.tau": 0.5, "model.init_args.rank": 1}
    params["model.init_args.lr"] = 0.02
    command = agent_command(sweep, params)
    out = tmp_path / "runs"
    args = [*command[2:], "--trainer.rounds=2", "--trainer.eval_every=1", f"--trainer.output_dir={out}"]
    assert main([*args, f"--data.root={tmp_path / 'data'}"]) == 0
    capsys.readouterr()
    run_dir = out / "synthetic-flora-run0042"
    found = list(run_dir.glob("wandb/offline-run-*-run0042/run-run0042.wandb"))
    assert len(found) == 1, sorted(
        str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if "data" not in p.parts
    )
    run_file = found[0]
    records = read_wandb_records(run_file)
    config: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            history.append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            )
        elif kind == "summary":
            summary.update(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update}
            )
        elif kind == "run":
            assert r.run.run_group == "sweep7"  # the sweep id groups the runs
            # wandb folds a config update that comes before the run record is written into it
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
    # the resolved config, sampled values included
    init = config["model"]["init_args"]
    assert (init["mu"], init["rank"], init["lr"]) == (0.37, 1, 0.02)
    assert config["trainer"]["rounds"] == 2
    # one history record per round, stepped by the round (Lightning's step key), equal to metrics.jsonl
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = {h["trainer/global_step"]: h for h in history if "local_acc_mean" in h}
    assert sorted(logged) == [1, 2]
    for r in rounds:
        assert logged[r["round"]]["local_acc_mean"] == pytest.approx(r["local_acc_mean"])
    final = json.loads((run_dir / "summary.json").read_text())["final"]
    assert summary["final/hm"] == pytest.approx(final["hm"])
    assert "best/local_acc_mean" in summary
    assert summary.get("accuracy/_type") == "images/separated"  # the accuracy plot, logged as an image
