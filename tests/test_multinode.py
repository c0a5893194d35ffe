"""`flora fit` across two "machines" (torchrun, on loopback) and under SLURM (a stand-in srun).

Each torchrun node is its own ``torchrun --nnodes 2 --nproc-per-node 1 --node-rank K``
process, as a user starts one per machine; they meet at ``--master-addr 127.0.0.1``. The
SLURM example ``configs/slurm/fit.sbatch`` runs as it is, with ``srun`` replaced by a script
that starts its tasks with the variables srun sets. Each run must give the same metrics as
one process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import tiny_config

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
TIMEOUT_S = 240
METRICS = ("local_acc_mean", "local_acc_std", "local_acc_pooled", "global_acc", "train_loss")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _final(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())["final"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory, tiny_root: Path) -> dict:
    """The final metrics of the tiny config run in this process (the reference)."""
    from flora.cli import main

    tmp = tmp_path_factory.mktemp("one")
    assert main(["fit", "--config", str(tiny_config(tmp, tiny_root, name="one"))]) == 0
    return _final(tmp / "runs" / "one")


def _assert_same(final: dict, reference: dict) -> None:
    for key in METRICS:
        if key in reference:
            assert final[key] == pytest.approx(reference[key], abs=1e-4), key


def _wait(procs: list[subprocess.Popen], what: str) -> list[tuple[str, str]]:
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S))
    except subprocess.TimeoutExpired:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"{what} hung for {TIMEOUT_S} s")
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, (
            f"{what} exited {proc.returncode}\nstdout:\n{out}\nstderr:\n{err[-3000:]}"
        )
    return outputs


def test_two_nodes_under_torchrun_match_one_process(
    tmp_path: Path, tiny_root: Path, one_process: dict
) -> None:
    two = tiny_config(
        tmp_path / "two", tiny_root, name="two", num_nodes=2, devices=1, accelerator="cpu", progress=True
    )
    port = _free_port()
    nodes = []
    for rank in (0, 1):
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}",
            "--master-addr=127.0.0.1", f"--master-port={port}",
            "-m", "flora", "fit", "--config", str(two),
        ]  # fmt: skip
        nodes.append(
            subprocess.Popen(
                cmd,
                env=ENV,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        )
    outputs = _wait(nodes, "torchrun with two nodes")
    # rank 0 (node 0) wrote the run; both nodes trained their share of the clients
    assert "devices=2" in outputs[0][0]
    _assert_same(_final(tmp_path / "two" / "runs" / "two"), one_process)


SRUN = """#!/bin/bash
# stands in for srun on one machine: SLURM_NTASKS copies of the command, with the variables srun sets
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 "$@" &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
exit $rc
"""


def test_sbatch_example_runs_its_tasks_as_ranks_and_matches_one_process(
    tmp_path: Path, tiny_root: Path, one_process: dict
) -> None:
    sbatch = Path(__file__).parents[1] / "configs" / "slurm" / "fit.sbatch"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(SRUN)
    (bin_dir / "srun").chmod(0o755)
    cfg = tiny_config(tmp_path, tiny_root, name="slurm", accelerator="cpu", progress=True)
    env = {
        k: v for k, v in ENV.items() if not k.startswith(("SLURM_", "MASTER_", "WORLD_SIZE", "LOCAL_RANK"))
    }
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        FLORA=f"{sys.executable} -m flora",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="flora",
        SLURM_NNODES="1",
        SLURM_NTASKS="2",
        SLURM_NTASKS_PER_NODE="2",
        SLURM_NODELIST="localhost",
        MASTER_PORT=str(_free_port()),
    )
    job = subprocess.Popen(
        ["bash", str(sbatch), "--config", str(cfg)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    ((out, err),) = _wait([job], "the sbatch example")
    assert "devices=2" in out  # --trainer.devices came from the allocation: two ranks, one per task
    assert "Starting with 2 processes" in err, err  # the two srun tasks met as ranks 0 and 1
    _assert_same(_final(tmp_path / "runs" / "slurm"), one_process)
