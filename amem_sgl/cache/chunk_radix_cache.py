"""ChunkRadixCache: SGLang's radix tree, the home of amem's chunk nodes.

Contract (inherited from :class:`RadixCache`, unchanged in behaviour):

* ``match_prefix`` finds the longest cached prefix and may split a node at the match boundary; it
  never allocates or frees KV slots.
* ``insert`` adds a key/value path; the tree takes ownership of the value's slots that were not
  already in the tree (the caller frees the duplicates it exposed, as ``checkpoint`` does).
* ``lock(node)`` protects every node from ``node`` to the root against eviction until ``unlock``;
  slot indices read off a path are valid only while that path is locked.
* ``evict(num_tokens)`` frees unlocked leaves in eviction-policy order (LRU by default) and returns
  exactly their slots to the allocator; evicting 0 tokens is always safe.

What this class adds is observable state for the serving layer: counters of real tree events
(:class:`CacheStats`) published in ``/get_server_info`` under ``internal_states[*].amem``. Chunk
nodes and splicing extend this class in later layers through the same overrides.
"""

from __future__ import annotations

import dataclasses
import logging

from amem_sgl.sglang_compat import (
    EvictParams,
    EvictResult,
    InsertParams,
    InsertResult,
    MatchPrefixParams,
    MatchResult,
    RadixCache,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class CacheStats:
    """Counters of tree events since start (monotonic; never reset by a cache flush)."""

    match_calls: int = 0
    match_hit_tokens: int = 0
    match_query_tokens: int = 0
    inserted_tokens: int = 0
    evicted_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class ChunkRadixCache(RadixCache):
    """A :class:`RadixCache` that counts its events for the serving layer; see module docstring."""

    tree_kind = "amem.ChunkRadixCache"

    def __init__(self, params) -> None:
        self.stats = CacheStats()
        super().__init__(params)

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        result = super().match_prefix(params)
        if not self.disable:
            self.stats.match_calls += 1
            self.stats.match_query_tokens += len(params.key)
            self.stats.match_hit_tokens += result.device_prefix_len
        return result

    def insert(self, params: InsertParams) -> InsertResult:
        size_before = self.evictable_size_ + self.protected_size_
        result = super().insert(params)
        self.stats.inserted_tokens += self.evictable_size_ + self.protected_size_ - size_before
        return result

    def evict(self, params: EvictParams) -> EvictResult:
        result = super().evict(params)
        self.stats.evicted_tokens += result.num_tokens_evicted
        return result

    def describe(self) -> dict:
        """What ``/get_server_info`` reports about this tree."""
        return {
            "tree_cache": type(self).__name__,
            "tree_kind": self.tree_kind,
            "page_size": self.page_size,
            "evictable_tokens": self.evictable_size(),
            "protected_tokens": self.protected_size(),
            "stats": self.stats.as_dict(),
        }
