"""Weighted fair share of a batch's rows between owners (API keys), and their GPU time.

The queue's fair order (service/fairness.py) decides which job heads the next batch; this
decides who fills the rest of it. While several owners have jobs waiting in the scanned
part of the queue, each owner's rows in one batch are at most its weighted share of the
batch size (`apportion`), whether or not the others' jobs can join this batch: a key with
100 queued jobs then holds at most half the rows of a batch while one other key waits,
and that key's job, next in the queue's fair order, waits behind a batch of that size,
not a full one. With one owner waiting, its jobs fill the batch as before. Slots that the
shares leave over go to the owner with the least recent GPU time per weight.

Recent GPU time (`GpuAccount`) is kept per worker in memory, decayed with a half-life: it
only breaks ties between owners within one batch, what this worker's own GPU did is what
it trades off, and keeping it in Redis would add a round trip per batch for no change in
the shares. The service-wide total per owner is counted in Redis (keys.GPU_SECONDS_KEY)
for the `inversion_gpu_seconds_total` metric.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from ddim_inversion.contract import JobPayload
from ddim_inversion.job_metrics import owner_label


def owner_of(payload: JobPayload | None) -> str:
    """The owner label a job's rows are shared and charged under."""
    return owner_label(payload.owner if payload else "")


FORGET_BELOW_S = 1e-3
"""Recent GPU seconds under which an owner's account is dropped (its weight in ties is nil)."""


def split_seconds(seconds: float, rows: Sequence[tuple[str, float]]) -> dict[str, float]:
    """The seconds of one engine call per owner, each row's part in proportion to its UNet
    calls (`rows`: owner label and calls of each row)."""
    total = sum(calls for _, calls in rows)
    shares: dict[str, float] = {}
    if total <= 0 or seconds <= 0:
        return shares
    for owner, calls in rows:
        shares[owner] = shares.get(owner, 0.0) + seconds * calls / total
    return shares


class GpuAccount:
    """Each owner's recent GPU seconds, halved every `half_life_s` (of `clock`)."""

    def __init__(self, half_life_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.half_life_s = half_life_s
        self.clock = clock
        self._seconds: dict[str, tuple[float, float]] = {}  # owner -> (seconds, as of)

    def recent(self, owner: str) -> float:
        """The owner's GPU seconds, decayed to now."""
        value, at = self._seconds.get(owner, (0.0, 0.0))
        return value * 0.5 ** ((self.clock() - at) / self.half_life_s) if value else 0.0

    def charge(self, seconds_by_owner: Mapping[str, float]) -> None:
        now = self.clock()
        for owner, seconds in seconds_by_owner.items():
            self._seconds[owner] = (self.recent(owner) + seconds, now)
        for owner in [o for o in self._seconds if self.recent(o) < FORGET_BELOW_S]:
            del self._seconds[owner]


class FairShare:
    """The per-key weights (owner label -> weight, 1 if unlisted) and the GPU account."""

    def __init__(self, weights: Mapping[str, float], account: GpuAccount) -> None:
        self.weights = dict(weights)
        self.account = account

    def weight(self, owner: str) -> float:
        return self.weights.get(owner, 1.0)

    def apportion(self, head_owner: str, waiting: Iterable[str], rows: int) -> dict[str, int]:
        """The most rows each waiting owner may hold in a batch of `rows`, the head's owner
        holding at least the head's: seat by seat, the owner whose next row costs the
        least share of its weight, then the one with the least recent GPU time per weight
        (highest-averages apportionment, as seats are shared out in elections)."""
        owners = sorted({head_owner, *waiting})
        seats = dict.fromkeys(owners, 0)
        seats[head_owner] = 1
        recent = {o: self.account.recent(o) / self.weight(o) for o in owners}
        for _ in range(rows - 1):
            owner = min(owners, key=lambda o: ((seats[o] + 1) / self.weight(o), recent[o], o))
            seats[owner] += 1
        return seats


def parse_weights(value: str) -> dict[str, float]:
    """`hash:weight,...` (a key's SHA-256 hex or its owner label) as {owner label: weight}."""
    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        key, sep, number = item.partition(":")
        try:
            weight = float(number)
        except ValueError:
            weight = math.nan
        if not sep or not key.strip() or not math.isfinite(weight) or weight <= 0:
            raise ValueError(
                f"fair share weight {item!r}: give `keyhash:weight` with a positive weight"
            )
        weights[owner_label(key.strip())] = weight
    return weights
