"""Memory routes answer bad bodies in the memory API's own error shape, without internals, even on an
app whose RequestValidationError handler is SGLang's (which answers 400 in its own shape, with the
handler's file and line in the message)."""

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from amem_sgl.memory import api


@pytest.fixture(scope="module")
def client():
    from sglang.srt.entrypoints.http_server import validation_exception_handler
    from fastapi.exceptions import RequestValidationError

    app = FastAPI()
    app.add_exception_handler(RequestValidationError, validation_exception_handler)
    app.include_router(api.router)
    return TestClient(app)


@pytest.mark.parametrize("path, body, status, words", [
    ("/amem/v1/remember", '{"namespace": "zz", "texts": "nope"}', 422, "texts: Input should be a valid list"),
    ("/amem/v1/remember", '{"namespace": 5, "texts": ["x"]}', 422, "namespace:"),
    ("/amem/v1/remember", '{"namespace": "zz", "texts": [', 400, "not valid JSON"),
    ("/amem/v1/search", '{"namespace": "zz", "query": "x", "k": 0}', 422, "k:"),
    ("/amem/v1/search", '{"namespace": "zz", "query": "x", "k": true}', 422, "k:"),  # a bool is not a count
    ("/amem/v1/search", '{"namespace": "zz", "query": "   "}', 422, "query:"),  # nothing to search for
    ("/amem/v1/sessions", '{"namespace": "zz", "k": true}', 422, "k:"),
    ("/amem/v1/sessions", '{"namespace": "zz", "bogus": 1}', 422, "bogus: Extra inputs are not permitted"),
])
def test_bad_bodies_get_the_memory_shape_without_internals(client, path, body, status, words):
    reply = client.post(path, content=body, headers={"content-type": "application/json"})
    assert reply.status_code == status, reply.text
    err = reply.json()["error"]
    assert words in err["message"] and err["code"] == status and err["type"] == "invalid_request_error"
    assert "File " not in reply.text and ".py" not in reply.text and "nope" not in reply.text


@pytest.fixture
def memory_client(tmp_path, monkeypatch):
    """The memory routes over a layer of their own (a fresh store; chunks remembered ``first_use``,
    so nothing is sent to a server), with the memory API's error handler."""
    import dataclasses

    from amem_sgl.config import AmemConfig
    from amem_sgl.memory import layer as memory
    from amem_sgl.memory.errors import error
    from amem_sgl.models import ensure_embedded_model

    config = AmemConfig()
    config = dataclasses.replace(config, memory=dataclasses.replace(config.memory, dir=str(tmp_path), prefill="first_use"))
    layer = memory.MemoryLayer(config, base_url="http://unused", model_id="m", tokenizer_path=str(ensure_embedded_model()))
    monkeypatch.setattr(memory, "ACTIVE", layer)
    app = FastAPI()
    app.include_router(api.router)
    app.add_exception_handler(memory.MemoryError_, lambda request, exc: error(exc.status, str(exc)))
    return TestClient(app), layer


@pytest.mark.parametrize("body, field", [
    ('{"namespace": "nan", "texts": ["Carol likes green tea."], "metadata": {"score": NaN}}', "metadata.score"),
    ('{"namespace": "nan", "texts": ["Carol likes green tea."], "metadata": {"a": {"b": [1, Infinity]}}}',
     "metadata.a.b[1]"),
    ('{"namespace": "nan", "texts": ["Carol likes green tea."], "metadata": {"big": 1e999}}', "metadata.big"),
    ('{"namespace": "nan", "documents": [{"text": "Carol likes green tea.", "metadata": {"s": -Infinity}}]}',
     "documents[0].metadata.s"),
])
def test_non_finite_metadata_is_refused_and_nothing_is_stored(memory_client, body, field):
    client, layer = memory_client
    ok = client.post("/amem/v1/remember", json={"namespace": "nan", "texts": ["Dave likes coffee."], "metadata": {"x": 1.5}})
    assert ok.status_code == 200, ok.text
    reply = client.post("/amem/v1/remember", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == 400, reply.text
    err = reply.json()["error"]
    assert field in err["message"] and "NaN" in err["message"] and err["type"] == "invalid_request_error"
    listed = client.get("/amem/v1/namespaces/nan/chunks")
    assert listed.status_code == 200, listed.text
    assert [c["text"] for c in listed.json()["chunks"]] == ["Dave likes coffee."]  # nothing of it stored
    found = client.post("/amem/v1/search", json={"namespace": "nan", "query": "What does Carol like?", "k": 4})
    assert found.status_code == 200 and len(found.json()["results"]) == 1, found.text


def test_a_namespace_stored_with_non_finite_metadata_still_lists_and_searches(memory_client, tmp_path):
    """An older version stored NaN/Infinity (chunks.json holds them): nothing of it is lost -- served
    as null, the rest of the metadata as it was, after a restart too."""
    import json
    import math

    client, layer = memory_client
    layer.store.add("old", [("a" * 64, "Carol likes green tea.", [1, 2], {"score": math.nan, "n": 3, "deep": [math.inf]}),
                            ("b" * 64, "Dave likes coffee.", [3], {"score": 0.5})])
    assert "NaN" in (tmp_path / "old" / "chunks.json").read_text()  # as an older version wrote it
    from amem_sgl.memory.store import MemoryStore

    layer.store = MemoryStore(tmp_path, layer.store.embedder)  # a restart: read back from disk
    listed = client.get("/amem/v1/namespaces/old/chunks")
    assert listed.status_code == 200, listed.text
    meta = {c["text"]: c["metadata"] for c in json.loads(listed.text)["chunks"]}
    assert meta == {"Carol likes green tea.": {"score": None, "n": 3, "deep": [None]}, "Dave likes coffee.": {"score": 0.5}}
    one = client.get(f"/amem/v1/namespaces/old/chunks/{'a' * 64}")
    assert one.status_code == 200 and one.json()["metadata"]["score"] is None, one.text
    found = client.post("/amem/v1/search", json={"namespace": "old", "query": "green tea", "k": 2})
    assert found.status_code == 200, found.text
    assert found.json()["results"][0]["text"] == "Carol likes green tea." and found.json()["results"][0]["metadata"]["score"] is None


@pytest.mark.slow
def test_served_remember_with_nan_metadata_gets_400_and_the_namespace_still_lists(amem_server):
    import requests

    url = amem_server.url
    body = '{"namespace": "nanserved", "texts": ["Carol likes green tea."], "metadata": {"score": NaN}}'
    reply = requests.post(f"{url}/amem/v1/remember", data=body, headers={"content-type": "application/json"}, timeout=120)
    assert reply.status_code == 400 and "metadata.score" in reply.json()["error"]["message"], reply.text
    assert requests.get(f"{url}/amem/v1/namespaces/nanserved/chunks", timeout=60).status_code == 404  # nothing stored
    ok = requests.post(f"{url}/amem/v1/remember", json={"namespace": "nanserved", "texts": ["Carol likes green tea."],
                                                         "metadata": {"score": 1.0}}, timeout=300)
    assert ok.status_code == 200, ok.text
    listed = requests.get(f"{url}/amem/v1/namespaces/nanserved/chunks", timeout=60)
    assert listed.status_code == 200 and listed.json()["chunks"][0]["metadata"] == {"score": 1.0}, listed.text
    found = requests.post(f"{url}/amem/v1/search", json={"namespace": "nanserved", "query": "tea"}, timeout=60)
    assert found.status_code == 200 and found.json()["results"], found.text
