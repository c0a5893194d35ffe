"""`flora fit` across two "machines": torchrun with two nodes of one process each, on loopback.

Each node is its own ``torchrun --nnodes 2 --nproc-per-node 1 --node-rank K`` process, as a
user starts one per machine (or SLURM starts one per node); they meet at
``--master-addr 127.0.0.1``. The run must give the same metrics as one process.
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


def test_two_nodes_under_torchrun_match_one_process(tmp_path: Path, tiny_root: Path) -> None:
    from flora.cli import main

    one = tiny_config(tmp_path / "one", tiny_root, name="one")
    assert main(["fit", "--config", str(one)]) == 0

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
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=TIMEOUT_S))
    except subprocess.TimeoutExpired:
        for node in nodes:
            os.killpg(node.pid, signal.SIGKILL)
        pytest.fail(f"torchrun with two nodes hung for {TIMEOUT_S} s")
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, f"node exited {node.returncode}\nstdout:\n{out}\nstderr:\n{err[-3000:]}"
    # rank 0 (node 0) wrote the run; both nodes trained their share of the clients
    assert "devices=2" in outputs[0][0]
    a, b = _final(tmp_path / "one" / "runs" / "one"), _final(tmp_path / "two" / "runs" / "two")
    for key in METRICS:
        if key in a:
            assert b[key] == pytest.approx(a[key], abs=1e-4), key
