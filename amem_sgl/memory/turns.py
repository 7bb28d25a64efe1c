"""A memory turn as the memory layer plans it: the :class:`Plan` (what goes to the scheduler and
what the response reports), the :class:`Session` it may belong to, the OpenAI messages it is
planned from, and how its time is counted."""

from __future__ import annotations

import contextlib
import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class Plan:
    """A composed memory turn: what goes to the scheduler and what the response reports."""

    input_ids: list[int]
    kv_hints: dict
    namespace: str
    chunk_ids: list[str]
    scores: list[float]
    session_id: str | None
    fidelity: str | None = None
    new_chunk_ids: tuple[str, ...] = ()  # exact mode: chunks this turn appended to the working set
    # Where the turn's time went (amem_sgl.memory.timings): recall_s, compose_s, then the OpenAI
    # hooks' phases and stamps.
    timings: dict = dataclasses.field(default_factory=dict, compare=False)

    def report(self) -> dict:
        out = {"namespace": self.namespace, "chunks": self.chunk_ids,
               "scores": [round(s, 4) for s in self.scores], "session_id": self.session_id}
        if self.fidelity is not None:
            out.update(fidelity=self.fidelity, new_chunks=list(self.new_chunk_ids))
        return out


@dataclasses.dataclass
class Session:
    session_id: str
    namespace: str
    chunk_ids: list[str]
    created: float
    last_used: float
    turns: int = 0
    # Its level (exact | guarded | fast; a turn's X-Amem-Fidelity wins). "exact": the working set grows
    # in a stable order and turns are plain prefills (memory.exact); None: the server's default.
    fidelity: str | None = None
    rebases: int = 0  # exact mode: times the bounded working set started over
    # What warming cost: prompt and cached tokens of the warm request, and its amem usage (spliced,
    # recomputed, ...) when chunks were spliced.
    warm: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return {"session_id": self.session_id, "namespace": self.namespace, "chunk_ids": self.chunk_ids,
                "created": self.created, "last_used": self.last_used, "turns": self.turns, "warm": self.warm,
                "fidelity": self.fidelity, "rebases": self.rebases}


def message_dicts(messages) -> list[dict]:
    """OpenAI chat messages (pydantic objects or dicts) as {role, content} with text content."""
    out = []
    for m in messages:
        m = m if isinstance(m, dict) else m.model_dump()
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        out.append({"role": m.get("role"), "content": content or ""})
    return out


@contextlib.contextmanager
def embedding_threads():
    """Embed a query on ``AMEM_SGL_RECALL_THREADS`` (default 1) intra-op threads: one short query
    gains nothing from more, and on a busy machine (the scheduler, other servers) two OpenMP threads
    spin against each other -- measured on 2 cores: 0.11-0.84 s per query with 2, 0.017-0.023 s with 1."""
    import torch

    before, wanted = torch.get_num_threads(), int(os.environ.get("AMEM_SGL_RECALL_THREADS", "1"))
    if wanted == before:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def phases(started: float, recalled: float, composed: float) -> dict:
    return {"recall_s": recalled - started, "compose_s": composed - recalled}
