"""The memory layer on the real server: SDK, OpenAI `user` = namespace, MCP, forget, bad input."""

from __future__ import annotations

import asyncio
import sys

import pytest
import requests

from amem_sgl.sdk import Amem, AmemError

pytestmark = pytest.mark.slow

ALICE = ["Alice's sister Maria lives in Denver.", "Alice works as an engineer at Boeing in Seattle."]


@pytest.fixture(scope="module")
def amem(amem_server):
    return Amem(amem_server.url)


@pytest.fixture(scope="module")
def alice_ids(amem):
    done = amem.remember("alice", ALICE)
    assert len(done.ids) == 2
    return done.ids


def test_readme_sdk_flow_two_questions_in_a_session_the_second_on_reused_kv(amem, alice_ids):
    with amem.start_session("alice") as session:
        assert sorted(session.chunk_ids) == sorted(alice_ids)
        first = session.ask("Which city does Alice's sister Maria live in?", max_tokens=24)
        second = session.ask("Which company does Alice work for?", max_tokens=24)
    assert "Denver" in first.text and "Boeing" in second.text, (first.text, second.text)
    assert sorted(second.chunk_ids) == sorted(alice_ids)
    # The second turn's memory came from reused KV: no chunk token spliced anew or recomputed.
    assert second.reused_kv and second.spliced_tokens == 0, second.usage
    assert second.cached_tokens >= sum(c.tokens for c in amem.list("alice"))
    # The served default is exact (configs/default.yaml): the session's turns are exact-mode turns.
    assert first.usage["memory"]["fidelity"] == second.usage["memory"]["fidelity"] == "exact", second.usage


DANA = ["Dana's brother Felix lives in Osaka and teaches physics.", "Dana drives a green 1998 Volvo.",
        "Dana's garden has twelve tomato plants."]


def test_first_use_prefill_computes_chunks_in_the_first_turn_and_later_turns_splice_them(amem_server, amem):
    before = amem_server.amem_state()["stats"]
    done = amem.remember("dana", DANA, prefill="first_use")
    after_remember = amem_server.amem_state()["stats"]
    assert after_remember["registered_tokens"] == before["registered_tokens"]  # nothing prefilled yet
    first = amem.ask("dana", "Where does Dana's brother Felix live, and what does Dana drive?", max_tokens=24)
    assert len(first.chunk_ids) >= 2, first.chunk_ids
    assert first.spliced_tokens == 0 and "Osaka" in first.text, (first.text, first.usage)
    after_first = amem_server.amem_state()["stats"]
    # The turn computed its chunks in place and kept each one as a chunk node.
    assert after_first["chunks_captured"] - after_remember["chunks_captured"] == len(first.chunk_ids)
    tokens = {c.id: c.tokens for c in amem.list("dana")}
    later = [cid for cid in done.ids if cid in first.chunk_ids][1:]  # they move to other positions now
    # A fast session splices its working set (an exact one, the server's default, prefills it).
    with amem.start_session("dana", chunk_ids=later, fidelity="fast") as session:
        assert session.warm["amem"]["spliced_tokens"] == sum(tokens[c] for c in later), session.warm
        reply = session.ask("What car does Dana drive?", max_tokens=16)
    assert reply.text.strip() and amem_server.amem_state()["stats"]["registered_tokens"] == before["registered_tokens"]


def test_openai_user_is_the_namespace_and_bob_never_sees_alices_memory(amem_server, amem, alice_ids):
    from openai import OpenAI

    client = OpenAI(base_url=f"{amem_server.url}/v1", api_key="none")
    raw = client.chat.completions.with_raw_response.create(
        model="default", user="alice", max_tokens=24, temperature=0,
        messages=[{"role": "user", "content": "Which city does Alice's sister live in?"}])
    reply = raw.parse()
    used = raw.headers["x-amem-chunks"].split(",")
    assert set(used) <= set(alice_ids) and used
    assert reply.usage.model_extra["amem"]["memory"]["chunks"] == used
    assert "Denver" in reply.choices[0].message.content

    bob_ids = amem.remember("bob", ["Bob keeps three goldfish named after planets."]).ids
    raw = client.chat.completions.with_raw_response.create(
        model="default", user="bob", max_tokens=24, temperature=0,
        messages=[{"role": "user", "content": "Which city does Alice's sister live in?"}])
    bob = raw.parse()
    bob_chunks = [c for c in raw.headers.get("x-amem-chunks", "").split(",") if c]
    assert not set(bob_chunks) & set(alice_ids) and set(bob_chunks) <= set(bob_ids)  # no recall hit
    spliced = (bob.usage.model_extra.get("amem") or {}).get("spliced_tokens", 0)
    bob_tokens = sum(c.tokens for c in amem.list("bob"))
    assert spliced <= bob_tokens  # no KV hit on alice's chunks: at most bob's own were spliced
    assert not amem.search("bob", "Which city does Alice's sister live in?") or all(
        c.id in bob_ids for c in amem.search("bob", "Which city does Alice's sister live in?"))


def test_streaming_turn_with_memory(amem_server, alice_ids):
    body = {"model": "default", "user": "alice", "stream": True, "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": "Where does Alice work?"}]}
    with requests.post(f"{amem_server.url}/v1/chat/completions", json=body, stream=True, timeout=300) as reply:
        assert reply.status_code == 200 and reply.headers["x-amem-chunks"]
        text = "".join(line.decode() for line in reply.iter_lines() if line)
    assert "data: [DONE]" in text and '"delta"' in text


def test_memory_routes_are_in_the_openapi_schema(amem_server):
    paths = requests.get(f"{amem_server.url}/openapi.json", timeout=60).json()["paths"]
    for path in ("/amem/v1/remember", "/amem/v1/search", "/amem/v1/sessions",
                 "/amem/v1/namespaces/{namespace}/chunks/{chunk_id}"):
        assert path in paths


def test_forget_one_chunk_then_the_namespace_removes_text_index_and_kv(amem_server, amem):
    ids = amem.remember("carol", ["Carol's locker code is 4471.", "Carol plays the cello on Sundays."]).ids
    assert [c.id for c in amem.search("carol", "locker code", k=1)] == [ids[0]]
    amem.ask("carol", "What is Carol's locker code?", max_tokens=8)  # puts carol's KV on the device
    before = amem_server.amem_state()["stats"]["forgotten_tokens"]
    assert amem.forget("carol", ids[0]) == [ids[0]]
    assert [c.id for c in amem.list("carol")] == [ids[1]]
    assert all(c.id != ids[0] for c in amem.search("carol", "locker code", k=4))
    assert amem_server.amem_state()["stats"]["forgotten_tokens"] > before  # device KV freed
    amem.forget("carol")
    assert "carol" not in amem.namespaces()
    with pytest.raises(AmemError) as err:
        amem.list("carol")
    assert err.value.status == 404


def test_forgetting_a_sessions_chunk_drops_it_from_the_session_which_goes_on(amem_server, amem):
    ids = amem.remember("erin", ["Erin's gate code is 5820.", "Erin's bike is green."]).ids
    session = amem.start_session("erin", chunk_ids=ids, fidelity="fast")
    assert set(session.chunk_ids) == set(ids)
    amem.forget("erin", ids[0])
    answer = amem.ask("erin", "What colour is Erin's bike?", session=session, max_tokens=8)
    assert answer.chunk_ids == [ids[1]]  # the session still answers, without the forgotten chunk
    amem.forget("erin")  # the whole namespace: its sessions end
    with pytest.raises(AmemError) as err:
        amem.ask(None, "What colour is Erin's bike?", session=session, max_tokens=8)
    assert err.value.status == 404 and "unknown or expired session" in err.value.message


@pytest.mark.parametrize("method, path, body, status, words", [
    ("GET", "/amem/v1/namespaces/nobody/chunks", None, 404, "unknown namespace"),
    ("POST", "/amem/v1/search", {"namespace": "nobody", "query": "x"}, 404, "unknown namespace"),
    ("DELETE", "/amem/v1/namespaces/nobody", None, 404, "unknown namespace"),
    ("POST", "/amem/v1/remember", {"namespace": "dave", "texts": ["  "]}, 400, "non-empty"),
    ("POST", "/amem/v1/remember", {"namespace": "dave"}, 400, "nothing to remember"),
    ("POST", "/amem/v1/remember", {"namespace": "bad name!", "texts": ["x"]}, 400, "namespace"),
    ("POST", "/amem/v1/remember", {"namespace": "dave", "texts": "not a list"}, 422, "texts"),
    ("POST", "/amem/v1/remember", {"namespace": 5, "texts": ["x"]}, 422, "namespace"),
    ("POST", "/amem/v1/search", {"namespace": "alice", "query": "x", "k": 0}, 422, "k"),
    ("GET", "/amem/v1/namespaces/alice/chunks/not-an-id", None, 400, "invalid chunk id"),
    ("GET", "/amem/v1/namespaces/alice/chunks/" + "0" * 64, None, 404, "unknown chunk id"),
    ("POST", "/amem/v1/sessions", {"namespace": "alice", "chunk_ids": ["zz"]}, 400, "invalid chunk id"),
    ("DELETE", "/amem/v1/sessions/nope", None, 404, "session"),
])
def test_bad_memory_requests_get_a_4xx_with_a_message(amem_server, amem, alice_ids, method, path, body, status, words):
    reply = requests.request(method, amem_server.url + path, json=body, timeout=60)
    # Type errors: FastAPI's validation answer, which SGLang's app serves as 400 with the details.
    assert reply.status_code == status or (status == 422 and reply.status_code == 400), reply.text
    assert words in reply.text
    assert sorted(c.id for c in amem.list("alice")) == sorted(alice_ids)  # nothing stored was lost


def test_oversized_and_garbage_bodies_are_refused_and_memory_survives(amem_server, amem, alice_ids):
    huge = {"namespace": "dave", "texts": ["word " * (1024 * 1024)]}  # 5 MB
    reply = requests.post(f"{amem_server.url}/amem/v1/remember", json=huge, timeout=60)
    assert reply.status_code == 413
    reply = requests.post(f"{amem_server.url}/amem/v1/remember", data=b"{not json", timeout=60,
                          headers={"content-type": "application/json"})
    assert 400 <= reply.status_code < 500
    garbage = {"namespace": "dave", "texts": ["\udcff\x00 \u202e\ufffd" * 10]}
    reply = requests.post(f"{amem_server.url}/amem/v1/remember", data=__import__("json").dumps(garbage), timeout=120,
                          headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "unicode" in reply.text, reply.text
    assert sorted(c.id for c in amem.list("alice")) == sorted(alice_ids)
    assert requests.get(f"{amem_server.url}/health", timeout=30).status_code == 200


def test_an_mcp_client_lists_the_tools_and_calls_remember_and_ask(amem_server):
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters

    async def session():
        params = StdioServerParameters(command=sys.executable, args=["-m", "amem_sgl.cli", "--url", amem_server.url, "mcp"])
        async with Client(params) as client:
            tools = {t.name for t in (await client.list_tools()).tools}
            remembered = await client.call_tool("remember", {"namespace": "erin", "texts": [
                "Erin's bicycle is painted bright orange."]})
            answered = await client.call_tool("ask", {"namespace": "erin", "question": "What colour is Erin's bicycle?"})
            return tools, remembered, answered

    tools, remembered, answered = asyncio.run(session())
    assert {"remember", "recall", "ask", "forget"} <= tools
    assert not remembered.is_error and "erin" in str(remembered.structured_content or remembered.content)
    assert not answered.is_error and "chunks" in str(answered.structured_content or answered.content)


def test_the_sglang_frontend_example_uses_memory_through_the_server(amem_server):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "sgl_memory_program.py"
    spec = importlib.util.spec_from_file_location("sgl_memory_program", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.run(amem_server.url)
    assert any("Priya" in text for text in result["recalled"]) and result["answer"].strip()
