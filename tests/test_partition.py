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
    # 11 x 2 > 20 classes: classes are shared (two clients hold one class) rather than refused
    shared = Pathological(num_clients=11, classes_per_client=2).partition(TRAIN, TEST, C)
    assert all(len(set(TRAIN[t])) == 2 for t in shared.train)
    assert sorted(len(h) for h in shared.class_holders.values()) == [1] * 18 + [2] * 2


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


# ---------------------------------------------------------------- pathological: old disjoint case

# Computed with the pre-sharing code (flora 3b7dcd1): owned classes per client and a sha256 prefix of
# every client's train then test index arrays. The disjoint case must never change.
OLD_DISJOINT = [
    (
        dict(num_clients=6, classes_per_client=3, seed=0),
        [[4, 6, 19], [2, 13, 16], [3, 10, 11], [0, 8, 12], [5, 7, 18], [1, 9, 14, 15, 17]],
        "b80dcae455caaf9e",
    ),
    (
        dict(num_clients=5, classes_per_client=4, num_shots=8, seed=0),
        [[2, 4, 6, 19], [3, 11, 13, 16], [0, 8, 10, 12], [5, 7, 17, 18], [1, 9, 14, 15]],
        "a8298aa226b66259",
    ),
    (
        dict(num_clients=10, classes_per_client=2, seed=1),
        [[1, 10], [16, 18], [7, 11], [12, 17], [2, 15], [3, 4], [5, 8], [0, 9], [13, 14], [6, 19]],
        "22b85ff84a3df8a4",
    ),
    (
        dict(num_clients=4, classes_per_client=5, seed=7, test="all"),
        [[3, 8, 12, 13, 14], [1, 6, 10, 15, 16], [0, 4, 5, 7, 18], [2, 9, 11, 17, 19]],
        "a32f35c7525794be",
    ),
]


def _digest(part) -> str:  # type: ignore[no-untyped-def]
    import hashlib

    h = hashlib.sha256()
    for a in part.train + part.test:
        h.update(np.asarray(a, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


@pytest.mark.parametrize("args, owned, digest", OLD_DISJOINT)
def test_pathological_disjoint_case_is_unchanged(args, owned, digest) -> None:  # type: ignore[no-untyped-def]
    part = Pathological(**args).partition(TRAIN, TEST, C)
    assert [sorted(set(TRAIN[t].tolist())) for t in part.train] == owned
    assert _digest(part) == digest
    assert part.class_holders is None  # nothing shared: the manifest gets no class_holders either


# ---------------------------------------------------------------- pathological: shared classes

C36 = 36
TRAIN36 = np.repeat(np.arange(C36), 30)
TEST36 = np.repeat(np.arange(C36), 6)


def test_pathological_shares_classes_when_clients_x_classes_exceed_the_classes() -> None:
    """50 clients x 4 classes over 36 classes (the common FL setting) used to raise 'exceeds'."""
    p = Pathological(num_clients=50, classes_per_client=4, seed=3)
    part = p.partition(TRAIN36, TEST36, C36)
    assert part.num_clients == 50
    owned = [np.unique(TRAIN36[t]) for t in part.train]
    assert all(len(o) == 4 for o in owned)  # exactly 4 distinct classes each
    holders = {k: [c for c in range(50) if k in set(owned[c].tolist())] for k in range(C36)}
    n_holders = np.array([len(holders[k]) for k in range(C36)])
    assert n_holders.sum() == 200 and n_holders.max() - n_holders.min() <= 1  # balanced, about N*s/C
    assert part.class_holders == holders
    _assert_exact_cover(part.train, len(TRAIN36))  # each class's samples partitioned among its holders
    counts = part.counts("train", TRAIN36)
    for k in range(C36):
        got = counts[holders[k], k]
        assert got.min() >= 1 and got.max() - got.min() <= 1  # split evenly
        assert (counts[:, k] > 0).sum() == len(holders[k])
    _assert_exact_cover(part.test, len(TEST36))
    for tr, te in zip(part.train, part.test):
        assert set(TEST36[te]) <= set(TRAIN36[tr])
    again = Pathological(num_clients=50, classes_per_client=4, seed=3).partition(TRAIN36, TEST36, C36)
    assert all(np.array_equal(x, y) for x, y in zip(part.train, again.train))
    assert all(np.array_equal(x, y) for x, y in zip(part.test, again.test))
    assert again.class_holders == part.class_holders
    other = Pathological(num_clients=50, classes_per_client=4, seed=4).partition(TRAIN36, TEST36, C36)
    assert other.class_holders != part.class_holders


def test_pathological_shared_few_shot_is_per_owned_class_per_client() -> None:
    part = Pathological(num_clients=50, classes_per_client=4, num_shots=2, seed=0).partition(
        TRAIN36, TEST36, C36
    )
    counts = part.counts("train", TRAIN36)
    assert ((counts > 0).sum(1) == 4).all() and set(counts[counts > 0].tolist()) == {2}
    allidx = np.concatenate(part.train)
    assert len(np.unique(allidx)) == len(allidx) == 50 * 4 * 2  # disjoint across clients
    with pytest.raises(FloraDataError, match=r"class \d+ has 30 training samples.*num_shots=6"):
        Pathological(num_clients=50, classes_per_client=4, num_shots=6).partition(TRAIN36, TEST36, C36)


def test_pathological_shared_class_with_too_few_samples_is_named() -> None:
    labels = np.concatenate([[0, 0], np.repeat(np.arange(1, 5), 20)])  # class 0: 2 samples
    with pytest.raises(
        FloraDataError, match=r"class 0 has 2 training samples but 4 clients \([0-9, ]+\) hold it"
    ):
        Pathological(num_clients=10, classes_per_client=2).partition(labels, labels, 5)
    with pytest.raises(FloraDataError, match="classes_per_client=6 exceeds the 5 classes"):
        Pathological(num_clients=3, classes_per_client=6).partition(labels, labels, 5)


# ---------------------------------------------------------------- range checks of the options


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Dirichlet(alpha=0), "data.partition.alpha must be > 0, got 0"),
        (lambda: Dirichlet(alpha=-1), "data.partition.alpha must be > 0, got -1"),
        (lambda: Dirichlet(alpha=float("nan")), "data.partition.alpha must be > 0, got nan"),
        (lambda: Dirichlet(min_size=-1), "data.partition.min_size must be >= 0, got -1"),
        (lambda: Dirichlet(max_retries=0), "data.partition.max_retries must be >= 1, got 0"),
        (lambda: IID(num_clients=0), "data.partition.num_clients must be >= 1, got 0"),
        (lambda: Dirichlet(num_clients=-3), "data.partition.num_clients must be >= 1, got -3"),
        (lambda: IID(seed=-1), "data.partition.seed must be >= 0, got -1"),
        (lambda: IID(test="some"), "data.partition.test must be 'matched' or 'all', got 'some'"),
        (lambda: Pathological(classes_per_client=0), "data.partition.classes_per_client must be >= 1, got 0"),
        (lambda: Pathological(num_shots=0), "data.partition.num_shots must be >= 1, got 0"),
        (lambda: FewShot(num_shots=0), "data.partition.num_shots must be >= 1, got 0"),
        (lambda: Domains(clients_per_domain=0), "data.partition.clients_per_domain must be >= 1, got 0"),
        (lambda: Domains(alpha=0.0), "data.partition.alpha must be > 0, got 0.0"),
        (lambda: Domains(min_size=-2), "data.partition.min_size must be >= 0, got -2"),
    ],
)
def test_bad_partition_options_are_one_line_config_errors(make, message) -> None:  # type: ignore[no-untyped-def]
    from flora.errors import FloraConfigError

    with pytest.raises(FloraConfigError) as info:
        make()
    assert str(info.value) == message
    assert info.value.__cause__ is None and info.value.__context__ is None  # one error, no chained traceback
