"""ChunkRadixCache: SGLang's radix tree, plus position-independent memory-chunk nodes.

Contract inherited from :class:`RadixCache` (unchanged for requests without chunk spans):

* ``match_prefix`` finds the longest cached prefix and may split a node at the match boundary.
* ``insert`` adds a key/value path; the tree owns the value's slots that were not already in it.
* ``lock(node)`` protects the path from ``node`` to the root until ``unlock``; slot indices read
  off a path are valid only while it is locked.
* ``evict(num_tokens)`` frees unlocked leaves in eviction-policy order (LRU by default) and returns
  exactly their slots to the allocator; evicting 0 tokens is always safe.

Chunk requests (amem_sgl.chunks.hints) go through SGLang's two-phase external-cache protocol (the
one its HiCache and FlexKV caches use):

* ``match_prefix`` is a query. It matches the ordinary prefix (under the request's namespace salt,
  cut back to a span start if it ends inside a span) and reports the declared spans it could splice
  after it as ``host_hit_length`` (:meth:`Splicer.plan`). It allocates, copies and fetches nothing,
  so a waiting or aborted request holds no slots, and SGLang's PrefillAdder counts the spliced
  tokens in its memory budget.
* ``init_load_back`` runs once, when the PrefillAdder admits the request: it allocates the slots,
  restores staged chunks, copies V and re-rotates K (:meth:`Splicer.admit`) and makes the blend
  plan. If it cannot deliver what the match promised it returns 0 and SGLang computes those tokens.
  The spliced slots belong to the request (``load_back_is_cache_owned`` is False):
  ``prefix_device_indices`` hands them to its row, and at checkpoint the whole sequence is inserted
  as an ordinary prefix, so the next request over the same chunks in the same order is an exact hit.
* Registration: a request with a ``register`` action is checkpointed only up to its span; when it
  finishes, the span's slots become the chunk node. Capture (register on first use): a splice
  request with ``capture`` keeps each span it computed itself whose chunk is not resident.

Pieces: :mod:`chunk_index` (identity, metadata, find, register, forget), :mod:`splicer` (plan, slots,
KV moves, blend plan), :mod:`residency_bridge` (write-through, background fetches), :mod:`usage`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch

from amem_sgl.blend.context import BlendPlan
from amem_sgl.blend.policy import BlendPolicy
from amem_sgl.cache.chunk_index import (  # noqa: F401 -- re-exported
    CHUNK_KEY_PREFIX, NAMESPACE_KEY_PREFIX, ChunkIndex, ChunkMeta, ChunkSupport, context_digest,
    salted_extra_key)
from amem_sgl.cache.residency_bridge import ResidencyBridge
from amem_sgl.cache.splice import copy_kv
from amem_sgl.cache.splicer import Splice, Splicer, blend_plan
from amem_sgl.cache.usage import USAGE_KEY, CacheStats, attach_usage, clock, usage_of  # noqa: F401 -- re-exported
from amem_sgl.chunks.hints import ChunkRequest, ChunkSpan, parse_kv_hints
from amem_sgl.sglang_compat import (
    EvictParams, EvictResult, InsertParams, InsertResult, MatchPrefixParams, MatchResult, RadixCache, RadixKey)

logger = logging.getLogger(__name__)


class ChunkRadixCache(RadixCache):
    """A :class:`RadixCache` with memory-chunk nodes; see the module docstring."""

    tree_kind = "amem.ChunkRadixCache"

    def __init__(self, params, chunks: ChunkSupport | None = None) -> None:
        self.stats = CacheStats()
        self.chunks = chunks
        self.index = ChunkIndex(self, chunks.model_id if chunks is not None else "")
        self.splicer = Splicer(self)
        self.bridge: ResidencyBridge | None = None
        self._admitted: dict[str, Splice] = {}  # admitted, not yet handed to the row
        self.blend_plans: dict[str, BlendPlan] = {}  # admitted requests' plans until their batch runs
        self._to_capture: dict[str, list[ChunkSpan]] = {}  # capture requests: the spans they compute
        self._handed: set[str] = set()  # splice requests past their handover
        self._match_s: dict[str, float] = {}  # chunk requests: seconds in match_prefix until admission
        self._parsed: dict[str, tuple] = {}  # rid -> (its kv_hints envelope, the parsed ChunkRequest)
        self.metrics = None  # amem_sgl.metrics.AmemMetrics when the server runs with --enable-metrics
        super().__init__(params)

    @property
    def residency(self):
        return self.bridge.client if self.bridge is not None else None

    @residency.setter
    def residency(self, client) -> None:
        """Attach an amem_sgl.residency.client.ResidencyClient (None detaches)."""
        if self.bridge is not None:
            self.bridge.close()
        self.bridge = ResidencyBridge(client, self.chunks, self.stats) if client is not None else None

    # ------------------------------------------------------------------ the query

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        req = params.req
        request = self._chunk_request(req) if req is not None and self.chunk_reuse_enabled else None
        if request is None:
            return self._match(params, req, None)
        started = clock()
        try:
            return self._match(params, req, request)
        finally:
            self._match_s[req.rid] = self._match_s.get(req.rid, 0.0) + clock() - started

    def _match(self, params: MatchPrefixParams, req, request: ChunkRequest | None) -> MatchResult:
        if request is not None and request.forget is not None:
            self.index.forget(request.namespace, None if "*" in request.forget else set(request.forget))
            request = None  # then an ordinary request
        if request is not None:
            # Spliced (and blended) sequences go into the tree under a namespace-salted key, so they
            # serve only requests of that namespace that declare chunks.
            salted = salted_extra_key(req.extra_key, request.namespace, request.exact)
            if salted != params.key.extra_key:
                params = dataclasses.replace(params, key=RadixKey(
                    params.key.token_ids, extra_key=salted, limit=params.key.limit,
                    cache_salt=params.key.cache_salt))
        result = super().match_prefix(params)
        if request is not None:
            # A chunk span's KV is its chunk's own, never a stretch of some other prefix that starts
            # with the same tokens: cut a match ending inside a span back to the span's start.
            inside = [s for s in request.spans if s.start < result.device_prefix_len < s.end]
            if inside:
                result = super().match_prefix(dataclasses.replace(params, key=params.key[: inside[0].start]))
        if not self.disable:
            self.stats.match_calls += 1
            self.stats.match_query_tokens += len(params.key)
            self.stats.match_hit_tokens += result.device_prefix_len
        if request is None or request.register or request.exact:
            return result  # an exact request splices nothing: its spans are prefilled (and captured)
        plan = self.splicer.plan(req, request, result.device_prefix_len, len(params.key))
        if plan is None:
            return result
        node = result.last_device_node
        return result._replace(host_hit_length=plan.end - plan.base, best_match_node=node, last_host_node=node)

    # ------------------------------------------------------------------ admission

    def init_load_back(self, params):
        """Splice the spans the match reported (once, at admission); (tokens spliced, last node).
        0 tokens: SGLang computes them instead (the chunks went away, or no slots)."""
        req, node = params.req, params.best_match_node
        self._drop_admitted(req.rid)
        request = self._chunk_request(req) if self.chunk_reuse_enabled else None
        if request is None or request.register or request.forget is not None:
            return 0, node
        key_len = req.prefix_len + params.host_hit_length
        started = clock()
        splice = self.splicer.admit(req, request, req.prefix_len, key_len, params.host_hit_length, node)
        if splice is None:
            self.stats.splice_fallbacks += 1
            return 0, node
        recv_at = float(getattr(getattr(req, "time_stats", None), "scheduler_recv_time", 0.0) or 0.0)
        splice.timings.update(match_s=round(self._match_s.pop(req.rid, 0.0), 6), splice_s=round(clock() - started, 6))
        if recv_at > 0:
            splice.timings.update(queue_s=round(started - recv_at, 6), recv_at=recv_at)
        self._admitted[req.rid] = splice
        return splice.plan.end - splice.plan.base, node

    def load_back_is_cache_owned(self) -> bool:
        return False  # spliced slots belong to the request (inserted with its sequence at checkpoint)

    def prefix_device_indices(self, req) -> torch.Tensor:
        splice = self._admitted.pop(req.rid, None)
        request = self._chunk_request(req) if self.chunk_reuse_enabled else None
        if request is not None and not request.register and request.forget is None:
            self._hand_over(req, request, splice, req.prefix_len)
        if splice is None:
            return super().prefix_device_indices(req)
        if req.prefix_len != splice.plan.end:
            self.token_to_kv_pool_allocator.free(splice.slots)
            raise RuntimeError(f"amem: request {req.rid} prefix_len {req.prefix_len} != spliced "
                               f"prefix {splice.plan.end}")
        self.stats.spliced_requests += 1
        policy = splice.request.blend or self.chunks.blend_default
        if not self.chunks.blend_available:
            policy = BlendPolicy("none")
        plan, usage = blend_plan(splice, policy, self.chunks.kv_pool.layer_num,
                                 len(req.origin_input_ids) - splice.plan.end)
        if plan is not None:
            self.blend_plans[req.rid] = plan
        attach_usage(req, usage, splice.request, self.metrics)
        base = self.path_device_indices(req.last_node)[: splice.plan.base]
        return torch.cat([base.to(torch.int64), splice.slots])

    def _hand_over(self, req, request: ChunkRequest, splice: Splice | None, prefix_len: int) -> None:
        """Once per splice request, when it takes its row: the spans it computes itself (chunk
        misses; kept as chunks if it captures)."""
        if req.rid in self._handed:
            return
        self._handed.add(req.rid)
        spliced = {s.start for s in splice.plan.segments} if splice is not None else set()
        base = splice.plan.base if splice is not None else prefix_len
        computed = [s for s in request.spans if s.start >= base and s.start not in spliced]
        self.stats.chunk_misses += len(computed)
        if request.capture:
            self._to_capture[req.rid] = computed

    def timing_record(self, req) -> None:
        """Before a chunk request's first forward (the blend runner's hook calls it): one admitted
        without a splice (a prefix hit, an exact turn, a cold prompt) gets a usage record of its
        scheduler phases (usage.py) and nothing else (no counters, no metrics)."""
        if usage_of(req) is not None or not self.chunk_reuse_enabled:
            return
        request = self._chunk_request(req)
        if request is None or request.register or request.forget is not None:
            return
        recv_at = float(getattr(getattr(req, "time_stats", None), "scheduler_recv_time", 0.0) or 0.0)
        timings = {"match_s": round(self._match_s.pop(req.rid, 0.0), 6)}
        if recv_at > 0:
            timings.update(queue_s=round(clock() - recv_at, 6), recv_at=recv_at)
        attach_usage(req, {"namespace": request.namespace, "blend_policy": "none", "timings": timings}, request)

    def take_blend_plans(self, reqs) -> list[tuple[int, BlendPlan]]:
        """(index in ``reqs``, plan) for every request of a batch that was handed a blend plan at
        admission; each plan is handed out once (the blend runner calls this before the batch runs)."""
        return [(i, self.blend_plans.pop(req.rid)) for i, req in enumerate(reqs) if req.rid in self.blend_plans]

    def alloc(self, n: int) -> torch.Tensor | None:
        """``n`` free slots (evicting unlocked entries if needed), or None.

        SGLang checkpoints and releases requests inside the allocator's free group (its batch-result
        processors), where freed slots -- evictions included -- are held until ``free_group_end``.
        A capture allocates there, so when the free list is short the held frees are handed back
        first: what the group would free at its end anyway, earlier."""
        allocator = self.token_to_kv_pool_allocator
        if allocator.available_size() < n:
            self.evict(EvictParams(num_tokens=n - allocator.available_size()))
        slots = allocator.alloc(n)
        if slots is None and getattr(allocator, "free_group", None):
            allocator.free_group_end()
            allocator.free_group_begin()
            slots = allocator.alloc(n)
        return None if slots is None else slots.to(torch.int64)

    # ------------------------------------------------------------------ tree overrides

    def checkpoint(self, req, *, up_to: int):
        request = self._chunk_request(req) if self.chunk_reuse_enabled else None
        if request is None:
            return super().checkpoint(req, up_to=up_to)
        if not request.register and request.forget is None:
            self._hand_over(req, request, None, 0)  # a request admitted without any prefix
        with self._salted(req, request):
            if not request.register:
                result = super().checkpoint(req, up_to=up_to)
                if request.capture:
                    self._capture_computed(req, request, up_to)
                return result
            span = request.spans[0]
            super().checkpoint(req, up_to=min(up_to, span.start))
        if req.finished() and up_to >= span.end:
            self._capture_chunk(req, request.namespace, span)

    @staticmethod
    @contextlib.contextmanager
    def _salted(req, request: ChunkRequest):
        """The request's radix key carries its namespace salt while the tree inserts its KV."""
        original = req.extra_key
        req.extra_key = salted_extra_key(original, request.namespace, request.exact)
        try:
            yield
        finally:
            req.extra_key = original

    def reset(self):
        """SGLang's cache flush: the device tree (chunk nodes included) is emptied. Chunks the
        residency service holds come back from its tiers on their next use."""
        super().reset()
        if hasattr(self, "index"):
            self.index.clear()

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
        self._forget_request(handle.rid)

    def on_release(self, req, *, checkpointed: bool) -> None:
        super().on_release(req, checkpointed=checkpointed)
        self._forget_request(req.rid)

    def _forget_request(self, rid: str) -> None:
        self._drop_admitted(rid)
        self.blend_plans.pop(rid, None)
        self.stats.captures_skipped += len(self._to_capture.pop(rid, None) or ())
        self._handed.discard(rid)
        self._match_s.pop(rid, None)
        self._parsed.pop(rid, None)

    def _drop_admitted(self, rid: str) -> None:
        splice = self._admitted.pop(rid, None)
        if splice is not None:
            self.token_to_kv_pool_allocator.free(splice.slots)

    # ------------------------------------------------------------------ chunk nodes

    @property
    def chunk_reuse_enabled(self) -> bool:
        return (self.chunks is not None and self.chunks.enabled and not self.disable
                and self.page_size == 1 and not self.is_eagle)

    def find_chunk(self, cid: str, tokens):
        return self.index.find(cid, tokens)

    def register_chunk_slots(self, namespace: str, tokens, slots: torch.Tensor, canonical_start: int) -> bool:
        return self.index.register(namespace, tokens, slots, canonical_start)

    def forget(self, namespace: str, chunk_ids: set[str] | None = None) -> int:
        return self.index.forget(namespace, chunk_ids)

    def resident_chunks(self) -> int:
        return self.index.resident()

    def _capture_chunk(self, req, namespace: str, span: ChunkSpan) -> None:
        """A register action's chunk: kept with the digest of the context it was computed behind."""
        tokens = req.origin_input_ids[span.start: span.end]
        row = self.req_to_token_pool.req_to_token[req.kv.req_pool_idx, span.start: span.end]
        slots = row.to(torch.int64).clone()
        context = context_digest(req.origin_input_ids[: span.start])
        if self.index.register(namespace, tokens, slots, span.start, context):
            # The node owns these slots now: the release that follows must not free them.
            req.kv.cache_protected_len = span.end
            self.stats.registered_tokens += len(tokens)
            self._write_through(namespace, tokens, slots, span.start, context)

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
            if self.index.find(self.index.id_of(request.namespace, tokens), tokens) is not None:
                continue
            src = row[span.start: span.end].to(torch.int64)
            slots = self.alloc(len(span))
            if slots is None:
                todo.insert(0, span)  # no slots even after evicting: tried again at the next checkpoint
                return
            copy_kv(self.chunks.kv_pool, src, slots)
            # Only an exact request's earlier KV is surely a full prefill's: other captures never in place.
            context = context_digest(req.origin_input_ids[: span.start]) if request.exact else ""
            self.index.register(request.namespace, tokens, slots, span.start, context)
            self.stats.chunks_captured += 1
            self.stats.captured_tokens += len(span)
            self._write_through(request.namespace, tokens, slots, span.start, context)

    def _write_through(self, namespace: str, tokens, slots: torch.Tensor, canonical_start: int,
                       context: str) -> None:
        if self.bridge is not None:
            self.bridge.write_through(self.index.id_of(namespace, tokens), namespace, tokens, slots,
                                      canonical_start, context)

    def _chunk_request(self, req) -> ChunkRequest | None:
        """The request's parsed, validated chunk action; parsed once per request (the scheduler asks
        at every match of a waiting request, at admission, handover and each checkpoint)."""
        envelope = getattr(req, "kv_hints", None)
        if envelope is None:
            return None
        known = self._parsed.get(req.rid)
        if known is not None and known[0] is envelope:
            return known[1]
        try:
            request = parse_kv_hints(envelope)
            if request is not None:
                request.validate(len(req.origin_input_ids), self.chunks.max_chunk_tokens)
        except ValueError as err:
            logger.warning("amem: ignoring chunk spans of request %s: %s", req.rid, err)
            request = None
        self._parsed[req.rid] = (envelope, request)
        return request

    # ------------------------------------------------------------------ reporting

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
            "resident_chunks": self.index.resident(),
            "pending_splices": len(self._admitted),
            "blend_available": bool(self.chunks and self.chunks.blend_available),
            "blend_default": dataclasses.asdict(self.chunks.blend_default) if self.chunks else None,
            "stats": self.stats.as_dict(),
        }
