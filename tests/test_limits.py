"""RequestBodyLimit middleware on a small Starlette app (real ASGI stack, real HTTP client)."""

from __future__ import annotations

import hashlib

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from amem_sgl.server.limits import RequestBodyLimit


async def echo(request: Request):
    body = await request.body()
    return JSONResponse({"size": len(body), "sha": hashlib.sha256(body).hexdigest(), "body_head": body[:20].decode()})


async def stream(request: Request):
    await request.body()

    async def parts():
        for i in range(3):
            yield f"part{i};"

    return StreamingResponse(parts())


@pytest.fixture
def client():
    app = Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/stream", stream, methods=["POST"])])
    app.add_middleware(RequestBodyLimit, max_bytes=1000)
    return TestClient(app)


def test_small_bodies_pass_through_unchanged(client):
    body = b"x" * 1000
    reply = client.post("/echo", content=body)
    assert reply.status_code == 200
    assert reply.json() == {"size": 1000, "sha": hashlib.sha256(body).hexdigest(), "body_head": "x" * 20}


def test_declared_oversized_body_is_refused_with_413_and_a_message(client):
    reply = client.post("/echo", content=b"y" * 1001)
    assert reply.status_code == 413
    error = reply.json()
    assert error["code"] == 413 and "1001 bytes" in error["message"] and "1000" in error["message"]


def test_chunked_body_without_a_length_is_counted(client):
    def chunks():
        for _ in range(5):
            yield b"z" * 300

    reply = client.post("/echo", content=chunks())
    assert reply.status_code == 413
    assert "over" in reply.json()["message"]


def test_chunked_body_under_the_limit_is_reassembled(client):
    def chunks():
        yield b'{"a": '
        yield b'"hello"}'

    reply = client.post("/echo", content=chunks())
    assert reply.status_code == 200 and reply.json()["body_head"] == '{"a": "hello"}'


def test_streaming_responses_still_stream(client):
    with client.stream("POST", "/stream", content=b"{}") as reply:
        assert reply.status_code == 200
        assert "".join(reply.iter_text()) == "part0;part1;part2;"


def test_get_requests_are_untouched(client):
    assert client.get("/echo").status_code == 405  # routed as usual, not blocked
