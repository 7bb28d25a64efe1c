"""Exact mode (amem_sgl.memory.exact): a session's working set grows in a stable order and its turns
are exact prefills (hints ``exact``), so each turn answers like a full prefill of the same prompt."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import requests

from amem_sgl.chunks.hints import parse_kv_hints
from amem_sgl.config import AmemConfig
from amem_sgl.memory.exact import extend_working_set, validate_fidelity


def test_working_set_keeps_its_order_appends_new_chunks_and_rebases_when_full():
    tokens = {c: 10 for c in "abcdef"}
    assert extend_working_set([], ["b", "a"], tokens, 100) == (["b", "a"], ["b", "a"], False)
    # Already-held chunks stay where they are, whatever this turn's order; new ones go after them.
    assert extend_working_set(["b", "a"], ["a", "c", "b"], tokens, 100) == (["b", "a", "c"], ["c"], False)
    assert extend_working_set(["b", "a", "c"], ["c"], tokens, 100) == (["b", "a", "c"], [], False)
    # Full: a new base of this turn's chunks alone (as much of it as fits, in order).
    assert extend_working_set(["a", "b", "c"], ["d", "e"], tokens, 40) == (["d", "e"], ["d", "e"], True)
    assert extend_working_set(["a"], ["b", "c", "d"], tokens, 25) == (["b", "c"], ["b", "c"], True)
    with pytest.raises(ValueError):
        validate_fidelity("exactly")


FACTS = ["Mira Okafor lives in Lisbon and works as a nurse.", "Mira Okafor's dog is named Biscuit.",
         "Mira Okafor's favourite colour is green.", "Tomas Berg works at Volvo in Gothenburg."]


@pytest.fixture(scope="module")
def layer(amem_server, tmp_path_factory):
    """A memory layer of its own (own store) planning turns for the shared real server."""
    from amem_sgl.memory.layer import MemoryLayer

    config = AmemConfig()
    config = dataclasses.replace(config, memory=dataclasses.replace(
        config.memory, dir=str(tmp_path_factory.mktemp("exact-memory")), top_k=1))
    info = requests.get(f"{amem_server.url}/get_model_info", timeout=30).json()
    layer = MemoryLayer(config, base_url=amem_server.url, model_id="exact-test", tokenizer_path=info["tokenizer_path"])
    # Remembered with KV registered (prefill=remember): every chunk is resident, so a splicing turn
    # would splice it; exact mode must not.
    asyncio.run(layer.remember("exactns", [(f, {}) for f in FACTS]))
    return layer


def _generate(url: str, input_ids: list[int], **extra) -> dict:
    body = {"input_ids": input_ids, "sampling_params": {"max_new_tokens": 16, "temperature": 0.0}, **extra}
    reply = requests.post(f"{url}/generate", json=body, timeout=600)
    assert reply.status_code == 200, reply.text
    return reply.json()


@pytest.mark.slow
def test_exact_turns_are_a_prefix_hit_plus_new_chunks_and_answer_like_a_full_prefill(amem_server, layer):
    session = asyncio.run(layer.start_session("exactns", "Which company does Tomas Berg work at?", None, None,
                                              fidelity="exact"))
    assert session.fidelity == "exact" and len(session.chunk_ids) == 1  # warmed: prefilled, nothing spliced
    assert session.warm["cached_tokens"] < session.warm["prompt_tokens"], session.warm
    assert session.warm["amem"].get("spliced_tokens", 0) == 0, session.warm
    questions = ["Where does Mira Okafor live?", "What is the name of Mira Okafor's dog?",
                 "What is Mira Okafor's favourite colour?"]
    for turn, question in enumerate(questions):
        before = list(session.chunk_ids)
        messages = [{"role": "user", "content": question}]
        plan = layer.plan_chat(None, messages, session.session_id)
        hints = parse_kv_hints(plan.kv_hints)  # an exact prefill: nothing spliced, chunks captured
        assert hints.exact and hints.capture and len(hints.spans) == len(plan.chunk_ids) and plan.fidelity == "exact"
        # The working set kept its order and the newly recalled chunk went after it.
        assert plan.chunk_ids[: len(before)] == before and plan.chunk_ids == session.chunk_ids
        assert len(plan.new_chunk_ids) == 1 and plan.chunk_ids == before + list(plan.new_chunk_ids)
        _, spans = layer.compose("exactns", messages, [layer.store.get("exactns", c) for c in before])
        out = _generate(amem_server.url, plan.input_ids, kv_hints=plan.kv_hints)  # as the OpenAI route sends it
        meta = out["meta_info"]
        amem = meta.get("amem") or {}
        amem = amem[0] if isinstance(amem, list) else amem
        assert amem.get("recomputed_tokens", 0) == 0 and amem.get("spliced_tokens", 0) == 0, amem
        # [system][the earlier working set] was left in the tree by the previous turn (or the warm-up).
        assert meta["cached_tokens"] >= spans[-1][1], (meta["cached_tokens"], spans)
        # A full prefill of the same input ids (fresh cache salt: nothing shared) answers the same.
        full = _generate(amem_server.url, plan.input_ids, cache_salt=f"full-{turn}-{session.session_id}")
        assert full["meta_info"]["cached_tokens"] == 0
        assert out["output_ids"] == full["output_ids"], (out["text"], full["text"])
    assert session.turns == 3 and len(session.chunk_ids) == 4 and session.rebases == 0


@pytest.mark.slow
def test_exact_mode_per_plan_without_a_session_sends_no_spans(layer):
    plan = layer.plan_chat("exactns", [{"role": "user", "content": "Which company does Tomas Berg work at?"}],
                           None, fidelity="exact")
    assert parse_kv_hints(plan.kv_hints).exact and plan.report()["fidelity"] == "exact" and len(plan.chunk_ids) == 1
    default = layer.plan_chat("exactns", [{"role": "user", "content": "Which company does Tomas Berg work at?"}], None)
    assert not parse_kv_hints(default.kv_hints).exact and default.input_ids == plan.input_ids
    from amem_sgl.memory.layer import MemoryError_

    with pytest.raises(MemoryError_):
        layer.plan_chat("exactns", [{"role": "user", "content": "x"}], None, fidelity="exactly")


@pytest.fixture(scope="module")
def local_layer(tmp_path_factory):
    """A memory layer that sends nothing (chunks remembered ``first_use``): planning turns only."""
    from amem_sgl.memory.layer import MemoryLayer
    from amem_sgl.models import ensure_embedded_model

    config = AmemConfig()
    config = dataclasses.replace(config, memory=dataclasses.replace(
        config.memory, dir=str(tmp_path_factory.mktemp("override-memory")), top_k=2))
    layer = MemoryLayer(config, base_url="http://unused", model_id="override-test",
                        tokenizer_path=str(ensure_embedded_model()))
    asyncio.run(layer.remember("overridens", [(f, {}) for f in FACTS], prefill="first_use"))
    return layer


@pytest.mark.parametrize("own", ["fast", "guarded", None])
def test_an_exact_override_serves_a_sessions_pinned_set_exactly_and_leaves_it_pinned(local_layer, own):
    import time

    from amem_sgl.memory.turns import Session

    layer = local_layer
    pinned = [c.chunk_id for c in layer.store.list("overridens") if "Tomas" in c.text]
    now = time.time()
    session = Session(f"override-{own}", "overridens", list(pinned), now, now, fidelity=own)
    layer.sessions[session.session_id] = session
    try:
        ask = [{"role": "user", "content": "Where does Mira Okafor live, and what is her dog called?"}]
        fast = layer.plan_chat(None, ask, session.session_id, fidelity="fast")
        assert fast.chunk_ids == pinned and not parse_kv_hints(fast.kv_hints).exact
        # One turn with X-Amem-Fidelity: exact: the pinned set, exactly (nothing recalled, nothing appended).
        exact = layer.plan_chat(None, ask, session.session_id, fidelity="exact")
        hints = parse_kv_hints(exact.kv_hints)
        assert exact.chunk_ids == pinned and exact.fidelity == "exact" and exact.new_chunk_ids == ()
        assert hints.exact and hints.capture and len(hints.spans) == len(pinned)
        assert exact.input_ids == fast.input_ids  # the same prompt, only sent exactly
        assert session.chunk_ids == pinned and session.rebases == 0
        # Every later turn of the session still uses its pinned chunks.
        later = layer.plan_chat(None, ask, session.session_id, fidelity="fast")
        assert later.chunk_ids == pinned and session.chunk_ids == pinned and session.turns == 3
    finally:
        layer.sessions.pop(session.session_id, None)


def test_an_exact_session_still_grows_its_working_set(local_layer):
    import time

    from amem_sgl.memory.turns import Session

    layer = local_layer
    pinned = [c.chunk_id for c in layer.store.list("overridens") if "Tomas" in c.text]
    now = time.time()
    session = Session("own-exact", "overridens", list(pinned), now, now, fidelity="exact")
    layer.sessions[session.session_id] = session
    try:
        plan = layer.plan_chat(None, [{"role": "user", "content": "Where does Mira Okafor live?"}], session.session_id)
        assert plan.chunk_ids[:1] == pinned and len(plan.chunk_ids) > 1 and plan.new_chunk_ids
        assert session.chunk_ids == plan.chunk_ids
    finally:
        layer.sessions.pop(session.session_id, None)
