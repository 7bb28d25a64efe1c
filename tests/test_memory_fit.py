"""A memory turn fits the model's context: recalled chunks that would push the composed prompt (plus
the tokens the request will generate, ``reserve_tokens``) past ``context_tokens`` are dropped, the
lowest-scored first; none fitting is a plain turn (None). Real tokenizer and composer, real store;
nothing is sent to a server (chunks remembered with ``first_use``)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from amem_sgl.chunks.hints import parse_kv_hints
from amem_sgl.memory.layer import MemoryLayer
from amem_sgl.memory.turns import Session

CONTEXT = 8192  # SmolLM2's
TOPICS = ["Carol's garden", "Carol's bicycle", "Carol's violin", "Carol's kitchen"]


def _chunk_text(topic: str) -> str:
    """~200 tokens about one topic (one chunk: under chunk_tokens=256)."""
    return " ".join(f"{topic} detail number {i} is remembered as item {i * 7} of the list." for i in range(12))


@pytest.fixture(scope="module")
def layer(tmp_path_factory):
    from amem_sgl.config import AmemConfig
    from amem_sgl.models import ensure_embedded_model

    config = AmemConfig()
    config = dataclasses.replace(config, memory=dataclasses.replace(
        config.memory, dir=str(tmp_path_factory.mktemp("fit-memory")), top_k=4, min_score=-1.0))
    layer = MemoryLayer(config, base_url="http://unused", model_id="fit-test", tokenizer_path=str(ensure_embedded_model()))
    rows = asyncio.run(layer.remember("fit", [(_chunk_text(t), {}) for t in TOPICS], prefill="first_use"))
    assert len(rows) == len(TOPICS) and all(150 < r["tokens"] <= 256 for r in rows), rows
    return layer


@pytest.fixture
def served_context(monkeypatch):
    """The layer sees the served context length (None outside a server)."""
    monkeypatch.setattr(MemoryLayer, "context_tokens", property(lambda self: CONTEXT))


QUESTION = "What do you remember about Carol's violin and Carol's garden?"


def _history(layer, tokens: int) -> list[dict]:
    """A chat history of about ``tokens`` tokens, then the question."""
    line = "This is an earlier message of the conversation about the weather and nothing else."
    per = len(layer.encode(line + " "))
    turns = []
    for i in range(tokens // (per * 20) + 1):
        turns += [{"role": "user", "content": " ".join([line] * 10)}, {"role": "assistant", "content": " ".join([line] * 10)}]
    return turns + [{"role": "user", "content": QUESTION}]


def _ranked(layer, query: str) -> list[str]:
    """The recalled chunk ids, best score first."""
    return [c.chunk_id for c, _ in sorted(layer.recall("fit", query), key=lambda h: -h[1])]


def test_a_short_prompt_keeps_every_recalled_chunk(layer, served_context):
    plan = layer.plan_chat("fit", [{"role": "user", "content": QUESTION}], None, reserve_tokens=256)
    assert sorted(plan.chunk_ids) == sorted(_ranked(layer, QUESTION)) and len(plan.chunk_ids) == 4
    assert plan.dropped_chunks == 0 and plan.report()["dropped_chunks"] == 0


def test_a_long_history_drops_the_lowest_scored_chunks_until_the_prompt_fits(layer, served_context):
    messages = _history(layer, 7500)
    history = len(layer.compose("fit", messages, [])[0])
    assert 7300 < history < 7700, history
    everything = layer.compose("fit", messages, [layer.store.get("fit", c) for c in _ranked(layer, QUESTION)])[0]
    assert len(everything) + 64 > CONTEXT  # with every chunk it would not fit (SGLang: 400)
    for reserve in (0, 64, 400):
        plan = layer.plan_chat("fit", messages, None, reserve_tokens=reserve)
        assert plan is not None and len(plan.input_ids) + max(reserve, 1) <= CONTEXT, (reserve, len(plan.input_ids))
        ranked = _ranked(layer, QUESTION)
        kept = len(plan.chunk_ids)
        assert 1 <= kept < 4 and sorted(plan.chunk_ids) == sorted(ranked[:kept]), (plan.chunk_ids, ranked)
        assert plan.dropped_chunks == 4 - kept and plan.report()["dropped_chunks"] == 4 - kept
        # What is kept goes out as it would have: its spans, its scores, one more chunk would not fit.
        assert len(plan.scores) == kept and len(parse_kv_hints(plan.kv_hints).spans) == kept
        more = layer.compose("fit", messages, [layer.store.get("fit", c) for c in ranked[:kept + 1]])[0]
        assert len(more) + max(reserve, 1) > CONTEXT
    # A larger reserve keeps fewer chunks.
    assert len(layer.plan_chat("fit", messages, None, reserve_tokens=400).chunk_ids) < \
        len(layer.plan_chat("fit", messages, None, reserve_tokens=0).chunk_ids)


def test_no_chunk_fitting_is_a_plain_turn(layer, served_context):
    messages = _history(layer, 7500)
    history = len(layer.compose("fit", messages, [])[0])
    assert layer.plan_chat("fit", messages, None, reserve_tokens=CONTEXT - history - 10) is None
    assert layer.plan_completion("fit", " ".join(["weather"] * 8100), reserve_tokens=16) is None


def test_completions_drop_chunks_too(layer, served_context):
    prompt = " ".join(["Earlier text about the weather."] * 1300) + " " + QUESTION
    plan = layer.plan_completion("fit", prompt, reserve_tokens=128)
    assert plan is not None and len(plan.input_ids) + 128 <= CONTEXT
    assert 1 <= len(plan.chunk_ids) < 4 and plan.dropped_chunks == 4 - len(plan.chunk_ids)
    short = layer.plan_completion("fit", QUESTION, reserve_tokens=128)
    assert len(short.chunk_ids) == 4 and short.dropped_chunks == 0


def test_an_exact_sessions_turn_drops_chunks_but_keeps_its_working_set(layer, served_context):
    ids = [c.chunk_id for c in layer.store.list("fit")]
    now = time.time()
    session = Session("fit-exact", "fit", list(ids), now, now, fidelity="exact")
    layer.sessions[session.session_id] = session
    try:
        plan = layer.plan_chat(None, _history(layer, 7500), session.session_id, reserve_tokens=64)
        assert plan.fidelity == "exact" and len(plan.input_ids) + 64 <= CONTEXT
        assert 1 <= len(plan.chunk_ids) < 4 and plan.dropped_chunks == 4 - len(plan.chunk_ids)
        assert session.chunk_ids == ids  # the working set stays whole for the next (shorter) turn
        short = layer.plan_chat(None, [{"role": "user", "content": QUESTION}], session.session_id, reserve_tokens=64)
        assert short.chunk_ids == ids and short.dropped_chunks == 0
    finally:
        layer.sessions.pop(session.session_id, None)
