"""Deterministic partitioners: how a source dataset is split over clients.

A partition is a pure function of (labels, parameters, seed). Class order is always
label order. Each partitioner assigns training indices; the test split follows the
training mix (``test: matched``) or is given whole to every client (``test: all``).

Every option is range-checked when the partitioner is built: a bad value raises
:class:`flora.errors.FloraConfigError` with one line that names the option as a config
writes it (``data.partition.alpha must be > 0, got 0``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from flora.errors import FloraDataError, check_choice, check_range


@dataclass
class Partition:
    """Per-client sample indices into the source's train and test splits (sorted, int64)."""

    train: list[np.ndarray]
    test: list[np.ndarray]
    num_classes: int
    #: label -> sorted ids of the clients that hold it, where classes are shared between
    #: clients (a pathological partition with ``num_clients x classes_per_client > num_classes``);
    #: None otherwise.
    class_holders: dict[int, list[int]] | None = None

    @property
    def num_clients(self) -> int:
        return len(self.train)

    def counts(self, split: str, labels: np.ndarray) -> np.ndarray:
        """``(num_clients, num_classes)`` sample counts of ``split`` given that split's labels."""
        parts = self.train if split == "train" else self.test
        out = np.zeros((len(parts), self.num_classes), dtype=np.int64)
        for i, idx in enumerate(parts):
            out[i] = np.bincount(labels[idx], minlength=self.num_classes)
        return out


def base_novel_split(num_classes: int) -> tuple[list[int], list[int]]:
    """Base classes are the first ``ceil(C / 2)`` labels, novel classes the rest."""
    n_base = math.ceil(num_classes / 2)
    return list(range(n_base)), list(range(n_base, num_classes))


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer shares of ``total`` proportional to ``weights`` (deterministic ties: lower index first)."""
    if weights.sum() <= 0:
        return np.zeros(len(weights), dtype=np.int64)
    exact = total * weights / weights.sum()
    base = np.floor(exact).astype(np.int64)
    rest = total - int(base.sum())
    order = np.lexsort((np.arange(len(weights)), -(exact - base)))
    base[order[:rest]] += 1
    return base


class Partitioner:
    """Base class. Subclasses implement :meth:`assign_train`.

    Args:
        num_clients: number of clients.
        seed: seed of every random choice.
        test: ``matched`` (each class's test samples split in proportion to the clients'
            train counts of that class) or ``all`` (every client gets the whole test split).
    """

    def __init__(self, num_clients: int = 10, seed: int = 0, test: str = "matched") -> None:
        check_range("data.partition.num_clients", num_clients, low=1)
        check_range("data.partition.seed", seed, low=0)
        check_choice("data.partition.test", test, ("matched", "all"))
        self.num_clients = num_clients
        self.seed = seed
        self.test = test
        # set by assign_train where classes are shared (private: not part of describe())
        self._class_holders: dict[int, list[int]] | None = None

    def describe(self) -> dict[str, Any]:
        d = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        return {"class": type(self).__name__, **d}

    def assign_train(
        self, labels: np.ndarray, num_classes: int, domains: np.ndarray | None, rng: np.random.Generator
    ) -> list[np.ndarray]:
        raise NotImplementedError

    def partition(
        self,
        train_labels: np.ndarray,
        test_labels: np.ndarray,
        num_classes: int,
        train_domains: np.ndarray | None = None,
        test_domains: np.ndarray | None = None,
    ) -> Partition:
        train_labels = np.asarray(train_labels, dtype=np.int64)
        test_labels = np.asarray(test_labels, dtype=np.int64)
        rng = np.random.default_rng(self.seed)
        self._class_holders = None
        train = [
            np.sort(np.asarray(t, dtype=np.int64))
            for t in self.assign_train(train_labels, num_classes, train_domains, rng)
        ]
        part = Partition(train=train, test=[], num_classes=num_classes, class_holders=self._class_holders)
        if self.test == "all":
            part.test = [np.arange(len(test_labels), dtype=np.int64) for _ in train]
        else:
            part.test = self._matched_test(part, train_labels, test_labels, train_domains, test_domains, rng)
        return part

    def _matched_test(
        self,
        part: Partition,
        train_labels: np.ndarray,
        test_labels: np.ndarray,
        train_domains: np.ndarray | None,
        test_domains: np.ndarray | None,
        rng: np.random.Generator,
    ) -> list[np.ndarray]:
        n = part.num_clients
        out: list[list[np.ndarray]] = [[] for _ in range(n)]
        by_domain = train_domains is not None and test_domains is not None and isinstance(self, Domains)
        groups = np.unique(test_domains) if by_domain else [None]
        for g in groups:
            for k in range(part.num_classes):
                if g is None:
                    test_idx = np.flatnonzero(test_labels == k)
                    weights = np.array(
                        [(train_labels[idx] == k).sum() for idx in part.train], dtype=np.float64
                    )
                else:
                    test_idx = np.flatnonzero((test_labels == k) & (test_domains == g))
                    weights = np.array(
                        [((train_labels[idx] == k) & (train_domains[idx] == g)).sum() for idx in part.train],
                        dtype=np.float64,
                    )
                if len(test_idx) == 0 or weights.sum() == 0:
                    continue
                test_idx = rng.permutation(test_idx)
                shares = _largest_remainder(len(test_idx), weights)
                bounds = np.concatenate([[0], np.cumsum(shares)])
                for c in range(n):
                    if shares[c]:
                        out[c].append(test_idx[bounds[c] : bounds[c + 1]])
        return [np.sort(np.concatenate(o)) if o else np.zeros(0, dtype=np.int64) for o in out]


class IID(Partitioner):
    """Shuffle each class and deal it evenly (round robin) to all clients."""

    def assign_train(self, labels, num_classes, domains, rng):  # type: ignore[no-untyped-def]
        out: list[list[int]] = [[] for _ in range(self.num_clients)]
        start = 0
        for k in range(num_classes):
            idx = rng.permutation(np.flatnonzero(labels == k))
            for j, i in enumerate(idx):
                out[(start + j) % self.num_clients].append(int(i))
            start = (start + len(idx)) % self.num_clients
        return [np.array(o, dtype=np.int64) for o in out]


class Dirichlet(Partitioner):
    """Label skew: each class is split over clients by ``p ~ Dir(alpha)``.

    A client that already holds ``>= n / N`` samples gets no more (its share is zeroed
    and the rest renormalised). The whole draw is repeated, with fresh randomness from
    the one generator, until every client has ``min_size`` samples, at most
    ``max_retries`` times; then a :class:`FloraDataError` says what to change.
    """

    def __init__(
        self,
        num_clients: int = 10,
        alpha: float = 0.3,
        min_size: int = 10,
        max_retries: int = 100,
        seed: int = 0,
        test: str = "matched",
    ) -> None:
        super().__init__(num_clients, seed, test)
        check_range("data.partition.alpha", alpha, low=0, low_open=True)
        check_range("data.partition.min_size", min_size, low=0)
        check_range("data.partition.max_retries", max_retries, low=1)
        self.alpha = alpha
        self.min_size = min_size
        self.max_retries = max_retries

    def _fail(self, n: int, best: int) -> FloraDataError:
        return FloraDataError(
            f"Dirichlet(alpha={self.alpha}) cannot give each of {self.num_clients} clients min_size="
            f"{self.min_size} samples out of {n} (smallest client reached {best} after {self.max_retries} draws); "
            "use a larger alpha, a smaller min_size or fewer clients"
        )

    def assign_train(self, labels, num_classes, domains, rng):  # type: ignore[no-untyped-def]
        n, n_clients = len(labels), self.num_clients
        if self.min_size * n_clients > n:
            raise self._fail(n, 0)
        best = -1
        for _ in range(self.max_retries):
            parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
            sizes = np.zeros(n_clients, dtype=np.int64)
            for k in range(num_classes):
                idx = rng.permutation(np.flatnonzero(labels == k))
                p = rng.dirichlet(np.full(n_clients, self.alpha))
                p = np.where(sizes < n / n_clients, p, 0.0)
                if p.sum() <= 0:
                    p = np.full(n_clients, 1.0 / n_clients)
                p = p / p.sum()
                cuts = (np.cumsum(p) * len(idx)).astype(np.int64)[:-1]
                for c, chunk in enumerate(np.split(idx, cuts)):
                    parts[c].append(chunk)
                    sizes[c] += len(chunk)
            smallest = int(sizes.min())
            best = max(best, smallest)
            if smallest >= self.min_size:
                return [np.concatenate(p) for p in parts]
        raise self._fail(n, best)


class Pathological(Partitioner):
    """Each client owns ``classes_per_client`` classes of a seeded class shuffle.

    * ``num_clients x classes_per_client <= num_classes``: disjoint contiguous blocks of
      the shuffled class list; the last client takes the remaining classes.
    * Otherwise classes are shared: client ``i`` owns the ``classes_per_client`` classes at
      positions ``i*s, i*s + 1, ...`` (mod ``num_classes``) of the shuffled list, so every
      class is held by ``floor`` or ``ceil`` of ``N x s / C`` clients, and each class's
      samples are split evenly at random among its holders (sizes differ by at most one).
      :attr:`Partition.class_holders` (and the manifest's ``class_holders``) lists them.

    With ``num_shots`` each client keeps only that many training images per owned class
    (few-shot; with shared classes, ``num_shots`` distinct images per holder).
    """

    def __init__(
        self,
        num_clients: int = 10,
        classes_per_client: int = 2,
        num_shots: int | None = None,
        seed: int = 0,
        test: str = "matched",
    ) -> None:
        super().__init__(num_clients, seed, test)
        check_range("data.partition.classes_per_client", classes_per_client, low=1)
        check_range("data.partition.num_shots", num_shots, low=1, allow_none=True)
        self.classes_per_client = classes_per_client
        self.num_shots = num_shots

    def assign_train(self, labels, num_classes, domains, rng):  # type: ignore[no-untyped-def]
        s = self.classes_per_client
        if s > num_classes:
            raise FloraDataError(
                f"Pathological: classes_per_client={s} exceeds the {num_classes} classes of the dataset; "
                f"use classes_per_client <= {num_classes}"
            )
        order = rng.permutation(num_classes)
        if self.num_clients * s > num_classes:
            return self._assign_shared(labels, num_classes, order, rng)
        out = []
        for c in range(self.num_clients):
            stop = (c + 1) * s if c < self.num_clients - 1 else num_classes
            owned = order[c * s : stop]
            chunks = []
            for k in sorted(owned.tolist()):
                idx = np.flatnonzero(labels == k)
                if self.num_shots is not None:
                    if len(idx) < self.num_shots:
                        raise FloraDataError(
                            f"class {k} has {len(idx)} training samples, fewer than num_shots={self.num_shots}"
                        )
                    idx = rng.choice(idx, size=self.num_shots, replace=False)
                chunks.append(idx)
            out.append(np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64))
        return out

    def _assign_shared(
        self, labels: np.ndarray, num_classes: int, order: np.ndarray, rng: np.random.Generator
    ) -> list[np.ndarray]:
        n, s = self.num_clients, self.classes_per_client
        holders: dict[int, list[int]] = {k: [] for k in range(num_classes)}
        for c in range(n):
            for j in range(s):
                holders[int(order[(c * s + j) % num_classes])].append(c)
        parts: list[list[np.ndarray]] = [[] for _ in range(n)]
        for k in range(num_classes):  # label order: the random draws never depend on the shuffle
            who = holders[k]
            if not who:
                continue
            idx = rng.permutation(np.flatnonzero(labels == k))
            need = len(who) * (self.num_shots or 1)
            if len(idx) < need:
                shown = ", ".join(str(c) for c in who[:8]) + (
                    f", ... {len(who) - 8} more" if len(who) > 8 else ""
                )
                what = (
                    f"{len(who)} clients x num_shots={self.num_shots}"
                    if self.num_shots
                    else f"{len(who)} clients"
                )
                raise FloraDataError(
                    f"Pathological: class {k} has {len(idx)} training samples but {len(who)} clients ({shown}) "
                    f"hold it, which needs at least {need} ({what}); use fewer clients"
                    f"{', fewer classes_per_client or fewer num_shots' if self.num_shots else ' or fewer classes_per_client'}"
                )
            if self.num_shots is not None:
                chunks = np.split(idx[:need], len(who))
            else:
                chunks = np.array_split(idx, len(who))
            for c, chunk in zip(who, chunks):
                parts[c].append(chunk)
        self._class_holders = holders
        return [np.concatenate(p) for p in parts]


class FewShot(Partitioner):
    """Every client gets ``num_shots`` random training images of every class, disjoint across clients."""

    def __init__(
        self, num_clients: int = 10, num_shots: int = 16, seed: int = 0, test: str = "matched"
    ) -> None:
        super().__init__(num_clients, seed, test)
        check_range("data.partition.num_shots", num_shots, low=1)
        self.num_shots = num_shots

    def assign_train(self, labels, num_classes, domains, rng):  # type: ignore[no-untyped-def]
        out: list[list[np.ndarray]] = [[] for _ in range(self.num_clients)]
        for k in range(num_classes):
            idx = rng.permutation(np.flatnonzero(labels == k))
            if len(idx) < self.num_shots * self.num_clients:
                raise FloraDataError(
                    f"FewShot: class {k} has {len(idx)} training samples, fewer than "
                    f"{self.num_clients} clients x {self.num_shots} shots"
                )
            for c in range(self.num_clients):
                out[c].append(idx[c * self.num_shots : (c + 1) * self.num_shots])
        return [np.concatenate(o) for o in out]


class Domains(Partitioner):
    """Feature shift: one client per domain, or ``clients_per_domain`` per domain.

    Within a domain, samples are split by Dirichlet(``alpha``) (feature + label shift)
    or IID when ``alpha`` is None. ``num_clients`` is derived from the data.
    """

    def __init__(
        self,
        clients_per_domain: int = 1,
        alpha: float | None = None,
        min_size: int = 1,
        seed: int = 0,
        test: str = "matched",
    ) -> None:
        super().__init__(1, seed, test)
        check_range("data.partition.clients_per_domain", clients_per_domain, low=1)
        check_range("data.partition.alpha", alpha, low=0, low_open=True, allow_none=True)
        check_range("data.partition.min_size", min_size, low=0)
        self.clients_per_domain = clients_per_domain
        self.alpha = alpha
        self.min_size = min_size

    def describe(self) -> dict[str, Any]:
        """Constructor arguments only: ``num_clients`` is derived from the data by :meth:`partition`,
        so it must not make a fresh ``Domains()`` differ from the one that wrote a manifest."""
        d = super().describe()
        d.pop("num_clients", None)
        return d

    def assign_train(self, labels, num_classes, domains, rng):  # type: ignore[no-untyped-def]
        if domains is None:
            raise FloraDataError("Domains partitioning needs a dataset with several domains (styles)")
        out: list[np.ndarray] = []
        for d in np.unique(domains):
            idx = np.flatnonzero(domains == d)
            sub_labels = labels[idx]
            if self.clients_per_domain == 1:
                out.append(idx)
                continue
            if self.alpha is None:
                inner: Partitioner = IID(self.clients_per_domain)
            else:
                inner = Dirichlet(self.clients_per_domain, self.alpha, self.min_size)
            for part in inner.assign_train(sub_labels, num_classes, None, rng):
                out.append(idx[part])
        self.num_clients = len(out)
        return out
