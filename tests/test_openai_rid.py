"""A client's ``rid`` on the OpenAI routes.

The memory layer keeps a turn's plan (namespace, recalled chunk ids) by the turn's request id; the
OpenAI memory middleware gives every memory turn a fresh internal rid of its own (a client's rid
stays its prefix, for tracing), so a plan is only ever found by the request that made it:

* two concurrent memory turns of two namespaces that send the same ``rid`` each get their own
  namespace and chunk ids (no duplicate-rid 400, nothing of the other's);
* a turn reusing the response ``id`` (the rid) of another namespace's turn -- a memory turn of a
  namespace with nothing remembered, or a plain turn -- gets nothing of it;
* a memory turn with a client rid still answers with its own ``usage.amem`` (JSON, streamed, n > 1).

A memory turn that reaches the conversion hook with a rid the middleware did not mint gets a fresh
one there (in-process test).
"""

from __future__ import annotations

import json
import threading
import types
import uuid

import pytest
import requests

from amem_sgl.memory import layer as memory
from amem_sgl.memory import openai_routes

CAROL = ["Carol's parrot is called Mango and it whistles jazz.", "Carol works as a glassblower in Murano."]
BOB = ["Bob's tortoise is called Boulder and it eats dandelions.", "Bob works as a ferry pilot in Oslo."]


def chat_body(namespace: str | None, question: str, **extra) -> dict:
    body = {"model": "default", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": question}], **extra}
    if namespace:
        body["user"] = namespace
    return body


def memory_of(reply: requests.Response) -> dict | None:
    return ((reply.json().get("usage") or {}).get("amem") or {}).get("memory")


def attached(reply: requests.Response) -> dict:
    """What of a memory plan a response carries: its headers' namespace and chunks, usage.amem.memory."""
    chunks = reply.headers.get("x-amem-chunks")
    return {"namespace": reply.headers.get("x-amem-namespace"),
            "chunks": set(chunks.split(",")) if chunks else set(),
            "memory": memory_of(reply) if reply.headers.get("content-type", "").startswith("application/json") else None}


@pytest.fixture(scope="module")
def spaces(amem_server):
    """Two namespaces with memory (their chunk ids), one without any."""
    suffix = uuid.uuid4().hex[:10]
    out = {}
    for role, texts in (("carol", CAROL), ("bob", BOB)):
        name = f"rid-{role}-{suffix}"
        reply = requests.post(f"{amem_server.url}/amem/v1/remember", json={"namespace": name, "texts": texts},
                              timeout=300)
        assert reply.status_code == 200, reply.text
        out[role] = (name, set(reply.json()["ids"]))
    out["nobody"] = (f"rid-nobody-{suffix}", set())
    return out


# ---------------------------------------------------------------- the client's rid

@pytest.mark.slow
def test_concurrent_memory_turns_with_one_client_rid_each_get_only_their_own_memory(amem_server, spaces):
    url = amem_server.url
    (carol, carol_ids), (bob, bob_ids) = spaces["carol"], spaces["bob"]
    questions = {carol: "What is Carol's parrot called?", bob: "What is Bob's tortoise called?"}
    own = {carol: carol_ids, bob: bob_ids}
    for round_ in range(3):  # the unfixed race goes either way: a few rounds make it show
        rid = f"fixed-rid-{uuid.uuid4().hex[:6]}-{round_}"
        barrier, replies = threading.Barrier(2), {}

        def ask(namespace):
            barrier.wait()
            replies[namespace] = requests.post(f"{url}/v1/chat/completions", timeout=300,
                                               json=chat_body(namespace, questions[namespace], rid=rid, max_tokens=16))

        workers = [threading.Thread(target=ask, args=(n,)) for n in (carol, bob)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        for namespace, reply in replies.items():
            other = bob if namespace == carol else carol
            got = attached(reply) if reply.status_code == 200 else {"namespace": None, "chunks": set(), "memory": None}
            assert got["namespace"] in (None, namespace), (namespace, reply.headers)
            assert not got["chunks"] & own[other], (namespace, got)
            if got["memory"] is not None:
                assert got["memory"]["namespace"] == namespace, got["memory"]
                assert set(got["memory"]["chunks"]) <= own[namespace], got["memory"]
            assert reply.status_code == 200, (namespace, reply.text)  # no duplicate-rid 400 either
            assert got["namespace"] == namespace and got["chunks"] and got["chunks"] <= own[namespace], got
            assert got["memory"]["namespace"] == namespace and set(got["memory"]["chunks"]) == got["chunks"]
            assert reply.json()["id"].startswith(rid), reply.json()["id"]  # the client's rid stays traceable


@pytest.mark.slow
def test_reusing_another_turns_rid_attaches_nothing_of_it(amem_server, spaces):
    url = amem_server.url
    (carol, carol_ids), (nobody, _) = spaces["carol"], spaces["nobody"]
    first = requests.post(f"{url}/v1/chat/completions", json=chat_body(carol, "Where does Carol work?"), timeout=300)
    assert first.status_code == 200 and first.headers["x-amem-namespace"] == carol, first.text
    taken = first.json()["id"]
    # A memory turn of a namespace with nothing remembered, and a plain turn (no namespace at all).
    for namespace in (nobody, None):
        for path, body in (("/v1/chat/completions", chat_body(namespace, "Where does Carol work?", rid=taken)),
                           ("/v1/completions", {"model": "default", "prompt": "Carol works as a", "max_tokens": 4,
                                                "temperature": 0, "rid": taken,
                                                **({"user": namespace} if namespace else {})})):
            reply = requests.post(f"{url}{path}", json=body, timeout=300)
            assert reply.status_code == 200, (namespace, path, reply.text)
            got = attached(reply)
            assert got["namespace"] is None and not got["chunks"], (namespace, path, reply.headers)
            assert got["memory"] is None, (namespace, path, reply.json()["usage"])
            assert carol not in json.dumps(reply.json()) and not any(c in reply.text for c in carol_ids)
        # streamed, with the usage chunk
        body = chat_body(namespace, "Where does Carol work?", rid=taken, stream=True,
                         stream_options={"include_usage": True})
        reply = requests.post(f"{url}/v1/chat/completions", json=body, timeout=300)
        assert reply.status_code == 200, reply.text
        assert "x-amem-namespace" not in reply.headers and "x-amem-chunks" not in reply.headers
        assert carol not in reply.text and not any(c in reply.text for c in carol_ids), reply.text


def streamed_usage(reply: requests.Response) -> dict:
    events = [json.loads(line[len("data: "):]) for line in reply.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    usages = [e["usage"] for e in events if e.get("usage")]
    assert len(usages) == 1, usages
    return usages[0]


@pytest.mark.slow
def test_a_memory_turn_with_a_client_rid_answers_with_its_own_usage(amem_server, spaces):
    url = amem_server.url
    carol, carol_ids = spaces["carol"]
    question = "What is Carol's parrot called?"
    for extra in ({}, {"n": 2, "temperature": 0.8}):
        rid = f"client-{uuid.uuid4().hex[:8]}"
        reply = requests.post(f"{url}/v1/chat/completions", json=chat_body(carol, question, rid=rid, **extra),
                              timeout=300)
        assert reply.status_code == 200, reply.text
        data = reply.json()
        if "n" not in extra:  # (n > 1: SGLang's sub-requests get rids of their own, the response one of theirs)
            assert data["id"].startswith(rid) and data["id"] != rid, data["id"]
        assert len(data["choices"]) == extra.get("n", 1)
        got = attached(reply)
        assert got["namespace"] == carol and got["chunks"] and got["chunks"] <= carol_ids, got
        assert got["memory"]["namespace"] == carol and set(got["memory"]["chunks"]) == got["chunks"]
        assert data["usage"]["amem"]["timings"], data["usage"]
    # the completions route and a streamed chat turn, each with a client rid
    reply = requests.post(f"{url}/v1/completions", timeout=300, json={
        "model": "default", "user": carol, "prompt": "Carol's parrot is called", "max_tokens": 4, "temperature": 0,
        "rid": f"client-{uuid.uuid4().hex[:8]}"})
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-amem-namespace"] == carol and memory_of(reply)["namespace"] == carol
    body = chat_body(carol, question, rid=f"client-{uuid.uuid4().hex[:8]}", stream=True,
                     stream_options={"include_usage": True})
    reply = requests.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    assert reply.status_code == 200 and reply.headers["x-amem-namespace"] == carol, reply.text
    usage = streamed_usage(reply)
    assert usage["amem"]["memory"]["namespace"] == carol and set(usage["amem"]["memory"]["chunks"]) <= carol_ids


# ---------------------------------------------------------------- in-process (no server)

def test_a_plan_is_never_kept_under_a_rid_the_middleware_did_not_mint(monkeypatch):
    """A memory turn reaching the conversion with the client's own rid (no middleware in front):
    its plan goes under a fresh rid, which the request then carries; never under the client's."""
    from sglang.srt.managers.io_struct import GenerateReqInput

    kept = {}
    plan = memory.Plan([1, 2, 3], None, "rex", ["c1"], [1.0], None)
    layer = types.SimpleNamespace(sessions={}, plan_chat=lambda ns, messages, session, fidelity=None, reserve_tokens=0: plan,
                                  remember_plan=lambda rid, p: kept.update({rid: p}))
    monkeypatch.setattr(memory, "ACTIVE", layer)
    control = types.SimpleNamespace(level=lambda requested: "fast", apply=lambda rid, ns, ids, hints, *a: hints)
    monkeypatch.setattr(openai_routes, "fidelity_control", lambda _layer: control)
    request = types.SimpleNamespace(user="rex", messages=[{"role": "user", "content": "hi"}], rid="taken-rid")
    original = lambda serving, req, raw_request: (GenerateReqInput(text="hi", rid=req.rid), req)  # noqa: E731
    for raw in (types.SimpleNamespace(headers={}),
                types.SimpleNamespace(headers={}, scope={"state": {openai_routes.RID_STATE_KEY: "other"}})):
        kept.clear()
        adapted, _ = openai_routes.around_chat_conversion(original, None, request, raw)
        assert adapted.rid.startswith("taken-rid.amem-") and list(kept) == [adapted.rid], (adapted.rid, kept)
