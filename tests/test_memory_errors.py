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
    ("/amem/v1/sessions", '{"namespace": "zz", "bogus": 1}', 422, "bogus: Extra inputs are not permitted"),
])
def test_bad_bodies_get_the_memory_shape_without_internals(client, path, body, status, words):
    reply = client.post(path, content=body, headers={"content-type": "application/json"})
    assert reply.status_code == status, reply.text
    err = reply.json()["error"]
    assert words in err["message"] and err["code"] == status and err["type"] == "invalid_request_error"
    assert "File " not in reply.text and ".py" not in reply.text and "nope" not in reply.text
