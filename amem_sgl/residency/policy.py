"""Which chunks a bounded tier keeps: the value policy, and LRU as the baseline.

value = w_relevance * relevance + w_recency * recency + w_reuse * reuse - w_size * size

* relevance: the last recall score the memory layer reported for the chunk (0..1; 0 if none);
* recency:   exp2(-age / half_life), age since the chunk was last used or stored (1 = just now);
* reuse:     log2(1 + hits), hits = times the chunk was served (restored, or hit on the device);
* size:      the chunk's bytes in MiB.

Both policies answer the same two questions for a tier that needs ``need`` bytes for a newcomer:
which residents to drop (lowest value first / least recently used first), and whether the newcomer
is admitted at all. LRU always admits, so a stream of one-off chunks flushes everything. The value
policy only evicts residents worth less than the newcomer and refuses the newcomer otherwise, so a
working set that is reused keeps its place under a flood of chunks seen once.
"""

from __future__ import annotations

import dataclasses
import math
import time


@dataclasses.dataclass
class ChunkStats:
    chunk_id: str
    nbytes: int
    last_used: float = dataclasses.field(default_factory=time.time)
    hits: int = 0
    relevance: float = 0.0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PolicyWeights:
    relevance: float = 1.0
    recency: float = 1.0
    reuse: float = 1.0
    size_per_mib: float = 0.01
    half_life_s: float = 600.0


class ValuePolicy:
    name = "value"

    def __init__(self, weights: PolicyWeights = PolicyWeights()) -> None:
        self.w = weights

    def value(self, s: ChunkStats, now: float | None = None) -> float:
        now = time.time() if now is None else now
        recency = math.exp2(-max(now - s.last_used, 0.0) / self.w.half_life_s)
        return (self.w.relevance * s.relevance + self.w.recency * recency + self.w.reuse * math.log2(1 + s.hits)
                - self.w.size_per_mib * s.nbytes / 2**20)

    def order(self, residents: list[ChunkStats], now: float) -> list[ChunkStats]:
        """Eviction order: least valuable first."""
        return sorted(residents, key=lambda s: self.value(s, now))

    def victims(self, residents: list[ChunkStats], newcomer: ChunkStats, need: int) -> list[str] | None:
        """Residents to drop so ``need`` bytes are free, or None: the newcomer is not admitted."""
        if need <= 0:
            return []
        now = time.time()
        bar = self.value(newcomer, now)
        chosen, freed = [], 0
        for s in self.order(residents, now):
            if freed >= need:
                break
            if self.value(s, now) >= bar:
                return None  # everything left is worth more than the newcomer
            chosen.append(s.chunk_id)
            freed += s.nbytes
        return chosen if freed >= need else None


class LruPolicy(ValuePolicy):
    name = "lru"

    def value(self, s: ChunkStats, now: float | None = None) -> float:
        return s.last_used

    def victims(self, residents: list[ChunkStats], newcomer: ChunkStats, need: int) -> list[str] | None:
        if need <= 0:
            return []
        chosen, freed = [], 0
        for s in sorted(residents, key=lambda s: s.last_used):
            if freed >= need:
                break
            chosen.append(s.chunk_id)
            freed += s.nbytes
        return chosen if freed >= need else None


def make_policy(name: str, weights: PolicyWeights = PolicyWeights()) -> ValuePolicy:
    if name == "value":
        return ValuePolicy(weights)
    if name == "lru":
        return LruPolicy(weights)
    raise ValueError(f"residency policy must be 'value' or 'lru', got {name!r}")
