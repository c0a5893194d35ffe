"""Loaders for real image datasets stored on disk, one module per family:

* :mod:`~flora.data.real.cifar`: CIFAR-10/100 (`CIFAR`);
* :mod:`~flora.data.real.coop`: the CoOp few-shot benchmarks (`CoOpDataset`);
* :mod:`~flora.data.real.domainnet`: DomainNet (`DomainNet`);
* :mod:`~flora.data.real.office_caltech`: Office-Caltech-10 (`OfficeCaltech10`);
* :mod:`~flora.data.real.base`: what they share (`FileDataset`, file checks).

Every loader indexes its files lazily (on first use, so building one from a config never
touches the disk) and keeps only paths and labels in memory; `image()` opens one file.
Sample order never depends on directory listing order, and class names are in label order,
with "_" replaced by " ".  Problems with the files on disk raise `FloraDataError` with a
one-line message naming the path and how to fix it; bad constructor arguments raise
`flora.errors.FloraConfigError` naming the option (``data.dataset.<name>``).
"""

from __future__ import annotations

from flora.data.real.cifar import CIFAR
from flora.data.real.coop import COOP_PRESETS, CoOpDataset
from flora.data.real.domainnet import DOMAINNET_DOMAINS, DOMAINNET_FL_CLASSES, DomainNet
from flora.data.real.office_caltech import (
    IMAGE_SUFFIXES,
    OFFICE_CALTECH10_CLASSES,
    OFFICE_CALTECH10_DOMAINS,
    OfficeCaltech10,
)

__all__ = [
    "COOP_PRESETS",
    "DOMAINNET_DOMAINS",
    "DOMAINNET_FL_CLASSES",
    "IMAGE_SUFFIXES",
    "OFFICE_CALTECH10_CLASSES",
    "OFFICE_CALTECH10_DOMAINS",
    "CIFAR",
    "CoOpDataset",
    "DomainNet",
    "OfficeCaltech10",
]
