"""``flora bench accuracy | ablation | cmfl | speed | scaling``: docs/results.md, ablation.md, cmfl.md, performance.md, scaling.md.

Everything runs offline on the synthetic captioned-shapes world with the shipped tiny
CLIP. Each run is an ordinary :class:`~flora.federated.FederatedTrainer` fit; the
tables are whatever the runs give. ``flora bench probe`` lives in :mod:`flora.probe`.

* :mod:`flora.bench.common`: the settings, :class:`BenchConfig`, :func:`make_method`
  (every method under one budget), one fit, the report files;
* :mod:`flora.bench.accuracy`, :mod:`flora.bench.ablation`, :mod:`flora.bench.cmfl`,
  :mod:`flora.bench.speed`, :mod:`flora.bench.scaling`: one command each, with its markdown.
"""

from flora.bench.ablation import ABLATIONS, REFERENCE, run_ablation
from flora.bench.accuracy import run_accuracy
from flora.bench.cmfl import CMFL_CONFIG, CMFL_VARIANTS, run_cmfl
from flora.bench.common import (
    METHODS,
    PERSONALISED,
    SETTINGS,
    BenchConfig,
    machine,
    make_datamodule,
    make_method,
    weights_digest,
)
from flora.bench.scaling import run_scaling
from flora.bench.speed import run_speed

__all__ = [
    "ABLATIONS",
    "CMFL_CONFIG",
    "CMFL_VARIANTS",
    "METHODS",
    "PERSONALISED",
    "REFERENCE",
    "SETTINGS",
    "BenchConfig",
    "machine",
    "make_datamodule",
    "make_method",
    "run_ablation",
    "run_accuracy",
    "run_cmfl",
    "run_scaling",
    "run_speed",
    "weights_digest",
]
