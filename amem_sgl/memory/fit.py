"""Fitting a memory turn's recalled chunks to the model's context.

A turn that fits the context without memory must not be pushed past it by memory: the composed
prompt plus the tokens the request will generate (its ``max_tokens``) must fit, so the
lowest-scored recalled chunks are left out until they do, and a turn no chunk fits is served
without memory (a plain turn). :class:`FittedPlan` reports how many were left out in
``usage.amem.memory.dropped_chunks``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Sequence

from amem_sgl.memory.store import MemoryChunk
from amem_sgl.memory.turns import Plan

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FittedPlan(Plan):
    """A :class:`Plan` that fits the model's context: ``dropped_chunks`` recalled chunks (the
    lowest-scored) were left out so the composed prompt plus the tokens the request will generate
    fit; reported in ``usage.amem.memory``."""

    dropped_chunks: int = 0

    def report(self) -> dict:
        return {**super().report(), "dropped_chunks": self.dropped_chunks}


def fit_chunks(chunks: Sequence[MemoryChunk], scores: Sequence[float], compose: Callable, limit: int | None,
               reserve_tokens: int = 0):
    """(chunks, scores, composed, dropped): the turn's chunks that fit ``limit`` tokens (the model's
    context), in their order, and ``compose(chunks)`` -> (ids, spans) of them; None when no chunk
    fits (a plain turn).

    The composed prompt plus ``reserve_tokens`` (what the request will generate; at least one
    token, as SGLang counts) must fit ``limit``: the lowest-scored chunks are dropped until it does
    (equal scores: the later one in the prompt first, so the prefix before it stays the same).
    With no ``limit`` (outside a server) nothing is dropped."""
    chunks, scores = list(chunks), list(scores)
    composed = compose(chunks)
    need = max(int(reserve_tokens or 0), 1)
    if limit is None or not chunks or len(composed[0]) + need <= limit:
        return chunks, scores, composed, 0
    total, dropped = len(composed[0]), set()
    # Chunks sit in the prompt as their own ids (amem_sgl.chunks.compose.place): leaving one out
    # shortens it by its length.
    for i in sorted(range(len(chunks)), key=lambda i: (scores[i], -i)):
        if total + need <= limit:
            break
        dropped.add(i)
        total -= len(chunks[i].token_ids)
    while True:
        kept = [i for i in range(len(chunks)) if i not in dropped]
        if not kept or total + need > limit:
            logger.info("amem memory: no recalled chunk fits the model's context (%d tokens) beside this turn "
                        "and %d reserved tokens: a plain turn", limit, need)
            return None
        composed = compose([chunks[i] for i in kept])
        if len(composed[0]) + need <= limit:
            break
        worst = min(kept, key=lambda i: (scores[i], -i))  # a composer that is not additive: drop one more
        dropped.add(worst)
        total = len(composed[0]) - len(chunks[worst].token_ids)
    logger.info("amem memory: %d of %d recalled chunks left out so the prompt (%d tokens) and %d reserved tokens "
                "fit the model's context (%d tokens)", len(dropped), len(chunks), len(composed[0]), need, limit)
    return [chunks[i] for i in kept], [scores[i] for i in kept], composed, len(dropped)
