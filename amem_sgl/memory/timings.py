"""Where a memory turn's time to first token goes: ``usage.amem.timings`` (seconds).

HTTP process (this module's callers measure them on ``time.perf_counter``):

* ``ingress_s`` -- the OpenAI memory middleware saw the request to the conversion hook's start
  (body read and rewrite, FastAPI's request model, the hop to the conversion's executor thread);
* ``convert_s`` -- SGLang's own conversion of the OpenAI request (chat template + tokenization of
  the client's messages); ``recall_s`` -- embedding and index search; ``compose_s`` -- the memory
  prompt's template and token ids; ``guard_s`` -- the fidelity guard's probe (guarded turns only);
  ``plan_s`` -- the rest of the conversion hook (namespace and session checks, hints, bookkeeping).

Scheduler (``amem_sgl.cache.usage``: the usage record reaches this process in ``meta_info["amem"]``,
the path ``recomputed_tokens`` takes; no other channel):

* ``dispatch_s`` -- end of the conversion to the scheduler receiving it (tokenizer manager,
  validation hooks, ZMQ); ``queue_s`` -- waiting for admission (``match_s``, the prefix matches of
  that wait, is inside it); ``splice_s`` -- allocation, restore, KV copy and re-rotation at
  admission; ``schedule_s`` -- admission to the batch's forward (the rest of the scheduling round);
  ``blend_probe_s`` / ``blend_s`` -- the blend pass's probe and recompute forwards; ``extend_s`` --
  the batch's own forward (the first token is sampled in it). Where the blend pass is folded into
  that forward (CPU: amem_sgl.blend.fold) there is no ``blend_s``: ``blend_fold_s`` is building
  the folded batch, and ``extend_s`` covers both passes.
* ``total_s`` -- conversion start to the end of the first token's forward;
* ``output_s`` (streamed turns) -- that forward's end to the first output reaching this process's
  tokenizer manager (output processing, detokenizer, ZMQ); what a client measures beyond
  ``ingress_s + total_s + output_s`` is the HTTP way in and the SSE way out.

Both processes read CLOCK_MONOTONIC (``perf_counter`` on Linux), so a scheduler stamp and an HTTP
one subtract. Streamed responses carry no meta_info: the records are kept here per request id as
the tokenizer manager receives them (:func:`around_update_meta_info`), and the streamed usage
chunk gets ``usage.amem`` from them (:func:`around_streaming_usage`, the request found by the
context variable the OpenAI memory middleware sets).

A turn with ``n > 1`` is several scheduler requests (SGLang's parallel sampling: a prefix request
with ``max_new_tokens=0`` -- the one that splices or prefills the prompt -- then ``n`` copies, each
with a fresh uuid rid regenerated from the turn's suffixed ``<rid>_<i>``). :func:`around_regenerate_rid`
maps those rids back to the turn's, so every sub-request's record is kept under the turn
(:func:`turn_records`), the prefix request's first: its response never reaches the OpenAI route.
"""

from __future__ import annotations

import collections
import contextvars
import re
import threading
import time

from amem_sgl import sglang_compat as sgl
from amem_sgl.metrics import merge_usage

USAGE_KEY = "amem"
DIGITS = 4
HTTP_PHASES = ("convert_s", "recall_s", "compose_s", "guard_s")
SCHEDULER_PHASES = ("queue_s", "match_s", "splice_s", "blend_probe_s", "blend_s", "blend_fold_s", "extend_s")
# The order phases are listed in (a breakdown table's columns); match_s is inside queue_s.
PHASES = ("ingress_s", "convert_s", "recall_s", "compose_s", "guard_s", "plan_s", "dispatch_s", "queue_s", "match_s", "splice_s",
          "schedule_s", "blend_probe_s", "blend_s", "blend_fold_s", "extend_s", "total_s", "output_s")

CURRENT_RID: contextvars.ContextVar[str | None] = contextvars.ContextVar("amem_rid", default=None)
# turn rid -> {sub-request rid: its usage records}, in the order the sub-requests reported
_records: collections.OrderedDict[str, dict] = collections.OrderedDict()
_parents: collections.OrderedDict[str, str] = collections.OrderedDict()  # sub-request rid -> turn rid
_stamps: collections.OrderedDict[str, dict] = collections.OrderedDict()  # rid -> received_at, output_at
_lock = threading.Lock()

STREAMING_USAGE_TARGET = f"{sgl.UsageProcessor.__module__}.{sgl.UsageProcessor.__qualname__}.calculate_streaming_usage"
META_INFO_TARGET = f"{sgl.TokenizerManager.__module__}.{sgl.TokenizerManager.__qualname__}.update_request_meta_info"
_SUFFIX = re.compile(r"^(.+)_\d+$")  # SGLang's batch normalisation: rid -> rid_0 .. rid_{n-1}


def merge(http: dict, records) -> dict:
    """One turn's timings from its plan's HTTP phases (with ``started_at``/``sent_at`` stamps) and
    the scheduler usage records of its response (``meta_info["amem"]``; several for n > 1: the
    first one's -- the prefix request's, which spliced or prefilled the prompt once)."""
    out = {k: http[k] for k in HTTP_PHASES if k in http}
    if "started_at" in http and "sent_at" in http:
        out["plan_s"] = max(http["sent_at"] - http["started_at"] - sum(out.values()), 0.0)
    if "started_at" in http and "received_at" in http:
        out["ingress_s"] = max(http["started_at"] - http["received_at"], 0.0)
    sched = next((r.get("timings") for r in records or () if isinstance(r, dict) and r.get("timings")), None)
    if sched:
        out.update({k: sched[k] for k in SCHEDULER_PHASES if k in sched})
        recv, done = sched.get("recv_at"), sched.get("done_at")
        if recv is not None and "sent_at" in http:
            out["dispatch_s"] = max(recv - http["sent_at"], 0.0)
        if recv is not None and done is not None:
            admitted = recv + sched.get("queue_s", 0.0) + sched.get("splice_s", 0.0)
            forwards = sum(sched.get(k, 0.0) for k in ("blend_probe_s", "blend_s", "blend_fold_s", "extend_s"))
            out["schedule_s"] = max(done - forwards - admitted, 0.0)
        if done is not None and "started_at" in http:
            out["total_s"] = done - http["started_at"]
        if done is not None and "output_at" in http:
            out["output_s"] = max(http["output_at"] - done, 0.0)
    return {k: round(out[k], DIGITS) for k in PHASES if k in out}


def keep_records(rid: str, records, sub_rid: str | None = None) -> None:
    """Keep the usage records of sub-request ``sub_rid`` (default: ``rid`` itself) of turn ``rid``."""
    with _lock:
        _records.setdefault(rid, {})[sub_rid or rid] = records
        while len(_records) > 4096:
            _records.popitem(last=False)


def turn_rid(rid: str | None) -> str | None:
    """The memory turn's rid of (sub-)request ``rid``: itself unless it is a parallel-sampling copy."""
    with _lock:
        return _parents.get(rid, rid) if rid else rid


def stamp(rid: str, name: str, at: float) -> None:
    """Keep a ``*_at`` clock reading of request ``rid`` made outside its plan (before it exists)."""
    with _lock:
        _stamps.setdefault(rid, {})[name] = at
        while len(_stamps) > 4096:
            _stamps.popitem(last=False)


def stamps(rid: str) -> dict:
    with _lock:
        return dict(_stamps.get(rid, {}))


def records_for(rid: str) -> list | None:
    """All usage records kept for turn ``rid`` (its sub-requests', prefix request first), once."""
    with _lock:
        kept = _records.pop(rid, None)
    if kept is None:
        return None
    return [r for records in kept.values() for r in (records if isinstance(records, list) else [records])]


def _plan_rid(rid) -> str | None:
    """The memory turn ``rid`` belongs to (itself, a mapped sub-request, or SGLang's ``<rid>_<i>``)."""
    from amem_sgl.memory import layer as memory

    layer = memory.ACTIVE
    if layer is None or not isinstance(rid, str):
        return None
    rid = turn_rid(rid)
    if layer.plan_for(rid) is not None:
        return rid
    suffixed = _SUFFIX.match(rid)
    return suffixed.group(1) if suffixed and layer.plan_for(suffixed.group(1)) is not None else None


def around_regenerate_rid(original, obj, *args, **kwargs):
    """AROUND hook for ``GenerateReqInput.regenerate_rid`` (HTTP process): a memory turn's
    parallel-sampling sub-request (n > 1) gets a fresh rid; remember whose turn it is."""
    before = obj.rid
    result = original(obj, *args, **kwargs)
    pairs = zip(before, obj.rid) if isinstance(before, list) and isinstance(obj.rid, list) else [(before, obj.rid)]
    for old, new in pairs:
        turn = _plan_rid(old)
        if turn is not None and isinstance(new, str):
            with _lock:
                _parents[new] = turn
                while len(_parents) > 16384:
                    _parents.popitem(last=False)
    return result


def around_update_meta_info(original, manager, meta_info, state, *args, **kwargs):
    """AROUND hook for ``TokenizerManager.update_request_meta_info`` (HTTP process): keeps a memory
    turn's scheduler usage records for its streamed usage chunk."""
    result = original(manager, meta_info, state, *args, **kwargs)
    from amem_sgl.memory import layer as memory

    sub_rid = meta_info.get("id")
    rid = turn_rid(sub_rid)
    if USAGE_KEY in meta_info and memory.ACTIVE is not None and memory.ACTIVE.plan_for(rid) is not None:
        if getattr(getattr(state, "obj", None), "stream", False) and "output_at" not in stamps(rid):
            stamp(rid, "output_at", time.perf_counter())  # streamed: it came with the first output
        keep_records(rid, meta_info[USAGE_KEY], sub_rid)
    return result


def around_streaming_usage(original, *args, **kwargs):
    """AROUND hook for the streamed usage chunk: ``usage.amem`` of a memory turn, as a non-streamed
    response reports it (amem_sgl.plugin), with its timings."""
    usage = original(*args, **kwargs)
    rid = CURRENT_RID.get()
    if rid is None:
        return usage
    from amem_sgl.memory.openai_routes import memory_usage, turn_timings

    records = records_for(rid)
    recalled = memory_usage(rid)
    if recalled is None:
        return usage
    merged = merge_usage([records]) or {"spliced_tokens": 0, "recomputed_tokens": 0}
    usage.amem = {**merged, "memory": recalled, "timings": turn_timings(rid, records)}
    return usage


def install_hooks() -> None:
    """Register the hooks in this (HTTP) process; applied with SGLang's other late hooks."""
    sgl.add_around_hook(sgl.REGENERATE_RID_TARGET, around_regenerate_rid)
    sgl.add_around_hook(META_INFO_TARGET, around_update_meta_info)
    sgl.add_around_hook(STREAMING_USAGE_TARGET, around_streaming_usage)
    sgl.apply_hooks()
