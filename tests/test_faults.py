"""Fault injection: SIGKILL ``flora fit`` at seeded random moments, resume it, and get the same run.

Every trial starts ``flora fit`` (through a small wrapper, see ``_WRAPPER``), kills it with
SIGKILL at one moment of a seeded schedule (Python start-up, mid-round, during evaluation,
while the checkpoint file is being written, just after it was replaced, or at a random
time), then resumes it with ``flora fit ... --ckpt_path last`` until it exits 0. A few
trials kill the first resume as well. The resumed run must equal an uninterrupted run of
the same config *bitwise*: every non-timing field of every ``metrics.jsonl`` record, the
``final``/``best`` of ``summary.json`` and every ``csv/metrics.csv`` row; and no temporary
``*.tmp<pid>`` file of a killed writer may survive the resume. Variants: client states in
memory, on disk, and on disk with 2 of 4 clients per round (a client's first state can then
be newer than the last checkpoint).

The wrapper only changes timing, never values: it makes the write of ``last.ckpt.tmp<pid>`` take
~0.5 s (serialise to bytes, then write them in chunks with sleeps) so kills can land inside
it, adds short sleeps before each client's training and each evaluation so kills can land
inside those too, and appends a trace of what the process was doing. The resumes run the
plain CLI. ``pytest -s`` prints one line per trial.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .conftest import tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# one intra-op thread: on a loaded machine torch's spinning thread pool stalls for seconds (the
# same setting for every run, so runs stay comparable bit for bit)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
FLORA = [sys.executable, "-m", "flora"]
ROUNDS = 4
WRITE_S = 0.5  # how long the wrapper's write of last.ckpt.tmp<pid> takes
TRAIN_SLEEP_S = 0.06  # wrapper sleep before each client's local training
EVAL_SLEEP_S = 0.1  # wrapper sleep before each evaluation
RUN_TIMEOUT_S = 300

# SIGKILL leaves these behind; the next fit of the run folder must remove them
_TMP = re.compile(r"\.tmp\d+$")

_WRAPPER = r'''
"""`flora` with slow checkpoint writes, sleeps before training/evaluation and a trace (timing only)."""
import io
import os
import sys
import time
from pathlib import Path

TRACE = os.environ["FLORA_FAULT_TRACE"]
WRITE_S = float(os.environ["FLORA_FAULT_WRITE_S"])
TRAIN_SLEEP_S = float(os.environ["FLORA_FAULT_TRAIN_SLEEP_S"])
EVAL_SLEEP_S = float(os.environ["FLORA_FAULT_EVAL_SLEEP_S"])


def trace(*parts):
    with open(TRACE, "a") as fh:
        fh.write(f"{time.time():.4f} " + " ".join(str(p) for p in parts) + "\n")


trace("start")
import torch  # noqa: E402

_save = torch.save


def slow_save(obj, f, *args, **kwargs):
    if not (isinstance(f, (str, os.PathLike)) and Path(f).name.startswith("last.ckpt.tmp")):
        return _save(obj, f, *args, **kwargs)
    buf = io.BytesIO()
    _save(obj, buf, *args, **kwargs)
    data = buf.getvalue()
    chunks = 10
    trace("write_begin", len(data))
    with open(f, "wb") as fh:
        for i in range(chunks):
            fh.write(data[i * len(data) // chunks : (i + 1) * len(data) // chunks])
            fh.flush()
            time.sleep(WRITE_S / chunks)
    trace("write_end")


torch.save = slow_save

import flora.cli  # noqa: E402
from flora.federated.trainer import FederatedTrainer  # noqa: E402
from flora.reporting import RunReporter  # noqa: E402

_setup, _train, _evaluate, _ckpt = (
    FederatedTrainer._setup,
    FederatedTrainer._train_client,
    FederatedTrainer._evaluate,
    FederatedTrainer._save_checkpoint,
)
_round_done, _finish = RunReporter.round_done, RunReporter.finish


def setup(self, *args, **kwargs):
    trace("setup")
    return _setup(self, *args, **kwargs)


def train_client(self, client_id, round_idx):
    trace("train_begin", round_idx + 1, client_id)
    time.sleep(TRAIN_SLEEP_S)
    out = _train(self, client_id, round_idx)
    trace("train_end", round_idx + 1, client_id)
    return out


def evaluate(self, *args):
    trace("eval_begin", self.completed_rounds + 1)
    time.sleep(EVAL_SLEEP_S)
    out = _evaluate(self, *args)
    trace("eval_end", self.completed_rounds + 1)
    return out


def save_checkpoint(self):
    trace("ckpt_begin", self.completed_rounds)
    _ckpt(self)
    trace("ckpt_end", self.completed_rounds)


def round_done(self, record):
    _round_done(self, record)
    trace("logged", record["round"])


def finish(self, *args, **kwargs):
    trace("finish")
    return _finish(self, *args, **kwargs)


FederatedTrainer._setup = setup
FederatedTrainer._train_client = train_client
FederatedTrainer._evaluate = evaluate
FederatedTrainer._save_checkpoint = save_checkpoint
RunReporter.round_done = round_done
RunReporter.finish = finish
sys.exit(flora.cli.main())
'''


# ---------------------------------------------------------------- helpers
def _wrapper_env(trace: Path) -> dict[str, str]:
    return {
        **ENV,
        "FLORA_FAULT_TRACE": str(trace),
        "FLORA_FAULT_WRITE_S": str(WRITE_S),
        "FLORA_FAULT_TRAIN_SLEEP_S": str(TRAIN_SLEEP_S),
        "FLORA_FAULT_EVAL_SLEEP_S": str(EVAL_SLEEP_S),
    }


def _fit_args(cfg: Path, out: Path, resume: bool) -> list[str]:
    args = ["fit", "--config", str(cfg), "--trainer.output_dir", str(out)]
    return [*args, "--ckpt_path", "last"] if resume else args


def _events(trace: Path) -> list[tuple[float, str]]:
    """(time, "event args") per complete trace line."""
    if not trace.exists():
        return []
    out = []
    for line in trace.read_text().splitlines():
        stamp, _, event = line.partition(" ")
        try:
            out.append((float(stamp), event))
        except ValueError:  # a line cut by the kill
            continue
    return out


def _matches(event: str, wanted: str) -> bool:
    return event.startswith(wanted[:-1]) if wanted.endswith("*") else event == wanted


def _is_timing(key: str) -> bool:
    return key.startswith(("time_", "peak_")) or key == "wall_time_s"  # measured, not computed


def _untimed(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if not _is_timing(k)}


def _differences(got: Any, want: Any, where: str) -> list[str]:
    """Bitwise comparison: same types, floats with ==, lists element-wise, dicts key by key."""
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            return [f"{where}: keys {sorted(got) if isinstance(got, dict) else got!r} != {sorted(want)}"]
        return [d for k in want for d in _differences(got[k], want[k], f"{where}.{k}")]
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return [f"{where}: {got!r} != {want!r}"]
        return [d for i, (g, w) in enumerate(zip(got, want)) for d in _differences(g, w, f"{where}[{i}]")]
    if type(got) is not type(want) or got != want:
        return [f"{where}: {got!r} != {want!r}"]
    return []


@dataclass
class Kill:
    """One planned kill: wait for ``event`` (if any) and ``tmp_file``, then sleep ``delay`` seconds."""

    label: str
    event: str | None
    delay: float
    tmp_file: bool = False


@dataclass
class Trial:
    index: int
    variant: str
    kills: list[Kill]  # the first run's kill, then one per killed resume
    landed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    resumes: list[int] = field(default_factory=list)  # exit codes of the unkilled resumes


@dataclass
class Reference:
    run: Path
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    offsets: dict[str, float]  # event -> seconds after the wrapper was started
    total_s: float


def _wait_and_kill(proc: subprocess.Popen, kill: Kill, trace: Path, run: Path, t_start: float) -> str | None:
    """Kill ``proc`` as ``kill`` says; return None if it exited first."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    ckpt_dir = run / "checkpoints"
    while kill.event is not None or kill.tmp_file:
        if proc.poll() is not None:
            return None
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"{kill.label}: never saw {kill.event!r} within {RUN_TIMEOUT_S} s")
        seen = kill.event is None or any(_matches(e, kill.event) for _, e in _events(trace))
        if seen and (not kill.tmp_file or any(ckpt_dir.glob("last.ckpt.tmp*"))):
            break
        time.sleep(0.005)
    time.sleep(kill.delay)
    if proc.poll() is not None:
        return None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at = time.monotonic() - t_start
    # this process's own temporary checkpoint (a resume starts next to the one of the run it resumes)
    if (ckpt_dir / f"last.ckpt.tmp{proc.pid}").exists():
        where = "mid-write"
    else:
        where = "between-ckpts" if (ckpt_dir / "last.ckpt").is_file() else "no-ckpt"
    events = _events(trace)
    phase = events[-1][1] if events else "-"
    return f"{where} ({at:.2f} s, last event: {phase})"


def _run_killed(cfg: Path, out: Path, kill: Kill, wrapper: Path, trace: Path, resume: bool) -> str | None:
    trace.unlink(missing_ok=True)
    run = out / "t"
    cmd = [sys.executable, str(wrapper), *_fit_args(cfg, out, resume)]
    t_start = time.monotonic()
    proc = subprocess.Popen(
        cmd, env=_wrapper_env(trace), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        return _wait_and_kill(proc, kill, trace, run, t_start)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _check_run(run: Path, ref: Reference) -> list[str]:
    problems: list[str] = []
    history = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    if [r["round"] for r in history] != [r["round"] for r in ref.metrics]:
        return [
            f"metrics.jsonl rounds {[r['round'] for r in history]} != {[r['round'] for r in ref.metrics]}"
        ]
    for got, want in zip(history, ref.metrics):
        problems += _differences(_untimed(got), _untimed(want), f"metrics.jsonl round {want['round']}")
    summary = json.loads((run / "summary.json").read_text())
    for part in ("final", "best"):
        problems += _differences(
            _untimed(summary.get(part, {})), _untimed(ref.summary[part]), f"summary.json {part}"
        )
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*") if _TMP.search(p.name))
    if left:
        problems.append(f"temporary files left in the run folder: {left}")
    with open(run / "csv" / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if len(rows) != len(history):
        problems.append(f"csv/metrics.csv has {len(rows)} rows for {len(history)} history records")
    else:
        for row, record in zip(rows, history):
            if int(row["step"]) != record["round"]:
                problems.append(f"csv/metrics.csv step {row['step']} != round {record['round']}")
            for key, value in row.items():
                if key == "step" or _is_timing(key) or value == "":
                    continue
                want = record.get(key)
                if not isinstance(want, int | float) or float(value) != want:
                    problems.append(f"csv/metrics.csv round {record['round']} {key}: {value} != {want!r}")
    return problems


def _reference(tmp_path: Path, cfg: Path, wrapper: Path) -> Reference:
    """An uninterrupted run through the wrapper; also gives the timeline the kills are drawn from."""
    out, trace = tmp_path / "reference", tmp_path / "reference.trace"
    t_start = time.time()
    proc = subprocess.run(
        [sys.executable, str(wrapper), *_fit_args(cfg, out, resume=False)],
        env=_wrapper_env(trace),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    total = time.time() - t_start
    assert proc.returncode == 0, proc.stderr
    run = out / "t"
    offsets: dict[str, float] = {}
    for stamp, event in _events(trace):
        offsets.setdefault(event, stamp - t_start)
    return Reference(
        run=run,
        metrics=[json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()],
        summary=json.loads((run / "summary.json").read_text()),
        offsets=offsets,
        total_s=total,
    )


def _draw_kill(rng: random.Random, kind: str, ref: Reference) -> Kill:
    """One kill moment of the given kind (``kind@round`` fixes the round), its parameters drawn from ``rng``."""
    r = rng.randint(1, ROUNDS)
    if "@" in kind:
        kind, r = kind.split("@")[0], int(kind.split("@")[1])
    if kind == "startup":  # Python/torch/lightning imports, config parsing, data and model setup
        delay = rng.uniform(0.2, ref.offsets["setup"])
        return Kill(f"startup +{delay:.2f}s", None, delay)
    if kind == "first-round":  # before the first checkpoint: training or evaluating round 1
        c = rng.choice(ref.metrics[0]["clients"])
        event = rng.choice([f"train_begin 1 {c}", "eval_begin 1"])
        delay = rng.uniform(0, TRAIN_SLEEP_S if event.startswith("train") else EVAL_SLEEP_S)
        return Kill(f"round 1 {event.split()[0]} +{delay:.2f}s", event, delay)
    if kind == "train":  # mid-round, in some client's local training
        c = rng.choice(ref.metrics[r - 1]["clients"])
        delay = rng.uniform(0, TRAIN_SLEEP_S + 0.02)
        return Kill(f"round {r} client {c} training +{delay:.2f}s", f"train_begin {r} {c}", delay)
    if kind == "eval":
        delay = rng.uniform(0, EVAL_SLEEP_S + 0.02)
        return Kill(f"round {r} evaluation +{delay:.2f}s", f"eval_begin {r}", delay)
    if kind == "write":  # the checkpoint file of round r is being written
        delay = rng.uniform(0, 0.8 * WRITE_S)
        return Kill(f"round {r} checkpoint write +{delay:.2f}s", f"ckpt_begin {r}", delay, tmp_file=True)
    if kind == "after-write":  # checkpoint replaced, round not yet logged
        return Kill(f"round {r} right after the checkpoint", f"ckpt_end {r}", 0.0)
    if kind == "random":  # anywhere in the run
        delay = rng.uniform(0.2, 0.85 * ref.total_s)
        return Kill(f"random +{delay:.2f}s", None, delay)
    # kills of a resumed run (which skips the rounds its checkpoint holds)
    if kind == "next-train":
        delay = rng.uniform(0, TRAIN_SLEEP_S)
        return Kill(f"resume: first training +{delay:.2f}s", "train_begin *", delay)
    if kind == "next-write":
        delay = rng.uniform(0, 0.8 * WRITE_S)
        return Kill(f"resume: first checkpoint write +{delay:.2f}s", "ckpt_begin *", delay, tmp_file=True)
    raise ValueError(kind)


# per variant: trainer options, the kinds of the first run's kill (one trial each, shuffled by
# the seeded RNG), how many trials kill their first resume as well, and the least number of
# kills that must land mid-write / before the first checkpoint
VARIANTS: dict[str, dict[str, Any]] = {
    "memory": dict(
        trainer=dict(state_store="memory"),
        plan=["startup"] * 2
        + ["first-round"] * 2
        + ["train"] * 2
        + ["eval"] * 2
        + ["write"] * 4
        + ["after-write"]
        + ["random"] * 2,
        resume_kills=3,
        least=dict(mid_write=3, no_ckpt=3),
        seed=20240611,
    ),
    # client states on disk are part of the resume state
    "disk": dict(
        trainer=dict(state_store="disk"),
        plan=["startup", "first-round", "first-round", "train", "write@1", "write", "random"],
        resume_kills=1,
        least=dict(mid_write=2, no_ckpt=3),
        seed=20240612,
    ),
    # 2 of 4 clients per round (rounds [2, 3], [2, 3], [1, 2], [2, 3]): client 1 first trains in
    # round 3, so a kill after round 3 stored its state but before checkpoint 3 replaced
    # checkpoint 2 leaves on disk a state that checkpoint 2 does not know about
    "disk-partial": dict(
        trainer=dict(state_store="disk", clients_per_round=2),
        plan=["startup", "train", "eval@3", "write@3", "write"],
        resume_kills=0,
        least=dict(mid_write=1, no_ckpt=1),
        seed=20240613,
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path: Path, tiny_root: Path, variant: str) -> None:
    t_test = time.monotonic()
    spec = VARIANTS[variant]
    cfg = tiny_config(tmp_path, tiny_root, method="flora.methods.PromptFL", rounds=ROUNDS, **spec["trainer"])
    wrapper = tmp_path / "flora_fault_wrapper.py"
    wrapper.write_text(_WRAPPER)
    ref = _reference(tmp_path, cfg, wrapper)
    assert len(ref.metrics) == ROUNDS
    print(
        f"\n[{variant}] reference run: {ref.total_s:.1f} s (setup at {ref.offsets['setup']:.1f} s, "
        f"first checkpoint at {ref.offsets['ckpt_begin 1']:.1f} s)"
    )

    rng = random.Random(spec["seed"])
    kinds = list(spec["plan"])
    rng.shuffle(kinds)
    killed_resumes = set(rng.sample(range(len(kinds)), spec["resume_kills"]))
    resume_kinds = ["startup", "next-train", "next-write"]
    trials = []
    for i, kind in enumerate(kinds):
        kills = [_draw_kill(rng, kind, ref)]
        if i in killed_resumes:
            kills.append(_draw_kill(rng, rng.choice(resume_kinds), ref))
        trials.append(Trial(i, variant, kills))

    for trial in trials:
        out = tmp_path / f"trial{trial.index:02d}"
        trace = tmp_path / f"trial{trial.index:02d}.trace"
        t0 = time.monotonic()
        for n, kill in enumerate(trial.kills):
            landed = _run_killed(cfg, out, kill, wrapper, trace, resume=n > 0)
            trial.landed.append(landed or "exited before the kill")
        for _attempt in range(3):
            proc = subprocess.run(
                [*FLORA, *_fit_args(cfg, out, resume=True)],
                env=ENV,
                capture_output=True,
                text=True,
                timeout=RUN_TIMEOUT_S,
            )
            trial.resumes.append(proc.returncode)
            if proc.returncode == 0:
                break
            tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
            trial.problems.append(f"resume exited {proc.returncode}: {tail}")
        if trial.resumes[-1] == 0:
            found = _check_run(out / "t", ref)
            trial.problems += found[:8] + (
                [f"... and {len(found) - 8} more differences"] if len(found) > 8 else []
            )
        kills = "; then ".join(f"{k.label} -> {w}" for k, w in zip(trial.kills, trial.landed))
        verdict = "ok" if not trial.problems else f"FAILED: {trial.problems[0]}"
        print(
            f"[{variant}] trial {trial.index:2d} ({time.monotonic() - t0:4.1f} s): {kills}; "
            f"resume exit codes {trial.resumes}: {verdict}"
        )

    landed = Counter(w.split(" ")[0] for t in trials for w in t.landed)
    print(f"[{variant}] kills landed: {dict(landed)}; {time.monotonic() - t_test:.0f} s in all")
    failures = [f"trial {t.index} ({t.kills[0].label}): {p}" for t in trials for p in t.problems]
    assert not failures, "\n".join(failures)
    missed = [t.index for t in trials if t.landed[0].startswith("exited")]
    assert not missed, f"trials {missed}: the run finished before its kill"
    assert landed["mid-write"] >= spec["least"]["mid_write"], landed
    assert landed["no-ckpt"] >= spec["least"]["no_ckpt"], landed
