"""What the cache counts and reports: tree-event counters, and the per-request usage record.

The usage record of a spliced request (``req.customized_info["amem"]``; ``computed_chunk_tokens``:
the chunk tokens the request prefilled itself, past its cached and spliced prefix) reaches the response's
``meta_info["amem"]`` and the OpenAI ``usage.amem`` (amem_sgl.plugin), and the Prometheus counters
(amem_sgl.metrics) when the server runs with ``--enable-metrics``.

Its ``timings`` are the scheduler's share of the request's time to first token, in seconds: the
match and queue wait before admission, the splice at admission, the blend pass (probe and
recompute forwards) and the extend of its batch, plus two ``time.perf_counter`` stamps (``recv_at``:
the scheduler received it, ``done_at``: its first token's forward ended) with which the HTTP
process places them on its own clock (CLOCK_MONOTONIC, one per machine). The record is sent with
the request's first output, so phases that end before its first token are all in it. On CUDA the
phases are asynchronous launches unless ``AMEM_SGL_TIMING_SYNC=1`` (then each phase boundary waits
for the device); the hot path never synchronises by default.
"""

from __future__ import annotations

import dataclasses
import os
import time

USAGE_KEY = "amem"  # req.customized_info key -> meta_info["amem"] of the response
TIMINGS_KEY = "timings"
TIMING_SYNC_ENV = "AMEM_SGL_TIMING_SYNC"
_SYNC = os.environ.get(TIMING_SYNC_ENV, "") not in ("", "0")


def clock() -> float:
    """``time.perf_counter()``; with ``AMEM_SGL_TIMING_SYNC=1`` on CUDA, after the device finished."""
    if _SYNC:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return time.perf_counter()


def usage_of(req) -> dict | None:
    """The usage record attached to ``req`` (None: nothing spliced)."""
    info = getattr(req, "customized_info", None) or {}
    records = info.get(USAGE_KEY)
    return records[0] if records else None


def add_timing(req, name: str, seconds: float) -> None:
    """Add ``seconds`` to phase ``name`` of ``req``'s usage record (a request without one: nothing)."""
    usage = usage_of(req)
    if usage is not None:
        timings = usage.setdefault(TIMINGS_KEY, {})
        timings[name] = round(timings.get(name, 0.0) + seconds, 6)


def stamp(req, name: str, at: float) -> None:
    """Record the clock reading ``at`` (a ``*_at`` stamp) in ``req``'s usage record."""
    usage = usage_of(req)
    if usage is not None:
        usage.setdefault(TIMINGS_KEY, {})[name] = at


@dataclasses.dataclass
class CacheStats:
    """Counters of tree events since start (monotonic; never reset by a cache flush)."""

    match_calls: int = 0
    match_hit_tokens: int = 0
    match_query_tokens: int = 0
    inserted_tokens: int = 0
    evicted_tokens: int = 0
    chunks_registered: int = 0
    chunk_hits: int = 0  # admitted splices: chunks spliced (device or restored)
    in_place_chunks: int = 0  # of those, spliced in place (canonical position and context): never recomputed
    chunk_misses: int = 0  # admitted splices: declared chunks neither resident nor restorable
    spliced_tokens: int = 0
    spliced_requests: int = 0
    splice_fallbacks: int = 0  # admissions that could not splice what the match promised: recomputed
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
    fetches_started: int = 0  # background fetches from the residency service
    registered_tokens: int = 0  # chunk tokens prefilled by register requests
    chunks_captured: int = 0  # chunks kept from a request that computed them in place (first use)
    captured_tokens: int = 0
    captures_skipped: int = 0  # spans a capture request released without keeping (no slots, or never computed)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def splice_usage(*, namespace: str, spliced: int, recomputed: int, probed: int, probe_layers: int,
                 extended: int, loaded: int, gaps: int, policy_label: str, timings: dict | None = None,
                 in_place: int = 0) -> dict:
    """The usage record of one spliced request (``timings``: its scheduler phases so far)."""
    return {
        "namespace": namespace, "spliced_tokens": spliced,
        "recomputed_tokens": recomputed, "probed_tokens": probed,
        "probe_layers": probe_layers if probed else 0,
        "extended_tokens": extended,
        "loaded_tokens": loaded,
        "gap_tokens": gaps,
        "in_place_tokens": in_place,  # spliced where their KV was computed: exact, never recomputed
        "blend_policy": policy_label,  # the caller's: "none" when no policy shaped the request
        TIMINGS_KEY: dict(timings or {}),
    }


COMPUTED_CHUNKS_KEY = "computed_chunk_tokens"


def computed_chunk_tokens(req, request) -> int:
    """Tokens of ``request``'s chunk spans (``req``'s parsed chunk action) at or past ``req``'s
    cached prefix (``req.prefix_len``: the radix hit and what was spliced, at admission): the chunk
    tokens its own prefill computes (a blend pass's recompute of spliced tokens is
    ``recomputed_tokens``)."""
    prefix = int(getattr(req, "prefix_len", 0) or 0)
    return sum(max(0, s.end - max(s.start, prefix)) for s in request.spans)


def attach_usage(req, usage: dict, request, metrics=None) -> None:
    """Report ``usage`` once in the response's meta_info["amem"] (and the metrics, when on), with
    the chunk tokens this request computes itself (:func:`computed_chunk_tokens` of ``request``,
    the chunk action the cache parsed for it)."""
    usage = {**usage, COMPUTED_CHUNKS_KEY: computed_chunk_tokens(req, request)}
    req.customized_info = {**(req.customized_info or {}), USAGE_KEY: [usage]}
    if metrics is not None:
        metrics.record(usage)
