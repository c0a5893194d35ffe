"""Seeded client sampling, fixed in advance for the whole run."""

from __future__ import annotations

import math

import numpy as np

from flora.errors import FloraConfigError


def derive_seed(seed: int, *keys: int) -> int:
    """An independent 63-bit seed for ``(seed, *keys)`` (e.g. one per round and client)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint64)[0] >> 1)


class ClientSampler:
    """Which clients take part in each round.

    Round ``r`` samples ``clients_per_round`` clients without replacement from a
    generator seeded by ``(seed, r)``: the whole schedule is a pure function of the
    seed, so a resumed run, or one with a different number of devices, sees exactly
    the same clients. Client ids of a round are returned sorted.
    """

    def __init__(self, num_clients: int, fraction: float = 1.0, seed: int = 0, per_round: int | None = None):
        if num_clients < 1:
            raise FloraConfigError("a federation needs at least one client, the data has none")
        if per_round is None:
            if not 0.0 < fraction <= 1.0:
                raise FloraConfigError(f"trainer.client_fraction must be in (0, 1], got {fraction}")
            per_round = max(1, math.ceil(round(fraction * num_clients, 6)))
        if not 1 <= per_round <= num_clients:
            raise FloraConfigError(
                f"trainer.clients_per_round must be in [1, {num_clients}] (the data has {num_clients} "
                f"clients), got {per_round}"
            )
        self.num_clients = num_clients
        self.per_round = per_round
        self.seed = seed

    def clients(self, round_idx: int) -> list[int]:
        if self.per_round == self.num_clients:
            return list(range(self.num_clients))
        rng = np.random.default_rng([self.seed, 0x5A3, round_idx])
        return sorted(int(c) for c in rng.choice(self.num_clients, size=self.per_round, replace=False))

    def schedule(self, rounds: int) -> list[list[int]]:
        return [self.clients(r) for r in range(rounds)]
