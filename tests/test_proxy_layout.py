"""The proxy's layout, session replay, pricing and error paths, without a model (fast).
The end-to-end behaviour against a real upstream is in tests/test_proxy.py."""

from __future__ import annotations

import json
import socket

import pytest
from fastapi.testclient import TestClient

from amem_sgl.proxy import layout, pricing
from amem_sgl.proxy.server import ProxyConfig, create_app
from amem_sgl.proxy.sessions import Session, SessionStore, canonical


def _chunk(i: int) -> dict:
    return {"id": f"{i:064x}", "text": f"Fact number {i}.", "created": float(i)}


def _turn(session, api, body, recalled, known, k=4, drift=0.5, ttl="5m"):
    messages = body["messages"]
    newest = layout.last_user(messages)
    fresh = layout.turn_key(newest, messages[newest]) not in session.turns
    turn, new = layout.plan_memory(session, recalled if fresh else [], known, k, drift)
    inject, turn.replayed = layout.injections(session, messages, newest if fresh else None, new, known)
    if api == "openai":
        return layout.openai_layout(body, session, turn, inject, "nshash"), turn
    return layout.anthropic_layout(body, session, turn, inject, ttl), turn


def _strip_marks(value):
    if isinstance(value, dict):
        return {k: _strip_marks(v) for k, v in value.items() if k != "cache_control"}
    if isinstance(value, list):
        return [_strip_marks(v) for v in value]
    return value


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_next_turn_reproduces_the_previous_prefix_and_new_chunks_go_into_the_newest_turn(api):
    known = {_chunk(i)["id"]: 5 for i in range(20)}
    session = Session("s", "ns")
    system = [{"role": "system", "content": "Be brief."}] if api == "openai" else []
    extra = {"system": "Be brief."} if api == "anthropic" else {}
    first, t1 = _turn(session, api, {"messages": [*system, {"role": "user", "content": "q1"}], **extra},
                      [_chunk(i) for i in (5, 3, 9, 1, 7, 2, 8, 4)], known)
    assert t1.rebuilt and t1.block_ids == [_chunk(i)["id"] for i in (1, 2, 3, 4, 5, 7, 8, 9)]  # insertion order
    history = [*system, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
               {"role": "user", "content": "q2"}]
    # Top-4 of turn 2: one chunk (12) not in the block; 1/4 < drift 0.5, so the block stays.
    second, t2 = _turn(session, api, {"messages": history, **extra},
                       [_chunk(i) for i in (12, 5, 3, 9, 1, 7, 2, 8)], known)
    assert not t2.rebuilt and t2.new_ids == [_chunk(12)["id"]]
    n = len(first["messages"])
    assert canonical(_strip_marks(second["messages"][:n])) == canonical(_strip_marks(first["messages"]))
    assert "Fact number 12." in json.dumps(second["messages"][-1]) and "Fact number 12." not in json.dumps(
        second["messages"][:-1])
    if api == "anthropic":
        assert canonical(_strip_marks(second["system"])) == canonical(_strip_marks(first["system"]))
    # Turn 3 repeats turn 2's history: turn 2's injection is replayed, byte for byte.
    history += [{"role": "assistant", "content": "a2"}, {"role": "user", "content": "q3"}]
    third, t3 = _turn(session, api, {"messages": history, **extra}, [_chunk(i) for i in (5, 3, 9, 1)], known)
    assert t3.replayed == 1 and not t3.new_ids
    m = len(second["messages"])
    assert canonical(_strip_marks(third["messages"][:m])) == canonical(_strip_marks(second["messages"]))


def test_the_block_is_rebuilt_only_past_the_drift_threshold_or_when_a_chunk_is_forgotten():
    known = {_chunk(i)["id"]: 5 for i in range(20)}
    session = Session("s", "ns")
    layout.plan_memory(session, [_chunk(i) for i in range(8)], known, 4, 0.5)
    turn, new = layout.plan_memory(session, [_chunk(i) for i in (10, 11, 0, 1)], known, 4, 0.5)
    assert not turn.rebuilt and turn.drift == 0.5 and [c["id"] for c in new] == [_chunk(10)["id"], _chunk(11)["id"]]
    turn, _ = layout.plan_memory(session, [_chunk(i) for i in (10, 11, 12, 1)], known, 4, 0.5)
    assert turn.rebuilt and turn.drift == 0.75
    del known[_chunk(1)["id"]]
    turn, _ = layout.plan_memory(session, [_chunk(i) for i in (10, 11, 12)], known, 4, 0.5)
    assert turn.rebuilt and _chunk(1)["id"] not in session.block_ids and "Fact number 1." not in session.block_text


@pytest.mark.parametrize("client_marks, added", [(0, 3), (2, 2), (3, 1), (4, 0)])
def test_anthropic_breakpoints_never_exceed_four_counting_the_clients_own(client_marks, added):
    """Where the markers go and their TTL (Anthropic's limit of 4 and TTL expiry are the provider's
    accounting, which the real upstream ignores; tests/test_proxy.py counts them in the bytes it received)."""
    mark = {"type": "ephemeral"}
    tools = [{"name": f"t{i}", "input_schema": {}, "cache_control": mark} for i in range(client_marks)]
    body = {"tools": tools, "system": "Sys.", "messages": [{"role": "user", "content": "q1"},
                                                            {"role": "assistant", "content": "a1"},
                                                            {"role": "user", "content": "q2"}]}
    known = {_chunk(i)["id"]: 5 for i in range(4)}
    out, turn = _turn(Session("s", "ns"), "anthropic", body, [_chunk(i) for i in range(4)], known, ttl="1h")
    assert layout.count_breakpoints(out) == client_marks + added <= 4
    assert turn.breakpoints_added == added and turn.breakpoints_client == client_marks
    if added:  # the first one goes to the end of the memory block, with the configured TTL
        assert out["system"][-1]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}


def test_tools_and_system_are_frozen_across_reordering():
    session = Session("s", "ns")
    tools = [{"name": "a", "description": "x", "input_schema": {"type": "object"}}, {"name": "b", "input_schema": {}}]
    first = layout.freeze(session, "tools", tools, as_set=True)
    shuffled = [{"input_schema": {}, "name": "b"}, {"input_schema": {"type": "object"}, "description": "x", "name": "a"}]
    assert layout.freeze(session, "tools", shuffled, as_set=True) is first
    changed = [{"name": "c", "input_schema": {}}]
    assert layout.freeze(session, "tools", changed, as_set=True) is changed  # a real change replaces it


def test_sessions_persist_and_reload(tmp_path):
    store = SessionStore(tmp_path)
    session = store.get("openai-abc", "ns")
    layout.plan_memory(session, [_chunk(1), _chunk(2)], {_chunk(1)["id"]: 5, _chunk(2)["id"]: 5}, 2, 0.5)
    store.save(session)
    again = SessionStore(tmp_path).get("openai-abc", "ns")
    assert again.block_text == session.block_text and again.block_ids == session.block_ids
    SessionStore(tmp_path).drop_namespace("ns")
    assert not list((tmp_path / "sessions").glob("*.json"))


def test_prices_apply_read_write_multipliers_and_the_minimum_cacheable_length():
    """A stand-in for the closed providers' billing, which the real upstream cannot show (a plain
    SGLang server caches every prefix, has no breakpoints, TTL or write price): this checks only the
    table's arithmetic; the cached token counts it is applied to are always the upstream's own."""
    p = pricing.PRICES
    cost = pricing.input_cost(p, "anthropic", "claude-sonnet-4-5", total=10_000, read=8_000, written=2_000)
    assert cost == pytest.approx((8_000 * 0.1 + 2_000 * 1.25) * 3.0 / 1e6)
    hour = pricing.input_cost(p, "anthropic", "claude-sonnet-4-5", total=10_000, read=8_000, written=2_000, ttl="1h")
    assert hour == pytest.approx((8_000 * 0.1 + 2_000 * 2.0) * 3.0 / 1e6)
    assert pricing.input_cost(p, "anthropic", None, total=900, read=800) == pytest.approx(900 * 3.0 / 1e6)
    gpt = pricing.input_cost(p, "openai", "gpt-4o", total=3000, read=2000)  # 1920 cached: 128-token steps
    assert gpt == pytest.approx(((3000 - 1920) + 1920 * 0.5) * 2.5 / 1e6)
    bad = {"anthropic": {"default": "x", "models": {}}, "openai": pricing.PRICES["openai"]}
    with pytest.raises(ValueError, match="anthropic"):
        pricing.load_prices(_write(bad))


def _write(table) -> str:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(table, f)
    return f.name


def _app(tmp_path, upstream: str, timeout_s: float = 5.0) -> TestClient:
    config = ProxyConfig(upstream=upstream, store_dir=str(tmp_path / "m"), state_dir=str(tmp_path / "s"),
                         timeout_s=timeout_s)
    return TestClient(create_app(config), raise_server_exceptions=False)


def test_an_unreachable_upstream_is_502_and_a_silent_one_504_in_each_apis_shape(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # bound, not listening: connections are refused
        client = _app(tmp_path, f"http://127.0.0.1:{dead}")
        msg = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        r = client.post("/v1/chat/completions", json={**msg, "user": "ns1"})
        assert r.status_code == 502 and r.json()["error"]["type"] == "api_error"
        r = client.post("/v1/messages", json={**msg, "metadata": {"user_id": "ns1"}})
        assert r.status_code == 502 and r.json()["type"] == "error"
        assert client.post("/v1/chat/completions", json=msg).status_code == 502  # pass-through too
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        client = _app(tmp_path, f"http://127.0.0.1:{silent.getsockname()[1]}", timeout_s=1.0)
        r = client.post("/v1/messages", json={**msg, "metadata": {"user_id": "ns1"}})
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"


def test_bad_input_is_a_4xx_in_the_apis_shape_before_anything_is_forwarded(tmp_path):
    client = _app(tmp_path, "http://127.0.0.1:9")
    r = client.post("/v1/messages", content=b"[1, 2]", headers={"X-Amem-Namespace": "ns1"})
    assert r.status_code == 400 and r.json()["type"] == "error"
    r = client.post("/v1/chat/completions", json={"user": "ns1", "messages": "hi"})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"user": "ns1", "messages": [{"role": "user", "content": "x"}]},
                    headers={"X-Amem-Session": "bad id!"})
    assert r.status_code == 400 and "X-Amem-Session" in r.json()["error"]["message"]
    r = client.post("/amem/v1/search", json={"namespace": "ns1"})
    assert r.status_code == 422 and "query" in r.json()["error"]["message"]
    r = client.post("/amem/v1/search", json={"namespace": "nobody", "query": "x"})
    assert r.status_code == 404
