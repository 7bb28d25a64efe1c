"""Bad kv_hints input on /generate: a 400 with the reason (SGLang's /generate error shape), never a
500 and never an action that is silently not checked."""

from __future__ import annotations

import json

import pytest

from amem_sgl.chunks import build_kv_hints, parse_kv_hints
from amem_sgl.chunks.identity import validate_namespace
from amem_sgl.server.limits import ChunkHintsGuard


def _envelope(actions) -> dict:
    return {"protocol_version": "1", "message_id": "m", "actions": actions}


def _action(payload) -> dict:
    return {"action_id": "a", "action_type": "amem.chunks", "action_version": "1", "payload": payload}


@pytest.mark.parametrize("actions", [None, 1, 1.5, True, "amem.chunks", {"action_type": "amem.chunks"}])
def test_actions_that_are_not_a_list_are_a_value_error(actions):
    with pytest.raises(ValueError, match="actions must be a list"):
        parse_kv_hints(_envelope(actions))


_WRONG = [None, True, 1, 1.5, "x", [], [1], [[0, 1.5]], [None], {}, {"policy": []}, {"policy": None},
          {"policy": "edges", "sink_tokens": "x"}, {"policy": "edges", "ratio": None}]


def test_every_payload_field_of_a_wrong_json_type_is_a_value_error():
    """Each field of the envelope, the action and the payload, set to each JSON type: a ValueError
    (which the guard answers as a 400), never another exception (a 500)."""
    guard = ChunkHintsGuard(app=None, max_chunk_tokens=100)
    envelopes = []
    for value in _WRONG:
        envelopes.append(_envelope(value))
        envelopes.append(_envelope([value]))
        for key in ("action_type", "action_version", "payload"):
            action = _action({"namespace": "alice", "spans": [[0, 2]]})
            action[key] = value
            envelopes.append(_envelope([action]))
        for field in ("namespace", "spans", "register", "blend", "forget", "capture", "exact"):
            for base in ({"namespace": "alice", "spans": [[0, 2]]}, {"namespace": "alice", "spans": [],
                                                                      "forget": ["x"]}):
                envelopes.append(_envelope([_action({**base, field: value})]))
    for envelope in envelopes:
        try:
            parse_kv_hints(envelope)
        except ValueError:
            pass
        body = json.dumps({"input_ids": [1, 2, 3], "kv_hints": envelope}).encode()
        assert guard.check(body) is None or isinstance(guard.check(body), str)


def _client():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    async def generate(request):
        return JSONResponse({"text": "ok"})

    routes = [Route("/generate", generate, methods=["POST", "PUT"]),
              Route("/vertex_generate", generate, methods=["POST"])]
    return TestClient(ChunkHintsGuard(Starlette(routes=routes), max_chunk_tokens=100))


def test_guard_answers_actions_null_with_a_400_in_the_generate_shape():
    client = _client()
    for actions in (None, 7, "amem.chunks"):
        reply = client.post("/generate", json={"input_ids": [1, 2, 3],
                                               "kv_hints": _envelope(actions) | {"note": "amem.chunks"}})
        assert reply.status_code == 400, reply.text
        assert "actions must be a list" in reply.json()["error"]["message"]
    good = client.post("/generate", json={"input_ids": [1, 2, 3, 4], "kv_hints": build_kv_hints("alice", [(0, 3)])})
    assert good.status_code == 200 and good.json() == {"text": "ok"}


def _check(body: dict) -> str | None:
    return ChunkHintsGuard(app=None, max_chunk_tokens=100).check(json.dumps(body).encode())


def test_spans_on_a_prompt_without_input_ids_are_refused():
    """Spans index input_ids: on a text prompt (or embeddings) they cannot be checked, so they are
    refused instead of being passed on unchecked (and ignored by the scheduler when out of range)."""
    for register in (False, True):
        hints = build_kv_hints("alice", [(0, 3)], register=register)
        for prompt in ({"text": "hello there"}, {"text": ["a", "b"]}, {"input_embeds": [[0.1, 0.2]]},
                       {"input_ids": [1, "2", 3, 4]}):
            message = _check({**prompt, "kv_hints": hints})
            assert message and "input_ids" in message, (prompt, message)
    # Actions without spans need no token ids: a forget, an exact turn with no spans.
    assert _check({"text": "hello", "kv_hints": build_kv_hints("alice", [], forget=["*"])}) is None
    assert _check({"text": "hello", "kv_hints": build_kv_hints("alice", [], exact=True)}) is None
    assert _check({"input_ids": [1, 2, 3, 4], "kv_hints": build_kv_hints("alice", [(0, 3)])}) is None


def test_one_envelope_for_a_batch_is_checked_against_every_prompt():
    """SGLang hands a single kv_hints envelope to every request of a batch: each prompt is checked."""
    hints = build_kv_hints("alice", [(0, 3)])
    assert _check({"input_ids": [[1, 2, 3, 4], [5, 6, 7]], "kv_hints": hints}) is None
    message = _check({"input_ids": [[1, 2, 3, 4], [5]], "kv_hints": hints})
    assert message and "runs past the prompt" in message
    message = _check({"input_ids": [[1] * 300, [2] * 300], "kv_hints": build_kv_hints("alice", [(0, 200)])})
    assert message and "exceeds the chunk limit" in message


def test_an_escaped_action_type_is_still_checked():
    """``amem\\u002echunks`` decodes to the action type; the raw-bytes pre-filter must not miss it."""
    hints = json.dumps(build_kv_hints("alice", [(0, 9)]))
    for escaped in (hints.replace("amem.chunks", "amem\\u002echunks"),
                    hints.replace("action_type", "action\\u005ftype").replace("amem.chunks", "\\u0061mem.chunks")):
        assert "amem.chunks" not in escaped
        body = b'{"input_ids": [1, 2, 3], "kv_hints": %s}' % escaped.encode()
        reply = _client().post("/generate", content=body, headers={"content-type": "application/json"})
        assert reply.status_code == 400, reply.text
        assert "runs past the prompt" in reply.json()["error"]["message"]


@pytest.mark.parametrize("bad", ["alice\n", "a\n", "alice\r\n"])
def test_a_namespace_with_a_trailing_newline_is_refused(bad):
    with pytest.raises(ValueError, match="namespace must be"):
        validate_namespace(bad)


def test_put_generate_and_the_vertex_route_are_checked_too():
    """SGLang's /generate takes PUT as well as POST, and its Vertex route builds a /generate request
    from instances and parameters: both reach the scheduler with the same kv_hints."""
    client = _client()
    past = build_kv_hints("alice", [(0, 9)])
    reply = client.put("/generate", json={"input_ids": [1, 2, 3], "kv_hints": past})
    assert reply.status_code == 400 and "runs past the prompt" in reply.json()["error"]["message"]
    vertex = {"instances": [{"input_ids": [1] * 10}, {"input_ids": [1, 2, 3]}], "parameters": {"kv_hints": past}}
    reply = client.post("/vertex_generate", json=vertex)
    assert reply.status_code == 400 and "runs past the prompt" in reply.json()["error"]["message"]
    text = {"instances": [{"text": "hello"}], "parameters": {"kv_hints": past}}
    reply = client.post("/vertex_generate", json=text)
    assert reply.status_code == 400 and "input_ids" in reply.json()["error"]["message"]
    fine = {"instances": [{"input_ids": [1] * 10}], "parameters": {"kv_hints": past}}
    assert client.post("/vertex_generate", json=fine).status_code == 200
    assert client.put("/generate", json={"input_ids": [1] * 9, "kv_hints": past}).status_code == 200


@pytest.mark.slow
def test_the_served_generate_route_answers_bad_hints_with_400_and_keeps_answering(amem_server):
    """On the real server: each of these was a 500 (actions null) or passed on unchecked (text
    prompt, a batch under one envelope, an escaped action type, PUT, the Vertex route)."""
    import requests

    url = amem_server.url
    past = build_kv_hints("alice", [(0, 50)])
    sampling = {"max_new_tokens": 1, "temperature": 0}
    cases = [
        ("post", "/generate", {"input_ids": [1, 2, 3], "sampling_params": sampling,
                               "kv_hints": _envelope(None) | {"note": "amem.chunks"}}, "actions must be a list"),
        ("post", "/generate", {"input_ids": [1, 2, 3], "sampling_params": sampling,
                               "kv_hints": _envelope("amem.chunks")}, "actions must be a list"),
        ("post", "/generate", {"text": "hello there", "sampling_params": sampling, "kv_hints": past}, "input_ids"),
        ("post", "/generate", {"input_ids": [[1] * 60, [1, 2]], "sampling_params": sampling, "kv_hints": past},
         "runs past the prompt"),
        ("put", "/generate", {"input_ids": [1, 2, 3], "sampling_params": sampling, "kv_hints": past},
         "runs past the prompt"),
        ("post", "/vertex_generate", {"instances": [{"input_ids": [1, 2, 3]}],
                                      "parameters": {"sampling_params": sampling, "kv_hints": past}},
         "runs past the prompt"),
    ]
    for method, path, body, reason in cases:
        reply = getattr(requests, method)(url + path, json=body, timeout=120)
        assert reply.status_code == 400, (path, body, reply.status_code, reply.text[:300])
        assert reason in reply.json()["error"]["message"], reply.text[:300]
    escaped = json.dumps({"input_ids": [1, 2, 3], "sampling_params": sampling, "kv_hints": past})
    reply = requests.post(url + "/generate", data=escaped.replace("amem.chunks", "amem\\u002echunks"),
                          headers={"content-type": "application/json"}, timeout=120)
    assert reply.status_code == 400 and "runs past the prompt" in reply.json()["error"]["message"], reply.text
    ok = requests.post(f"{url}/generate", json={"text": "The capital of France is", "sampling_params": sampling},
                       timeout=120)
    assert ok.status_code == 200 and ok.json()["meta_info"]["completion_tokens"] >= 1
