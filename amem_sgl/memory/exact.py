"""Exact mode: a session's memory as an exact prefix hit plus only the newly recalled chunks.

A session in exact mode keeps its **working set** in a stable order: chunks recalled in earlier
turns stay where they are and each turn's newly recalled chunks are appended after them. Its turns
declare their chunk spans ``exact`` (amem_sgl.chunks.hints: nothing spliced or blended, prefixes
kept under the namespace's exact salt) with ``capture`` (a chunk computed in place becomes its
chunk node for other turns): the previous turn left [system][working set] in the tree under that
salt, so the next turn is an exact prefix hit through the old working set and computes only the new
chunks, its history and its question. The KV it attends to is what a full prefill of the same
prompt computes, by construction (same tokens, same positions, same context; a prefix evicted from
the tree is prefilled again), so 0 tokens are spliced or recomputed and the answer is the full
prefill's. Splicing with ``capture`` alone would not do: a newly recalled chunk already resident
(registered at remember time, or captured by another turn) would be spliced.

The working set is bounded: when appending would pass ``max_tokens`` (default
:data:`DEFAULT_MAX_TOKENS`, config ``amem.memory.exact_working_set_tokens`` when present), the
session starts a new base: the working set becomes this turn's recalled chunks alone, in the order
they were remembered (one full prefill of them, then prefix hits again). Replayed on the cost
curve's recall sequence an append-only set grows to ~16K tokens, past SmolLM2's 8K context.
"""

from __future__ import annotations

import time
from typing import Sequence

from amem_sgl.memory.fit import FittedPlan
from amem_sgl.memory.turns import phases

FIDELITY_MODES = ("exact", "guarded", "fast")
# Tokens of chunks in an exact-mode working set before a new base is started (SmolLM2's context is
# 8K; half of it leaves room for the system prompt, history and answer).
DEFAULT_MAX_TOKENS = 4096


def validate_fidelity(fidelity: str | None) -> str | None:
    if fidelity is not None and fidelity not in FIDELITY_MODES:
        raise ValueError(f"fidelity must be one of {', '.join(FIDELITY_MODES)}, got {fidelity!r}")
    return fidelity


def extend_working_set(working: Sequence[str], recalled: Sequence[str], tokens: dict[str, int],
                       max_tokens: int) -> tuple[list[str], list[str], bool]:
    """(new working set, the chunks new to it, whether a new base was started).

    ``working`` is the session's current order, ``recalled`` this turn's chunks in the order they
    were remembered, ``tokens`` every chunk's token count."""
    if max_tokens < 1:
        raise ValueError("max_tokens must be positive")
    have = set(working)
    new = [c for c in dict.fromkeys(recalled) if c not in have]
    extended = list(working) + new
    if sum(tokens[c] for c in extended) <= max_tokens or not working:
        return extended, new, False
    base = list(dict.fromkeys(recalled))
    total, kept = 0, []
    for c in base:  # the new base alone may still be too long: keep what fits, in order
        if kept and total + tokens[c] > max_tokens:
            break
        kept.append(c)
        total += tokens[c]
    return kept, kept, True


def exact_turn(store, namespace: str, hits, working: Sequence[str] | None, max_tokens: int):
    """(the turn's chunks in prompt order, the chunk ids new to the working set, rebased?).

    ``hits`` are this turn's recalled (chunk, score) pairs in the order they were remembered;
    ``working`` the session's working set (None: no session, the recalled chunks alone)."""
    recalled = {c.chunk_id: c for c, _ in hits}
    if working is None:
        return list(recalled.values()), list(recalled), False
    known = {cid: store.get(namespace, cid) for cid in working if cid not in recalled} | recalled
    order, new, rebased = extend_working_set(working, list(recalled), {cid: len(c.token_ids) for cid, c in known.items()},
                                             max_tokens)
    return [known[cid] for cid in order], new, rebased


def plan_exact_turn(layer, namespace: str, messages: Sequence[dict], session, reserve_tokens: int = 0):
    """An exact-mode turn of ``layer`` (a MemoryLayer): its spans sent ``exact`` (nothing spliced or
    blended, the namespace's exact salt) with ``capture`` (chunks computed here become nodes); None
    when it has no chunk (or none fits the context).

    Only a session whose own fidelity is exact grows its working set; an exact turn (the
    ``X-Amem-Fidelity: exact`` override) of any other session serves that session's pinned
    working set exactly -- nothing recalled, ``session.chunk_ids`` unchanged."""
    started = time.perf_counter()
    if session is not None and session.fidelity != "exact":
        hits = [(c, 1.0) for c in layer._session_chunks(session)]
        with layer._lock:
            session.turns += 1
        chunks, new = [c for c, _ in hits], []
    else:
        query = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        hits = sorted(layer.recall(namespace, query), key=lambda h: h[0].created)
        with layer._lock:
            chunks, new, rebased = exact_turn(layer.store, namespace, hits, session.chunk_ids if session else None,
                                              layer.exact_max_tokens)
            if session is not None:
                session.chunk_ids = [c.chunk_id for c in chunks]
                session.turns, session.rebases = session.turns + 1, session.rebases + rebased
    if not chunks:
        return None
    scores, recalled = {c.chunk_id: s for c, s in hits}, time.perf_counter()
    # Fitting the context drops chunks from this turn only: the session's working set stays whole.
    fitted = layer.fit(chunks, [scores.get(c.chunk_id, 1.0) for c in chunks],
                       lambda cs: layer.compose(namespace, messages, cs), reserve_tokens)
    if fitted is None:
        return None
    chunks, turn_scores, (ids, spans), dropped = fitted
    return FittedPlan(ids, layer.hints(namespace, spans, exact=True), namespace, [c.chunk_id for c in chunks],
                      turn_scores, session.session_id if session else None,
                      "exact", tuple(new), timings=phases(started, recalled, time.perf_counter()),
                      dropped_chunks=dropped)
