"""The chunk index: which chunks the device tree holds, and their metadata.

A chunk node is an ordinary tree node under its own ``extra_key`` (``amem:chunk:<id>``), a child of
the root holding the chunk's tokens and the KV slots computed at its canonical positions. Locks,
LRU order and eviction treat it exactly like a prefix node; evicting it frees exactly its slots. A
lookup compares the stored token ids, so a hash collision never serves wrong KV.

Identity (amem_sgl.chunks.identity) is SHA-256 over (namespace, model id, token ids); requests that
declare chunks get a namespace-salted ``extra_key`` (:func:`salted_extra_key`) so the sequences
they insert serve only their namespace.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from array import array
from typing import Any, Optional

import torch

from amem_sgl.blend.policy import BlendPolicy
from amem_sgl.cache.splice import RopeSpec
from amem_sgl.chunks.identity import chunk_id, namespace_salt
from amem_sgl.sglang_compat import InsertParams, RadixKey

CHUNK_KEY_PREFIX = "amem:chunk:"
NAMESPACE_KEY_PREFIX = "amem:ns:"


@dataclasses.dataclass(frozen=True)
class ChunkSupport:
    """What chunk nodes need from the serving process; ``enabled`` False turns chunk reuse off."""

    kv_pool: Any  # SGLang's MHATokenToKVPool (per-layer K/V buffers indexed by slot)
    rope: Optional[RopeSpec]
    model_id: str
    enabled: bool
    reason: str = ""
    max_chunk_tokens: int = 2048
    blend_default: BlendPolicy = BlendPolicy()
    # A blend pass needs amem's attention seam (amem_sgl.blend.backend); without it nothing is recomputed.
    blend_available: bool = False
    tp_rank: int = 0  # this scheduler's tensor-parallel rank (its KV pool holds that rank's heads)
    tp_size: int = 1


@dataclasses.dataclass(frozen=True)
class ChunkMeta:
    chunk_id: str
    namespace: str
    num_tokens: int
    canonical_start: int  # position of the chunk's first token when its KV was computed
    # context_digest of the tokens before it then (its canonical context); "" if unknown. A splice
    # that puts the chunk back at canonical_start behind these same tokens serves the KV this
    # server computes for that prompt (a register action's context is the preamble: a full
    # prefill's KV): nothing of it needs recomputing (amem_sgl.cache.splicer.is_in_place).
    context: str = ""


def context_digest(tokens) -> str:
    """A digest of the token ids a chunk's KV was computed behind (its canonical context)."""
    return hashlib.sha256(array("q", tokens).tobytes()).hexdigest()[:32]


# Appended to a namespace's salt for exact requests (kv_hints ``exact``): their prefixes never meet the
# namespace's blended sequences. '#' is never part of a namespace.
EXACT_SALT_SUFFIX = "#exact"


def salted_extra_key(extra_key: str | None, namespace: str, exact: bool = False) -> str:
    """The radix ``extra_key`` of a request that declares chunks of ``namespace`` (``exact``: the
    namespace's exact salt)."""
    salt = namespace_salt(namespace) + (EXACT_SALT_SUFFIX if exact else "")  # keyed by the server secret
    return salt if extra_key is None else f"{extra_key}|{salt}"


class ChunkIndex:
    """Chunk nodes of one tree (``tree`` is the ChunkRadixCache) and their metadata."""

    def __init__(self, tree, model_id: str) -> None:
        self.tree = tree
        self.model_id = model_id
        self.meta: dict[str, ChunkMeta] = {}

    def id_of(self, namespace: str, tokens) -> str:
        return chunk_id(namespace, self.model_id, tokens)

    @staticmethod
    def key(cid: str, tokens) -> RadixKey:
        return RadixKey(array("q", tokens), extra_key=CHUNK_KEY_PREFIX + cid)

    def find(self, cid: str, tokens, *, touch: bool = True):
        """The resident node of chunk ``cid`` if its stored tokens equal ``tokens``; ``touch``
        refreshes its LRU time (a query passes False)."""
        key = self.key(cid, tokens)
        if len(key) == 0:
            return None
        node = self.tree.root_node.children.get(key.child_key(self.tree.page_size))
        if node is None or node.evicted or tuple(node.key.token_ids) != tuple(key.token_ids):
            return None
        if touch:
            node.last_access_time = time.monotonic()
        return node

    def register(self, namespace: str, tokens, slots: torch.Tensor, canonical_start: int, context: str = "") -> bool:
        """Make ``slots`` (KV of ``tokens`` computed at ``canonical_start`` behind the tokens whose
        :func:`context_digest` is ``context``) a chunk node.

        Returns False (and takes nothing) when the chunk is already resident."""
        cid = self.id_of(namespace, tokens)
        if self.find(cid, tokens) is not None:
            return False
        self.tree.insert(InsertParams(key=self.key(cid, tokens), value=slots.to(torch.int64)))
        self.meta[cid] = ChunkMeta(cid, namespace, len(tokens), canonical_start, context)
        self.tree.stats.chunks_registered += 1
        return True

    def forget(self, namespace: str, chunk_ids: set[str] | None = None) -> int:
        """Drop a namespace's chunk nodes (all, or ``chunk_ids``) and its blended prefixes from the
        device tree, freeing their slots. Nodes a running request holds stay until it ends (then
        evictable as usual). Returns the tokens freed."""
        salt = namespace_salt(namespace)
        targets = []  # chunk nodes, blended prefixes and exact prefixes (salt + EXACT_SALT_SUFFIX)
        for node in list(self.tree.root_node.children.values()):
            extra = node.key.extra_key or ""
            if extra.startswith(CHUNK_KEY_PREFIX):
                cid = extra[len(CHUNK_KEY_PREFIX):]
                meta = self.meta.get(cid)
                if meta is not None and meta.namespace == namespace and (chunk_ids is None or cid in chunk_ids):
                    targets.append(node)
                    self.meta.pop(cid, None)
            elif (base := extra.removesuffix(EXACT_SALT_SUFFIX)) == salt or base.endswith("|" + salt):
                targets.append(node)
        freed = sum(self._drop_subtree(node) for node in targets)
        self.tree.stats.forgotten_tokens += freed
        return freed

    def _drop_subtree(self, node) -> int:
        tree = self.tree
        freed = sum(self._drop_subtree(child) for child in list(node.children.values()))
        if node.children or node.lock_ref > 0 or node is tree.root_node:
            return freed
        tree.token_to_kv_pool_allocator.free_segment(node.value, start_pos=0)  # as RadixCache.evict does
        tree._delete_leaf(node)
        return freed + len(node.value)

    def resident(self) -> int:
        """Chunk nodes in the tree now (children of the root under a chunk extra_key)."""
        return sum(1 for node in self.tree.root_node.children.values()
                   if not node.evicted and (node.key.extra_key or "").startswith(CHUNK_KEY_PREFIX))

    def clear(self) -> None:
        self.meta.clear()
