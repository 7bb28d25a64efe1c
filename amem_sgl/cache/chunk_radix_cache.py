"""ChunkRadixCache: SGLang's radix tree, plus position-independent memory-chunk nodes.

Contract inherited from :class:`RadixCache` (unchanged for requests without chunk spans):

* ``match_prefix`` finds the longest cached prefix and may split a node at the match boundary.
* ``insert`` adds a key/value path; the tree owns the value's slots that were not already in it.
* ``lock(node)`` protects the path from ``node`` to the root until ``unlock``; slot indices read
  off a path are valid only while it is locked.
* ``evict(num_tokens)`` frees unlocked leaves in eviction-policy order (LRU by default) and returns
  exactly their slots to the allocator; evicting 0 tokens is always safe.

Chunk nodes (see amem_sgl.chunks.hints for the request field):

* A chunk node is an ordinary tree node under its own ``extra_key`` (``amem:chunk:<id>``), a child
  of the root holding the chunk's tokens and the KV slots computed at its canonical positions. Locks,
  LRU order and eviction treat it exactly like a prefix node; evicting it frees exactly its slots.
  A hit compares the stored token ids, so a hash collision never serves wrong KV.
* Registration: a request with a ``register`` action is checkpointed only up to its span; when it
  finishes, the span's slots become the chunk node (the canonical context before the span stays an
  ordinary prefix). An already-resident chunk is left as it is.
* Capture (register on first use): a splice request with ``capture`` keeps each span it computes
  itself (after its splice and cached prefix) whose chunk is not resident: at the checkpoint that
  covers the span, the span's KV is copied into fresh slots that become the chunk's node, canonical
  position = where it was computed (behind that request's context).
* Splicing: ``match_prefix(req=...)`` continues the ordinary match through each declared span that
  starts where the match ends and whose chunk is resident: it allocates slots, copies the chunk's KV
  there and rotates K from canonical to new positions. The spliced slots belong to the request (the
  match reports ``cache_protected_len`` = the ordinary prefix), so the scheduler computes only what
  follows, and at checkpoint the whole sequence is inserted as an ordinary prefix: the next request
  over the same chunks in the same order is an exact prefix hit. Matching runs several times per
  request; a splice is kept per request id and reused while the ordinary match is unchanged, handed
  to the request's row in ``prefix_device_indices``, and freed if the request is aborted first.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from array import array
from typing import Any, Optional

import torch

from amem_sgl.blend.policy import BlendPolicy
from amem_sgl.blend.context import BlendPlan
from amem_sgl.cache.splice import RopeSpec, copy_kv, pool_layers, splice_kv
from amem_sgl.chunks.hints import ChunkRequest, ChunkSpan, parse_kv_hints
from amem_sgl.chunks.identity import chunk_id
from amem_sgl.sglang_compat import (
    EvictParams,
    EvictResult,
    InsertParams,
    InsertResult,
    MatchPrefixParams,
    MatchResult,
    RadixCache,
    RadixKey,
)

logger = logging.getLogger(__name__)

CHUNK_KEY_PREFIX = "amem:chunk:"
NAMESPACE_KEY_PREFIX = "amem:ns:"
# Appended to a namespace's salt for exact requests (kv_hints ``exact``); '#' is never in a namespace.
EXACT_SALT_SUFFIX = "#exact"
USAGE_KEY = "amem"  # req.customized_info key -> meta_info["amem"] of the response


@dataclasses.dataclass
class CacheStats:
    """Counters of tree events since start (monotonic; never reset by a cache flush)."""

    match_calls: int = 0
    match_hit_tokens: int = 0
    match_query_tokens: int = 0
    inserted_tokens: int = 0
    evicted_tokens: int = 0
    chunks_registered: int = 0
    chunk_hits: int = 0
    chunk_misses: int = 0
    spliced_tokens: int = 0
    spliced_requests: int = 0
    recomputed_tokens: int = 0
    blend_passes: int = 0
    probed_tokens: int = 0  # spliced tokens run through a deviation probe (layers < check layer)
    probe_passes: int = 0
    blend_failures: int = 0  # blend passes that raised (logged; requests served on spliced KV)
    forgotten_tokens: int = 0  # freed by forget actions (memory API deletes)
    gap_tokens: int = 0  # uncached non-chunk tokens computed by blend passes (e.g. the preamble)
    chunks_stored: int = 0  # handed to the residency service (write-through)
    chunks_restored: int = 0  # loaded back from the CPU/disk tiers instead of recomputed
    restored_tokens: int = 0
    restore_rejected: int = 0  # stored KV that did not fit this server (layout/dtype): recomputed
    registered_tokens: int = 0  # chunk tokens prefilled by register requests
    chunks_captured: int = 0  # chunks kept from a request that computed them in place (first use)
    captured_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


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
    # A blend pass needs the position-masked attention (CPU engine); without it nothing is recomputed.
    blend_available: bool = False


@dataclasses.dataclass(frozen=True)
class ChunkMeta:
    chunk_id: str
    namespace: str
    num_tokens: int
    canonical_start: int  # position of the chunk's first token when its KV was computed


@dataclasses.dataclass
class _Splice:
    base_len: int  # the ordinary prefix the splice continues
    end: int  # base_len + spliced tokens
    slots: torch.Tensor  # int64, owned by the request once handed over
    request: ChunkRequest
    key_len: int
    segments: list[tuple[int, int]]  # (start, length) of each spliced chunk
    loaded_tokens: int = 0  # of those, restored from the residency tiers (not on the device before)
    gaps: list[int] = dataclasses.field(default_factory=list)  # uncached non-chunk positions: blend pass computes


class ChunkRadixCache(RadixCache):
    """A :class:`RadixCache` with memory-chunk nodes; see the module docstring."""

    tree_kind = "amem.ChunkRadixCache"

    def __init__(self, params, chunks: ChunkSupport | None = None) -> None:
        self.stats = CacheStats()
        self.chunks = chunks
        self.chunk_meta: dict[str, ChunkMeta] = {}
        self._splices: dict[str, _Splice] = {}
        self.blend_plans: dict[str, BlendPlan] = {}  # admitted requests' plans until their batch runs
        self._to_capture: dict[str, list[ChunkSpan]] = {}  # capture requests: the spans they compute
        self.metrics = None  # amem_sgl.metrics.AmemMetrics when the server runs with --enable-metrics
        self.residency = None  # amem_sgl.residency.client.ResidencyClient when the service runs
        super().__init__(params)

    # ------------------------------------------------------------------ prefix-tree overrides

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        req = params.req
        request = self._chunk_request(req) if req is not None and self.chunk_reuse_enabled else None
        if request is not None and request.forget is not None:
            self.forget(request.namespace, None if "*" in request.forget else set(request.forget))
            request = None  # then an ordinary request
        if request is not None:
            # Spliced (and blended) sequences go into the tree under a namespace-salted key, so they
            # serve only requests of that namespace that declare chunks: never another namespace,
            # never a plain request expecting a full prefill of the same tokens.
            salted = self._salt_request(req, request)
            if salted != params.key.extra_key:
                params = dataclasses.replace(params, key=RadixKey(
                    params.key.token_ids, extra_key=salted, limit=params.key.limit,
                    cache_salt=params.key.cache_salt))
        result = super().match_prefix(params)
        if request is not None:
            # A chunk span's KV is its chunk's own (registered or spliced), never a stretch of some
            # other prefix that happens to start with the same tokens: cut a match ending inside a
            # span back to the span's start (the re-match splits the node there).
            inside = [s for s in request.spans if s.start < result.device_prefix_len < s.end]
            if inside:
                result = super().match_prefix(dataclasses.replace(params, key=params.key[: inside[0].start]))
        if not self.disable:
            self.stats.match_calls += 1
            self.stats.match_query_tokens += len(params.key)
            self.stats.match_hit_tokens += result.device_prefix_len
        if request is None or request.register:
            if req is not None:
                self._drop_splice(req.rid)
            return result
        # An exact request splices nothing: its spans are prefilled (and captured) like any tokens.
        splice = None if request.exact else self._splice_for(req, request, result, len(params.key))
        if request.capture:
            spliced = {start for start, _ in splice.segments} if splice is not None else set()
            self._to_capture[req.rid] = [span for span in request.spans
                                         if span.start >= result.device_prefix_len and span.start not in spliced]
        if splice is None:
            return result
        return result._replace(device_prefix_len=splice.end, cache_protected_len=splice.base_len)

    def prefix_device_indices(self, req) -> torch.Tensor:
        splice = self._splices.pop(req.rid, None)
        if splice is None:
            return super().prefix_device_indices(req)
        if req.prefix_len != splice.end:
            raise RuntimeError(f"amem: request {req.rid} prefix_len {req.prefix_len} != spliced "
                               f"prefix {splice.end}")
        self.stats.spliced_requests += 1
        policy = splice.request.blend or self.chunks.blend_default
        if not self.chunks.blend_available:
            policy = BlendPolicy("none")
        layers = self.chunks.kv_pool.layer_num
        chunk_positions = policy.select(splice.segments)
        budget = policy.deviation_budget(splice.segments) if layers > 1 else 0
        check_layer = min(policy.check_layer, layers - 1)
        positions = sorted(set(chunk_positions) | set(splice.gaps))
        if positions or budget:
            self.blend_plans[req.rid] = BlendPlan(splice.end, tuple(positions), tuple(splice.segments),
                                                     budget, check_layer, tuple(splice.gaps))
        spliced = splice.end - splice.base_len - len(splice.gaps)
        probed = spliced if budget else 0
        recomputed = len(chunk_positions) + budget
        usage = {
            "namespace": splice.request.namespace, "spliced_tokens": spliced,
            "recomputed_tokens": recomputed, "probed_tokens": probed,
            "probe_layers": check_layer + 1 if probed else 0,
            "extended_tokens": len(req.origin_input_ids) - splice.end,
            "loaded_tokens": splice.loaded_tokens,
            "gap_tokens": len(splice.gaps),
            "blend_policy": policy.label if recomputed else "none",
        }
        # Reported once in the response's meta_info["amem"] and the OpenAI usage (amem_sgl.plugin).
        req.customized_info = {**(req.customized_info or {}), USAGE_KEY: [usage]}
        if self.metrics is not None:
            self.metrics.record(usage)
        base = self.path_device_indices(req.last_node)[: splice.base_len]
        return torch.cat([base.to(torch.int64), splice.slots])

    def checkpoint(self, req, *, up_to: int):
        request = self._chunk_request(req) if self.chunk_reuse_enabled else None
        if request is None or not request.register:
            result = super().checkpoint(req, up_to=up_to)
            if request is not None and request.capture:
                self._capture_computed(req, request, up_to)
            return result
        span = request.spans[0]
        super().checkpoint(req, up_to=min(up_to, span.start))
        if req.finished() and up_to >= span.end:
            self._capture_chunk(req, request.namespace, span)

    def take_blend_plans(self, reqs) -> list[tuple[int, BlendPlan]]:
        """(index in ``reqs``, plan) for every request of a batch that was handed a blend plan at
        admission; each plan is handed out once (the blend runner calls this before the batch runs)."""
        return [(i, self.blend_plans.pop(req.rid)) for i, req in enumerate(reqs) if req.rid in self.blend_plans]

    def reset(self):
        """SGLang's cache flush: the device tree (chunk nodes included) is emptied. Chunks the
        residency service holds come back from its tiers on their next use."""
        super().reset()
        if hasattr(self, "chunk_meta"):
            self.chunk_meta.clear()

    def insert(self, params: InsertParams) -> InsertResult:
        size_before = self.evictable_size_ + self.protected_size_
        result = super().insert(params)
        self.stats.inserted_tokens += self.evictable_size_ + self.protected_size_ - size_before
        return result

    def evict(self, params: EvictParams) -> EvictResult:
        result = super().evict(params)
        self.stats.evicted_tokens += result.num_tokens_evicted
        return result

    def release_aborted_request(self, handle) -> None:
        super().release_aborted_request(handle)
        self._drop_splice(handle.rid)
        self._to_capture.pop(handle.rid, None)

    def on_release(self, req, *, checkpointed: bool) -> None:
        super().on_release(req, checkpointed=checkpointed)
        self._drop_splice(req.rid)
        self.blend_plans.pop(req.rid, None)
        self._to_capture.pop(req.rid, None)

    # ------------------------------------------------------------------ chunk nodes

    @property
    def chunk_reuse_enabled(self) -> bool:
        return (self.chunks is not None and self.chunks.enabled and not self.disable
                and self.page_size == 1 and not self.is_eagle)

    @staticmethod
    def chunk_key(cid: str, tokens) -> RadixKey:
        return RadixKey(array("q", tokens), extra_key=CHUNK_KEY_PREFIX + cid)

    def find_chunk(self, cid: str, tokens):
        """The resident node of chunk ``cid`` if its stored tokens equal ``tokens``; refreshes LRU."""
        key = self.chunk_key(cid, tokens)
        if len(key) == 0:
            return None
        node = self.root_node.children.get(key.child_key(self.page_size))
        if node is None or node.evicted or tuple(node.key.token_ids) != tuple(key.token_ids):
            return None
        node.last_access_time = time.monotonic()
        return node

    def register_chunk_slots(self, namespace: str, tokens, slots: torch.Tensor, canonical_start: int) -> bool:
        """Make ``slots`` (KV of ``tokens`` computed at ``canonical_start``) a chunk node.

        Returns False (and takes nothing) when the chunk is already resident."""
        cid = chunk_id(namespace, self.chunks.model_id, tokens)
        if self.find_chunk(cid, tokens) is not None:
            return False
        self.insert(InsertParams(key=self.chunk_key(cid, tokens), value=slots.to(torch.int64)))
        self.chunk_meta[cid] = ChunkMeta(cid, namespace, len(tokens), canonical_start)
        self.stats.chunks_registered += 1
        return True

    def _capture_chunk(self, req, namespace: str, span: ChunkSpan) -> None:
        tokens = req.origin_input_ids[span.start: span.end]
        row = self.req_to_token_pool.req_to_token[req.kv.req_pool_idx, span.start: span.end]
        slots = row.to(torch.int64).clone()
        if self.register_chunk_slots(namespace, tokens, slots, span.start):
            # The node owns these slots now: the release that follows must not free them.
            req.kv.cache_protected_len = span.end
            self.stats.registered_tokens += len(tokens)
            self._write_through(namespace, tokens, slots, span.start)

    def _capture_computed(self, req, request: ChunkRequest, up_to: int) -> None:
        """Register on first use: copy each span this request computed (up to ``up_to``) whose
        chunk is not resident into fresh slots and make them the chunk's node."""
        todo = self._to_capture.get(req.rid)
        if not todo:
            return
        row = self.req_to_token_pool.req_to_token[req.kv.req_pool_idx]
        for span in [s for s in todo if s.end <= up_to]:
            todo.remove(span)
            tokens = req.origin_input_ids[span.start: span.end]
            if self.find_chunk(chunk_id(request.namespace, self.chunks.model_id, tokens), tokens) is not None:
                continue
            src = row[span.start: span.end].to(torch.int64)
            slots = self._alloc(len(span))
            if slots is None:
                return
            copy_kv(self.chunks.kv_pool, src, slots)
            self.register_chunk_slots(request.namespace, tokens, slots, span.start)
            self.stats.chunks_captured += 1
            self.stats.captured_tokens += len(span)
            self._write_through(request.namespace, tokens, slots, span.start)

    def forget(self, namespace: str, chunk_ids: set[str] | None = None) -> int:
        """Drop a namespace's chunk nodes (all, or ``chunk_ids``) and its blended prefixes from the
        device tree, freeing their slots. Nodes a running request holds stay until it ends (then
        evictable as usual). Returns the tokens freed."""
        salt = f"{NAMESPACE_KEY_PREFIX}{namespace}"
        targets = []  # chunk nodes, and blended and exact prefixes (the exact salt = salt + suffix)
        for node in list(self.root_node.children.values()):
            extra = node.key.extra_key or ""
            if extra.startswith(CHUNK_KEY_PREFIX):
                cid = extra[len(CHUNK_KEY_PREFIX):]
                meta = self.chunk_meta.get(cid)
                if meta is not None and meta.namespace == namespace and (chunk_ids is None or cid in chunk_ids):
                    targets.append(node)
                    self.chunk_meta.pop(cid, None)
            elif (base := extra.removesuffix(EXACT_SALT_SUFFIX)) == salt or base.endswith("|" + salt):
                targets.append(node)
        freed = sum(self._drop_subtree(node) for node in targets)
        self.stats.forgotten_tokens += freed
        return freed

    def _drop_subtree(self, node) -> int:
        freed = sum(self._drop_subtree(child) for child in list(node.children.values()))
        if node.children or node.lock_ref > 0 or node is self.root_node:
            return freed
        self.token_to_kv_pool_allocator.free_segment(node.value, start_pos=0)  # as RadixCache.evict does
        self._delete_leaf(node)
        return freed + len(node.value)

    # ------------------------------------------------------------------ residency tiers

    def _layers(self) -> range:
        return pool_layers(self.chunks.kv_pool)

    def _kv_layout(self) -> dict[str, str]:
        pool = self.chunks.kv_pool
        k = pool.get_key_buffer(pool.start_layer)
        return {"layers": str(pool.layer_num), "kv_heads": str(k.shape[1]), "head_dim": str(k.shape[2]),
                "dtype": str(k.dtype)}

    def _write_through(self, namespace: str, tokens, slots: torch.Tensor, canonical_start: int) -> None:
        """Hand a new chunk's KV (every layer, copied now: the slots may be reused later) to the
        residency service, which stores it on disk and maybe in CPU memory, in the background."""
        if self.residency is None:
            return
        pool = self.chunks.kv_pool
        k = torch.stack([pool.get_key_buffer(layer)[slots] for layer in self._layers()]).cpu()
        v = torch.stack([pool.get_value_buffer(layer)[slots] for layer in self._layers()]).cpu()
        cid = chunk_id(namespace, self.chunks.model_id, tokens)
        self.residency.store(cid, namespace, self.chunks.model_id,
                             {"k": k, "v": v, "tokens": torch.tensor(list(tokens), dtype=torch.int64)},
                             {"canonical_start": canonical_start, **self._kv_layout()})
        self.stats.chunks_stored += 1

    def _restore_chunk(self, namespace: str, cid: str, tokens):
        """Load a chunk the device pool no longer holds from the residency tiers into fresh slots and
        make it a chunk node again; returns the node, or None (not stored, or not usable here)."""
        if self.residency is None:
            return None
        got = self.residency.fetch(cid, namespace, self.chunks.model_id)
        if got is None:
            return None
        tensors, meta, _tier = got
        layout = self._kv_layout()
        stored_tokens = tensors.get("tokens")
        if (stored_tokens is None or stored_tokens.tolist() != list(tokens)
                or any(meta.get(key) != value for key, value in layout.items())):
            logger.warning("amem: stored chunk %s does not fit this server (%s vs %s); recomputing", cid,
                           {k: meta.get(k) for k in layout}, layout)
            self.stats.restore_rejected += 1
            return None
        slots = self._alloc(len(tokens))
        if slots is None:
            return None
        pool = self.chunks.kv_pool
        k, v = tensors["k"], tensors["v"]
        for i, layer in enumerate(self._layers()):
            k_buffer, v_buffer = pool.get_key_buffer(layer), pool.get_value_buffer(layer)
            k_buffer[slots] = k[i].to(k_buffer.device)
            v_buffer[slots] = v[i].to(v_buffer.device)
        self.register_chunk_slots(namespace, tokens, slots, int(meta["canonical_start"]))
        self.stats.chunks_restored += 1
        self.stats.restored_tokens += len(tokens)
        return self.find_chunk(cid, tokens)

    @staticmethod
    def _salt_request(req, request: ChunkRequest) -> str:
        """Give the request a namespace-salted radix key (its checkpoint inserts under it too)."""
        salt = f"{NAMESPACE_KEY_PREFIX}{request.namespace}"
        salt += EXACT_SALT_SUFFIX if request.exact else ""  # exact prefixes never meet blended ones
        original = getattr(req, "_amem_original_extra_key", req.extra_key)
        req._amem_original_extra_key = original
        req.extra_key = salt if original is None else f"{original}|{salt}"
        return req.extra_key

    def _chunk_request(self, req) -> ChunkRequest | None:
        envelope = getattr(req, "kv_hints", None)
        if envelope is None:
            return None
        try:
            request = parse_kv_hints(envelope)
            if request is not None:
                request.validate(len(req.origin_input_ids), self.chunks.max_chunk_tokens)
            return request
        except ValueError as err:
            logger.warning("amem: ignoring chunk spans of request %s: %s", req.rid, err)
            return None

    # ------------------------------------------------------------------ splicing

    def _splice_for(self, req, request: ChunkRequest, result: MatchResult, key_len: int) -> _Splice | None:
        base = result.device_prefix_len
        existing = self._splices.get(req.rid)
        if existing is not None:
            if (existing.base_len, existing.request, existing.key_len) == (base, request, key_len):
                return existing
            self._drop_splice(req.rid)

        plan, pos, loaded, device_hits = [], base, 0, []
        tokens = req.origin_input_ids
        # Hold the ordinary prefix and every planned chunk node while slots are found (that may evict).
        held = [self.lock(result.last_device_node)]
        try:
            for span in request.spans:
                if span.end <= base:
                    continue  # already in the ordinary prefix (e.g. a previous blended turn)
                if span.start < pos or span.end > key_len:
                    break
                if span.start > pos and not self.chunks.blend_available:
                    break  # a gap (uncached text before the chunk) is filled by the blend pass only
                span_tokens = tokens[span.start: span.end]
                cid = chunk_id(request.namespace, self.chunks.model_id, span_tokens)
                meta, node = self.chunk_meta.get(cid), self.find_chunk(cid, span_tokens)
                if meta is None or node is None:
                    node = self._restore_chunk(request.namespace, cid, span_tokens)
                    if node is None:
                        self.stats.chunk_misses += 1
                        if request.capture and self.chunks.blend_available:
                            continue  # computed in place by the blend pass (a gap), captured after
                        break
                    meta, loaded = self.chunk_meta[cid], loaded + len(span)
                else:
                    device_hits.append(cid)
                self.stats.chunk_hits += 1
                held.append(self.lock(node))
                plan.append((node, span.start - meta.canonical_start, len(span), span.start))
                pos = span.end
            if not plan:
                return None
            if self.residency is not None:
                self.residency.hit(device_hits)
            slots = self._alloc(pos - base)
            if slots is None:
                return None
            src = torch.cat([node.value for node, _, _, _ in plan]).to(torch.int64)
            delta = torch.cat([torch.full((n,), d, dtype=torch.int64) for _, d, n, _ in plan]).to(src.device)
            dst = torch.cat([slots[start - base: start - base + n] for _, _, n, start in plan])
            splice_kv(self.chunks.kv_pool, src, dst, delta, self.chunks.rope)
        finally:
            for lock in held:
                self.unlock(lock)
        segments = [(start, n) for _, _, n, start in plan]
        covered = {p for start, n in segments for p in range(start, start + n)}
        gaps = [p for p in range(base, pos) if p not in covered]
        splice = _Splice(base, pos, slots, request, key_len, segments, loaded, gaps)
        self._splices[req.rid] = splice
        self.stats.spliced_tokens += pos - base
        return splice

    def _alloc(self, n: int) -> torch.Tensor | None:
        allocator = self.token_to_kv_pool_allocator
        if allocator.available_size() < n:
            self.evict(EvictParams(num_tokens=n - allocator.available_size()))
        slots = allocator.alloc(n)
        return None if slots is None else slots.to(torch.int64)

    def _drop_splice(self, rid: str) -> None:
        splice = self._splices.pop(rid, None)
        if splice is not None:
            self.token_to_kv_pool_allocator.free(splice.slots)

    # ------------------------------------------------------------------ reporting

    def resident_chunks(self) -> int:
        """Chunk nodes in the tree now (children of the root under a chunk extra_key)."""
        return sum(1 for node in self.root_node.children.values()
                   if not node.evicted and (node.key.extra_key or "").startswith(CHUNK_KEY_PREFIX))

    def describe(self) -> dict:
        """What ``/get_server_info`` reports about this tree."""
        return {
            "tree_cache": type(self).__name__,
            "tree_kind": self.tree_kind,
            "page_size": self.page_size,
            "evictable_tokens": self.evictable_size(),
            "protected_tokens": self.protected_size(),
            "chunk_reuse": self.chunk_reuse_enabled,
            "chunk_reuse_reason": self.chunks.reason if self.chunks else "no chunk support attached",
            "resident_chunks": self.resident_chunks(),
            "pending_splices": len(self._splices),
            "blend_available": bool(self.chunks and self.chunks.blend_available),
            "blend_default": dataclasses.asdict(self.chunks.blend_default) if self.chunks else None,
            "stats": self.stats.as_dict(),
        }
