"""Splicing declared chunks into a request: a pure plan at match time, the KV moves at admission.

* :meth:`Splicer.plan` (from ``match_prefix``, for waiting requests too): which declared spans,
  contiguous with the ordinary prefix, can be served -- a chunk resident on the device, a chunk
  staged by the residency bridge, or (where a blend pass can run) an uncached gap the blend pass
  computes. It reads the tree and allocates and copies nothing; a chunk it finds neither on the
  device nor staged starts a fetch in the bridge's thread, waited for at most FIRST_FETCH_WAIT_S.
* :meth:`Splicer.admit` (from ``init_load_back``, once per admitted request): the plan again (the
  tree may have changed since the match), then slots (evicting while the chunk nodes and the
  matched path are locked), staged chunks restored, V copied and K re-rotated by
  ``start - canonical_start``. If it cannot deliver exactly what the match promised (a chunk gone,
  no slots) it returns None having freed everything, and SGLang computes those tokens instead.
  A chunk it places *in place* -- at its canonical start, behind the very tokens its KV was
  computed behind (the preamble, for the first chunk of a memory turn) -- holds the KV a prefill of
  that prompt computes there (re-rotation by 0 changes no bit), so nothing of it is recomputed.
* :func:`blend_plan` -- which of the spliced tokens the blend pass recomputes (the policy's picks,
  never in an in-place chunk) and the usage record.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from amem_sgl.blend.context import BlendPlan
from amem_sgl.blend.policy import BlendPolicy
from amem_sgl.cache.chunk_index import context_digest
from amem_sgl.cache.residency_bridge import FIRST_FETCH_WAIT_S
from amem_sgl.cache.splice import splice_kv
from amem_sgl.cache.usage import splice_usage
from amem_sgl.chunks.hints import ChunkRequest
from amem_sgl.sglang_compat import EvictParams


@dataclasses.dataclass(frozen=True)
class Segment:
    start: int
    length: int
    cid: str
    staged: bool  # restored from the residency bridge at admission (not on the device now)


@dataclasses.dataclass(frozen=True)
class SplicePlan:
    base: int  # the ordinary prefix the splice continues
    end: int  # base + spliced tokens (chunks and gaps)
    segments: tuple[Segment, ...]

    @property
    def gaps(self) -> list[int]:
        covered = {p for s in self.segments for p in range(s.start, s.start + s.length)}
        return [p for p in range(self.base, self.end) if p not in covered]


@dataclasses.dataclass
class Splice:
    """An admitted splice: its slots belong to the request once handed over."""

    plan: SplicePlan
    slots: torch.Tensor  # int64, one per position in [plan.base, plan.end)
    request: ChunkRequest
    loaded_tokens: int = 0  # restored from the residency tiers (not on the device before)
    in_place: frozenset = frozenset()  # starts of segments placed in place (exact KV: never recomputed)
    timings: dict = dataclasses.field(default_factory=dict)  # scheduler phases so far (usage.py)


class Splicer:
    def __init__(self, tree) -> None:
        self.tree = tree  # ChunkRadixCache: its index, bridge, support, stats, allocator

    def plan(self, req, request: ChunkRequest, base: int, key_len: int) -> SplicePlan | None:
        tree = self.tree
        index, bridge, support = tree.index, tree.bridge, tree.chunks
        tokens = req.origin_input_ids
        segments, pos = [], base
        deadline = time.monotonic() + FIRST_FETCH_WAIT_S  # shared by the fetches this match starts
        for span in request.spans:
            if span.end <= base:
                continue  # already in the ordinary prefix (e.g. a previous blended turn)
            if span.start < pos or span.end > key_len:
                break
            if span.start > pos and not support.blend_available:
                break  # a gap (uncached text before the chunk) is filled by the blend pass only
            span_tokens = tokens[span.start: span.end]
            cid = index.id_of(request.namespace, span_tokens)
            on_device = cid in index.meta and index.find(cid, span_tokens, touch=False) is not None
            staged = not on_device and bridge is not None and bridge.lookup(cid, request.namespace, deadline)
            if not (on_device or staged):
                if request.capture and support.blend_available:
                    continue  # computed in place by the blend pass (a gap), captured after
                break
            segments.append(Segment(span.start, len(span), cid, staged))
            pos = span.end
        if not segments:
            return None
        return SplicePlan(base, pos, tuple(segments))

    def admit(self, req, request: ChunkRequest, base: int, key_len: int, promised: int, last_node) -> Splice | None:
        """Allocate and move the KV of the plan for ``req``; None (nothing held) unless it covers
        exactly ``promised`` tokens after ``base``."""
        tree = self.tree
        plan = self.plan(req, request, base, key_len)
        if plan is None or plan.end - base != promised:
            return None
        tokens = req.origin_input_ids
        held = [tree.lock(last_node)]
        restored: list = []
        try:
            nodes = []
            for seg in plan.segments:
                span_tokens = tokens[seg.start: seg.start + seg.length]
                node = tree.index.find(seg.cid, span_tokens)
                if node is None and seg.staged:
                    node = tree.bridge.restore(tree.index, tree.alloc, request.namespace, seg.cid, span_tokens)
                if node is None:
                    return None  # gone since the match: SGLang computes these tokens instead
                held.append(tree.lock(node))
                nodes.append((node, tree.index.meta[seg.cid], seg))
                if seg.staged:
                    restored.append(seg.cid)
            slots = tree.alloc(plan.end - base)
            if slots is None:
                return None
            in_place = frozenset(s.start for _, meta, s in nodes if is_in_place(meta, s.start, tokens))
            src = torch.cat([node.value for node, _, _ in nodes]).to(torch.int64)
            delta = torch.cat([torch.full((s.length,), s.start - meta.canonical_start, dtype=torch.int64)
                               for _, meta, s in nodes]).to(src.device)
            dst = torch.cat([slots[s.start - base: s.start - base + s.length] for _, _, s in nodes])
            splice_kv(tree.chunks.kv_pool, src, dst, delta, tree.chunks.rope)
        finally:
            for lock in held:
                tree.unlock(lock)
        if tree.bridge is not None:
            tree.bridge.hit([seg.cid for seg in plan.segments if not seg.staged])
        tree.stats.chunk_hits += len(plan.segments)
        tree.stats.in_place_chunks += len(in_place)
        tree.stats.spliced_tokens += plan.end - base
        loaded = sum(s.length for s in plan.segments if s.cid in restored)
        return Splice(plan, slots, request, loaded, in_place)


def is_in_place(meta, start: int, tokens) -> bool:
    """Whether a chunk spliced at ``start`` of ``tokens`` sits where and behind what its KV was
    computed (same position, same preceding token ids): then its KV is a full prefill's."""
    return bool(meta.context) and start == meta.canonical_start and context_digest(tokens[:start]) == meta.context


def blend_plan(splice: Splice, policy: BlendPolicy, layers: int, extended: int) -> tuple[BlendPlan | None, dict]:
    """The blend pass's plan for an admitted splice (None: nothing to recompute) and its usage."""
    plan = splice.plan
    segments = [(s.start, s.length) for s in plan.segments if s.start not in splice.in_place]
    gaps = plan.gaps
    chunk_positions = policy.select(segments)
    budget = policy.deviation_budget(segments) if layers > 1 else 0
    check_layer = policy.plan_check_layer(layers)
    positions = sorted(set(chunk_positions) | set(gaps))
    blend = (BlendPlan(plan.end, tuple(positions), tuple(segments), budget, check_layer, tuple(gaps),
                       **policy.plan_fields(segments, layers))
             if positions or budget or (policy.scales_attention and segments) else None)  # APE: no recompute
    spliced = plan.end - plan.base - len(gaps)
    probed, probe_layers = policy.probe_cost(segments, layers, extended) if budget else (0, 0)
    recomputed = len(chunk_positions) + budget
    # The policy that shaped this request: it recomputed chunk tokens, or (APE) its extend attends
    # to spliced chunks by the policy's rule; else the chunks were served as spliced ("none").
    applied = recomputed > 0 or (policy.scales_attention and bool(segments))
    usage = splice_usage(namespace=splice.request.namespace, spliced=spliced,
                         recomputed=recomputed, probed=probed,
                         probe_layers=probe_layers, extended=extended, loaded=splice.loaded_tokens,
                         gaps=len(gaps), policy_label=policy.label if applied else "none", timings=splice.timings,
                         in_place=sum(s.length for s in plan.segments if s.start in splice.in_place))
    return blend, usage
