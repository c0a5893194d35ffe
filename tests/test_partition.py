"""Partitioners: every sample exactly once, determinism, min_size, ownership, matched test splits."""

from __future__ import annotations

import time

import numpy as np
import pytest

from flora.data import IID, Dirichlet, Domains, FewShot, FloraDataError, Pathological, base_novel_split

C = 20
TRAIN = np.repeat(np.arange(C), 50)  # 1000 samples, 50 per class
TEST = np.repeat(np.arange(C), 10)


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert len(allidx) == n and len(np.unique(allidx)) == n  # every sample exactly once


@pytest.mark.parametrize(
    "partitioner",
    [
        IID(num_clients=7, seed=1),
        Dirichlet(num_clients=10, alpha=0.3, min_size=10, seed=1),
        Pathological(10, 2, seed=1),
    ],
    ids=["iid", "dirichlet", "pathological"],
)
def test_every_train_sample_exactly_once_and_deterministic(partitioner) -> None:
    a = partitioner.partition(TRAIN, TEST, C)
    b = partitioner.partition(TRAIN, TEST, C)
    _assert_exact_cover(a.train, len(TRAIN))
    assert all(np.array_equal(x, y) for x, y in zip(a.train, b.train))
    assert all(np.array_equal(x, y) for x, y in zip(a.test, b.test))
    assert all(np.all(np.diff(x) > 0) for x in a.train)  # sorted, no duplicates
    # matched test split: a client's test classes are among its train classes, and every test sample is used once
    _assert_exact_cover(a.test, len(TEST))
    for tr, te in zip(a.train, a.test):
        assert set(TEST[te]) <= set(TRAIN[tr])


def test_different_seeds_differ() -> None:
    a = Dirichlet(10, 0.3, seed=0).partition(TRAIN, TEST, C)
    b = Dirichlet(10, 0.3, seed=1).partition(TRAIN, TEST, C)
    assert any(not np.array_equal(x, y) for x, y in zip(a.train, b.train))


def test_iid_is_balanced() -> None:
    sizes = [len(t) for t in IID(num_clients=8).partition(TRAIN, TEST, C).train]
    assert max(sizes) - min(sizes) <= 1
    counts = IID(num_clients=10).partition(TRAIN, TEST, C).counts("train", TRAIN)
    assert (counts == 5).all()


def test_dirichlet_respects_min_size_and_is_skewed() -> None:
    part = Dirichlet(num_clients=10, alpha=0.1, min_size=30, seed=3).partition(TRAIN, TEST, C)
    sizes = np.array([len(t) for t in part.train])
    assert sizes.min() >= 30
    counts = part.counts("train", TRAIN)
    # label skew: most clients hold most of their data in few classes
    top2 = np.sort(counts, axis=1)[:, -2:].sum(1) / counts.sum(1)
    assert np.median(top2) > 0.4


def test_dirichlet_impossible_settings_fail_fast() -> None:
    start = time.perf_counter()
    with pytest.raises(FloraDataError, match="min_size"):
        Dirichlet(num_clients=10, alpha=0.01, min_size=90, max_retries=50).partition(TRAIN, TEST, C)
    with pytest.raises(FloraDataError, match="min_size=200"):
        Dirichlet(num_clients=10, alpha=1.0, min_size=200).partition(TRAIN, TEST, C)  # 2000 > 1000 samples
    assert time.perf_counter() - start < 10


def test_pathological_ownership_and_shots() -> None:
    part = Pathological(num_clients=6, classes_per_client=3, seed=0).partition(TRAIN, TEST, C)
    owned = [set(TRAIN[t]) for t in part.train]
    assert all(len(o) == 3 for o in owned[:-1]) and len(owned[-1]) == C - 15  # last takes the rest
    assert set().union(*owned) == set(range(C)) and sum(len(o) for o in owned) == C  # disjoint
    shots = Pathological(num_clients=5, classes_per_client=4, num_shots=8, seed=0).partition(TRAIN, TEST, C)
    counts = shots.counts("train", TRAIN)
    assert set(counts[counts > 0].tolist()) == {8}
    with pytest.raises(FloraDataError, match="exceeds"):
        Pathological(num_clients=11, classes_per_client=2).partition(TRAIN, TEST, C)


def test_few_shot_is_disjoint() -> None:
    part = FewShot(num_clients=3, num_shots=4, seed=0).partition(TRAIN, TEST, C)
    assert (part.counts("train", TRAIN) == 4).all()
    assert len(np.unique(np.concatenate(part.train))) == 3 * 4 * C
    with pytest.raises(FloraDataError, match="shots"):
        FewShot(num_clients=10, num_shots=16).partition(TRAIN, TEST, C)


def test_domains_one_client_per_style_and_test_within_domain() -> None:
    dom_train = np.repeat(np.arange(4), 250)
    labels = np.tile(np.arange(C), 50)
    test_labels = np.tile(np.arange(C), 8)
    dom_test = np.repeat(np.arange(4), 40)
    part = Domains().partition(labels, test_labels, C, dom_train, dom_test)
    assert part.num_clients == 4
    for d, (tr, te) in enumerate(zip(part.train, part.test)):
        assert set(dom_train[tr]) == {d} and set(dom_test[te]) == {d}
    split = Domains(clients_per_domain=2, alpha=0.5, min_size=5).partition(
        labels, test_labels, C, dom_train, dom_test
    )
    assert split.num_clients == 8
    _assert_exact_cover(split.train, len(labels))


def test_test_all_gives_everyone_the_whole_test_split() -> None:
    part = IID(num_clients=3, test="all").partition(TRAIN, TEST, C)
    assert all(len(t) == len(TEST) for t in part.test)


def test_base_novel_split() -> None:
    assert base_novel_split(5) == ([0, 1, 2], [3, 4])
    assert base_novel_split(100) == (list(range(50)), list(range(50, 100)))


def test_domains_describe_does_not_change_when_partitioning() -> None:
    """A fresh Domains() must describe itself like the one that wrote a manifest."""
    dom = np.repeat(np.arange(3), 100)
    labels = np.tile(np.arange(C), 30)
    used = Domains(clients_per_domain=2)
    before = used.describe()
    part = used.partition(labels, labels[:30], C, dom, dom[::10])
    assert part.num_clients == 6
    assert used.describe() == before == Domains(clients_per_domain=2).describe()
