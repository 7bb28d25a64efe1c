"""The memory API's and the OpenAI route's edges: session size and lifetime, X-Amem-Session on
/v1/completions, the fidelity field vs header, chunk ids, duplicate texts, unknown /amem/v1 paths,
heavy remembers off the event loop, and a /v1/completions memory turn's prompt (one text: ``["text"]``
is served as ``"text"``, several prompts or token ids are a 400)."""

from __future__ import annotations

import asyncio
import threading
import time
import types
import uuid

import httpx
import pytest
import requests
from starlette.requests import Request

from amem_sgl.memory import api, openai_routes
from amem_sgl.memory import layer as memory

FACTS = ["Ines keeps three goats named Pip, Pod and Pea.", "Ines's uncle Ravi repairs clocks in Porto."]


# ---------------------------------------------------------------- in-process (no server)

def test_a_chunk_id_with_a_trailing_newline_is_refused():
    good = "a" * 64
    api._check_ids([good])
    for bad in (good + "\n", good + "\n\n", "\n" + good):
        with pytest.raises(memory.MemoryError_) as caught:
            api._check_ids([bad])
        assert caught.value.status == 400


def stub_layer(idle_s: float = 60.0) -> memory.MemoryLayer:
    """A memory layer with sessions only (no store, no tokenizer): what the OpenAI middleware and
    the conversion hook read before anything else."""
    layer = object.__new__(memory.MemoryLayer)
    layer.config = types.SimpleNamespace(session_idle_s=idle_s)
    layer.sessions, layer.plans, layer._lock = {}, {}, threading.Lock()
    return layer


def add_session(layer, session_id: str, idle_for_s: float) -> None:
    then = time.time() - idle_for_s
    layer.sessions[session_id] = memory.Session(session_id, "ines", [], then, then)


def through_middleware(path: str, body: dict, headers: dict) -> tuple[httpx.Response, list]:
    """One request through OpenAIMemoryMiddleware in front of an app that records the headers it got."""
    seen = []

    async def app(scope, receive, send):
        seen.append(Request(scope).headers)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})

    async def go():
        transport = httpx.ASGITransport(app=openai_routes.OpenAIMemoryMiddleware(app))
        async with httpx.AsyncClient(transport=transport, base_url="http://amem") as client:
            return await client.post(path, json=body, headers=headers)

    return asyncio.run(go()), seen


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_an_idle_expired_session_is_a_404_on_the_openai_routes(monkeypatch, path):
    layer = stub_layer(idle_s=60.0)
    add_session(layer, "stale", idle_for_s=3600.0)
    add_session(layer, "live", idle_for_s=1.0)
    monkeypatch.setattr(memory, "ACTIVE", layer)
    body = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "prompt": "hi"}
    reply, _ = through_middleware(path, body, {"X-Amem-Session": "stale"})
    assert reply.status_code == 404, reply.text
    assert "unknown or expired session" in reply.json()["message"]
    assert "stale" not in layer.sessions  # expired on the way
    reply, _ = through_middleware(path, body, {"X-Amem-Session": "live"})
    assert reply.status_code == 200, reply.text


def test_a_session_expiring_at_conversion_is_a_404_not_a_400(monkeypatch):
    """The conversion hook's own session check (a session expiring between middleware and hook)."""
    from fastapi import HTTPException

    layer = stub_layer(idle_s=60.0)
    add_session(layer, "stale", idle_for_s=3600.0)
    monkeypatch.setattr(memory, "ACTIVE", layer)
    monkeypatch.setattr(openai_routes, "fidelity_control", lambda _layer: types.SimpleNamespace(level=lambda r: r or "fast"))
    request = types.SimpleNamespace(user=None, messages=[{"role": "user", "content": "hi"}], prompt="hi")
    raw = types.SimpleNamespace(headers={"x-amem-session": "stale"})
    original = lambda serving, req, raw_request: (types.SimpleNamespace(rid=None), req)  # noqa: E731
    for hook in (openai_routes.around_chat_conversion, openai_routes.around_completion_conversion):
        add_session(layer, "stale", idle_for_s=3600.0)
        with pytest.raises(HTTPException) as caught:
            hook(original, None, request, raw)
        assert caught.value.status_code == 404 and "unknown or expired session" in caught.value.detail


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_the_body_fidelity_field_wins_over_the_header(monkeypatch, path):
    monkeypatch.setattr(memory, "ACTIVE", None)
    body = {"model": "default", "prompt": "hi", "amem_fidelity": "exact"}
    reply, seen = through_middleware(path, body, {"X-Amem-Fidelity": "fast"})
    assert reply.status_code == 200, reply.text
    assert seen[0].getlist("x-amem-fidelity") == ["exact"]  # one value: the body's
    reply, seen = through_middleware(path, {"model": "default", "prompt": "hi"}, {"X-Amem-Fidelity": "fast"})
    assert seen[0].getlist("x-amem-fidelity") == ["fast"]  # no body field: the header
    reply, _ = through_middleware(path, {**body, "amem_fidelity": "perfect"}, {"X-Amem-Fidelity": "fast"})
    assert reply.status_code == 400 and "fidelity" in reply.json()["message"]


# ---------------------------------------------------------------- on the session server

@pytest.fixture(scope="module")
def ines(amem_server):
    reply = requests.post(f"{amem_server.url}/amem/v1/remember", json={"namespace": "oai-ines", "texts": FACTS},
                          timeout=300)
    assert reply.status_code == 200, reply.text
    return reply.json()["ids"]


@pytest.mark.slow
def test_remembering_the_same_text_twice_in_one_request_counts_and_stores_it_once(amem_server):
    url = amem_server.url
    text = "Ines's neighbour Oskar plays the bassoon on Sundays."
    reply = requests.post(f"{url}/amem/v1/remember", json={"namespace": "oai-dupes", "texts": [text, text]},
                          timeout=300)
    assert reply.status_code == 200, reply.text
    done = reply.json()
    assert done["new"] == 1 and len(done["ids"]) == 1 and len(done["chunks"]) == 1, done
    listed = requests.get(f"{url}/amem/v1/namespaces/oai-dupes/chunks", timeout=60).json()["chunks"]
    assert [c["id"] for c in listed] == done["ids"]
    again = requests.post(f"{url}/amem/v1/remember", json={"namespace": "oai-dupes", "texts": [text]}, timeout=300)
    assert again.json()["new"] == 0 and again.json()["ids"] == done["ids"]


@pytest.mark.slow
def test_unknown_memory_paths_and_wrong_methods_answer_in_the_memory_error_shape(amem_server):
    url = amem_server.url
    for method, path, status in [("GET", "/amem/v1/no-such-route", 404), ("POST", "/amem/v1/namespaces/x/y/z", 404),
                                 ("GET", "/amem/v1", 404), ("PUT", "/amem/v1/remember", 405),
                                 ("GET", "/amem/v1/remember", 405), ("PATCH", "/amem/v1/namespaces", 405)]:
        reply = requests.request(method, f"{url}{path}", timeout=60)
        assert reply.status_code == status, (method, path, reply.status_code, reply.text)
        err = reply.json()["error"]
        assert err["code"] == status and err["type"] == "invalid_request_error" and path in err["message"], err
    assert "POST" in requests.put(f"{url}/amem/v1/remember", timeout=60).headers["allow"]
    # the routes themselves are still served
    assert requests.get(f"{url}/amem/v1/namespaces", timeout=60).status_code == 200


@pytest.mark.slow
def test_a_working_set_larger_than_the_context_is_refused_at_session_start(amem_server):
    url = amem_server.url
    # ~45 chunks of up to 256 tokens: over SmolLM2's 8192-token context (nothing prefilled now)
    sentences = [f"Fact {i}: the lighthouse keeper's ledger lists crate {i} of amber tea sent to harbour {i % 7}."
                 for i in range(500)]
    reply = requests.post(f"{url}/amem/v1/remember", timeout=600, json={
        "namespace": "oai-huge", "texts": [" ".join(sentences)], "prefill": "first_use"})
    assert reply.status_code == 200, reply.text
    total = sum(c["tokens"] for c in reply.json()["chunks"])
    assert total > 9000, total
    reply = requests.post(f"{url}/amem/v1/sessions", timeout=600,
                          json={"namespace": "oai-huge", "k": 100, "fidelity": "fast"})
    assert reply.status_code == 413, reply.text
    message = reply.json()["error"]["message"]
    assert "working set" in message and "8192 tokens" in message, message
    # a set that fits still starts
    ok = requests.post(f"{url}/amem/v1/sessions", timeout=600,
                       json={"namespace": "oai-huge", "k": 2, "fidelity": "fast"})
    assert ok.status_code == 200, ok.text
    requests.delete(f"{url}/amem/v1/sessions/{ok.json()['session_id']}", timeout=60)


@pytest.mark.slow
def test_x_amem_session_is_honoured_on_completions_as_on_chat(amem_server, ines):
    url = amem_server.url
    started = requests.post(f"{url}/amem/v1/sessions", timeout=600,
                            json={"namespace": "oai-ines", "chunk_ids": ines[1:], "fidelity": "fast"})
    assert started.status_code == 200, started.text
    sid = started.json()["session_id"]
    question = "Ines's uncle Ravi works in the city of"
    body = {"model": "default", "prompt": question, "max_tokens": 4, "temperature": 0}
    chat = {"model": "default", "messages": [{"role": "user", "content": question}], "max_tokens": 4, "temperature": 0}
    for path in ("/v1/completions", "/v1/chat/completions"):
        payload = body if path == "/v1/completions" else chat
        reply = requests.post(f"{url}{path}", json=payload, headers={"X-Amem-Session": sid}, timeout=300)
        assert reply.status_code == 200, (path, reply.text)
        assert reply.headers.get("x-amem-chunks") == ines[1] and reply.headers.get("x-amem-namespace") == "oai-ines"
        memory_usage = reply.json()["usage"]["amem"]["memory"]
        assert memory_usage["session_id"] == sid and memory_usage["fidelity"] == "fast", memory_usage
    requests.delete(f"{url}/amem/v1/sessions/{sid}", timeout=60)
    for path in ("/v1/completions", "/v1/chat/completions"):  # ended: 404 on both
        reply = requests.post(f"{url}{path}", json={**body, "messages": [{"role": "user", "content": "hi"}]},
                              headers={"X-Amem-Session": sid}, timeout=300)
        assert reply.status_code == 404 and "unknown or expired session" in reply.json()["message"], reply.text


@pytest.mark.slow
def test_the_body_fidelity_field_wins_over_the_header_on_the_server(amem_server, ines):
    url = amem_server.url
    question = "Which city does Ines's uncle Ravi repair clocks in?"
    for path, payload in [("/v1/chat/completions", {"messages": [{"role": "user", "content": question}]}),
                          ("/v1/completions", {"prompt": question})]:
        for body_level, header_level in [("exact", "fast"), ("fast", "exact")]:
            reply = requests.post(f"{url}{path}", timeout=300, headers={"X-Amem-Fidelity": header_level}, json={
                "model": "default", "user": "oai-ines", "max_tokens": 4, "temperature": 0,
                "amem_fidelity": body_level, **payload})
            assert reply.status_code == 200, reply.text
            assert reply.json()["usage"]["amem"]["memory"]["fidelity"] == body_level, (path, reply.json()["usage"])


@pytest.mark.slow
def test_a_large_remember_does_not_block_other_requests(amem_server, ines):
    url = amem_server.url
    # 600 new texts, KV left for first use: the request is all CPU work -- splitting, tokenizing and
    # embedding them (seconds on this CPU), which ran on the event loop before.
    tag = uuid.uuid4().hex[:8]
    texts = [f"Note {i} ({tag}): " + " ".join(f"swallow{(i * 31 + j) % 97} flew over bridge {j}." for j in range(6))
             for i in range(600)]
    done = {}

    def remember():
        started = time.monotonic()
        reply = requests.post(f"{url}/amem/v1/remember", json={"namespace": f"oai-busy-{tag}", "texts": texts,
                                                                     "prefill": "first_use"},
                              timeout=600)
        done.update(status=reply.status_code, started=started, finished=time.monotonic())

    worker = threading.Thread(target=remember)
    worker.start()
    time.sleep(0.5)  # the remember is in flight (its body is sent, its chunks are being tokenized)
    asked = time.monotonic()
    listed = requests.get(f"{url}/amem/v1/namespaces", timeout=600)
    answered = time.monotonic()
    worker.join()
    assert listed.status_code == 200 and done["status"] == 200, done
    assert done["finished"] - done["started"] > 2.0, done  # large enough to tell blocked from not
    # Answered while the remember still ran, in a small part of its time (blocked, it would wait it out).
    assert answered < done["finished"] and answered - asked < (done["finished"] - asked) / 3, (asked, answered, done)


# ---------------------------------------------------------------- /v1/completions prompts on a memory turn

REX = ["Rex is a grey wolfhound who sleeps under Tomas's piano.", "Tomas's piano is a black Bechstein."]


@pytest.fixture(scope="module")
def rex(amem_server):
    name = f"oai-rex-{uuid.uuid4().hex[:8]}"
    reply = requests.post(f"{amem_server.url}/amem/v1/remember", json={"namespace": name, "texts": REX}, timeout=300)
    assert reply.status_code == 200, reply.text
    return name, set(reply.json()["ids"])


def amem_memory(reply: requests.Response) -> dict | None:
    return ((reply.json().get("usage") or {}).get("amem") or {}).get("memory")


def completion(url: str, namespace: str | None, prompt, **extra) -> requests.Response:
    body = {"model": "default", "prompt": prompt, "max_tokens": 5, "temperature": 0, **extra}
    if namespace:
        body["user"] = namespace
    return requests.post(f"{url}/v1/completions", json=body, timeout=300)


@pytest.mark.slow
def test_a_one_element_prompt_list_is_served_as_that_text_with_memory(amem_server, rex):
    url = amem_server.url
    rex, rex_ids = rex
    as_text = completion(url, rex, "Rex is a")
    as_list = completion(url, rex, ["Rex is a"])
    bare = completion(url, None, "Rex is a")
    assert as_text.status_code == 200 and as_list.status_code == 200 and bare.status_code == 200, as_list.text
    assert amem_memory(as_text) is not None
    listed = amem_memory(as_list)
    assert listed is not None and listed["namespace"] == rex and set(listed["chunks"]) <= rex_ids, as_list.json()
    assert as_list.headers["x-amem-namespace"] == rex
    # the same turn as the text prompt's: one request of the same composed prompt, one choice
    assert as_list.json()["usage"]["prompt_tokens"] == as_text.json()["usage"]["prompt_tokens"]
    assert as_list.json()["usage"]["prompt_tokens"] > bare.json()["usage"]["prompt_tokens"]
    assert [c["text"] for c in as_list.json()["choices"]] == [c["text"] for c in as_text.json()["choices"]]


@pytest.mark.slow
def test_several_prompts_or_token_ids_on_a_memory_turn_are_a_400(amem_server, rex):
    url = amem_server.url
    rex, _ = rex
    nobody = f"oai-nobody-{uuid.uuid4().hex[:8]}"
    for prompt in (["Rex is a", "Tomas plays the"], [1, 2, 3], [[1, 2, 3]], [[1, 2], [3, 4]]):
        reply = completion(url, rex, prompt)
        assert reply.status_code == 400, (prompt, reply.status_code, reply.text)
        error = reply.json()
        assert "one text prompt" in error["message"] and error["code"] == 400, error
        # the same through the X-Amem-Namespace header
        reply = requests.post(f"{url}/v1/completions", headers={"X-Amem-Namespace": rex}, timeout=300,
                              json={"model": "default", "prompt": prompt, "max_tokens": 3})
        assert reply.status_code == 400 and "one text prompt" in reply.json()["message"], reply.text
        # no memory in the namespace: a plain turn, as before
        reply = completion(url, nobody, prompt)
        assert reply.status_code == 200 and amem_memory(reply) is None, (prompt, reply.text)
    # the server is still up, memory turns still served
    assert amem_memory(completion(url, rex, "Rex is a")) is not None


def test_a_one_element_prompt_list_becomes_one_request_after_the_plan(monkeypatch):
    """The conversion hook with SGLang's own GenerateReqInput: ``["text"]`` is planned as ``"text"``
    and the request it sends is a single one (flat input ids, one rid), not a batch of one."""
    from sglang.srt.managers.io_struct import GenerateReqInput

    planned, kept = [], {}
    plan = memory.Plan([1, 2, 3, 4], None, "rex", ["c1"], [1.0], None)
    layer = types.SimpleNamespace(
        sessions={}, plan_completion=lambda ns, prompt, session=None, reserve_tokens=0: planned.append(prompt) or plan,
        remember_plan=lambda rid, p: kept.update({rid: p}), store=types.SimpleNamespace(has_namespace=lambda n: True))
    monkeypatch.setattr(memory, "ACTIVE", layer)
    control = types.SimpleNamespace(level=lambda requested: "fast", apply=lambda rid, ns, ids, hints, *a: hints)
    monkeypatch.setattr(openai_routes, "fidelity_control", lambda _layer: control)
    minted = "client.amem-1"  # what the middleware sent on (in the request's ASGI state too)
    request = types.SimpleNamespace(user="rex", prompt=["Rex is a"], rid=minted)
    raw = types.SimpleNamespace(headers={}, scope={"state": {openai_routes.RID_STATE_KEY: minted}})

    def original(serving, req, raw_request):  # SGLang's choice of text vs input_ids, as it converts
        return GenerateReqInput(text=req.prompt, rid=req.rid, sampling_params={"max_new_tokens": 5}), req

    adapted, _ = openai_routes.around_completion_conversion(original, None, request, raw)
    assert planned == ["Rex is a"]
    assert adapted.text is None and adapted.input_ids == [1, 2, 3, 4] and adapted.rid == minted
    assert kept == {minted: plan}
    adapted.normalize_batch_and_arguments()
    assert adapted.is_single and adapted.batch_size == 1 and adapted.rid == minted


def test_the_conversion_hooks_leave_the_turns_max_tokens_free_when_memory_fits_the_context(monkeypatch):
    """The tokens a turn asks to generate reach the memory layer's fitting (reserve_tokens):
    max_completion_tokens, else max_tokens; 0 when neither is a positive integer."""
    seen = []

    class Recording:
        sessions: dict = {}

        def plan_chat(self, namespace, messages, session, fidelity=None, *, reserve_tokens=0):
            seen.append(("chat", reserve_tokens))

        def plan_completion(self, namespace, prompt, session=None, *, reserve_tokens=0):
            seen.append(("completion", reserve_tokens))

    monkeypatch.setattr(memory, "ACTIVE", Recording())
    monkeypatch.setattr(openai_routes, "fidelity_control", lambda _layer: types.SimpleNamespace(level=lambda r: r or "fast"))
    original = lambda serving, req, raw_request: (types.SimpleNamespace(rid=None), req)  # noqa: E731
    raw = types.SimpleNamespace(headers={}, state=types.SimpleNamespace())
    for fields, want in (({"max_tokens": 300}, 300), ({"max_tokens": 300, "max_completion_tokens": 40}, 40),
                         ({"max_tokens": None}, 0), ({"max_tokens": True}, 0)):
        request = types.SimpleNamespace(user="ns1", messages=[{"role": "user", "content": "hi"}], prompt="hi", **fields)
        openai_routes.around_chat_conversion(original, None, request, raw)
        openai_routes.around_completion_conversion(original, None, request, raw)
        assert seen[-2:] == [("chat", want), ("completion", want)], (fields, seen)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_null_body_fidelity_field_means_no_level_of_its_own(monkeypatch, path):
    """"amem_fidelity": null is the field left out (the session's or server's level), not a 400."""
    monkeypatch.setattr(memory, "ACTIVE", None)
    reply, seen = through_middleware(path, {"model": "default", "prompt": "hi", "amem_fidelity": None}, {})
    assert reply.status_code == 200, reply.text
    assert "x-amem-fidelity" not in seen[0]
    reply, seen = through_middleware(path, {"model": "default", "prompt": "hi", "amem_fidelity": None},
                                     {"X-Amem-Fidelity": "fast"})
    assert reply.status_code == 200 and seen[0].getlist("x-amem-fidelity") == ["fast"]  # the header stands
