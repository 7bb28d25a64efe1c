"""Bad input the proxy fuzz (benchmarks/reliability/proxy_fuzz.py) found, as regression tests on the
proxy app in-process (fast; no model). Each once answered a 502 (a proxy failure), an error in
another API's shape, or went to the wrong place. The served fuzz (tests/reliability/test_proxy_fuzz.py)
runs the same against a real amem server; here the upstream, where one is needed, is a stand-in: a
socket server that records the request bytes and answers as SGLang does (its OpenAI error object
at the top level), so the test can see both sides."""

from __future__ import annotations

import json
import socket
import threading

import pytest
from fastapi.testclient import TestClient

from amem_sgl.proxy.server import ProxyConfig, create_app

SGLANG_ERROR = {"object": "error", "message": "max_tokens must be positive", "type": "BadRequestError",
                "param": None, "code": 400}


class StandIn:
    """An HTTP/1.1 upstream that answers every request with SGLang's error object and keeps the bytes."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.seen: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            conn, _ = self.listener.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                size = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                             if line.lower().startswith(b"content-length:")), 0)
                while len(body) < size:
                    body += conn.recv(65536)
                self.seen.append(head)
                out = json.dumps(SGLANG_ERROR).encode()
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: "
                             + str(len(out)).encode() + b"\r\nconnection: close\r\n\r\n" + out)


@pytest.fixture()
def upstream():
    return StandIn()


def _client(tmp_path, upstream_url: str = "http://127.0.0.1:9") -> TestClient:
    config = ProxyConfig(upstream=upstream_url, store_dir=str(tmp_path / "m"), state_dir=str(tmp_path / "s"),
                         timeout_s=5)
    return TestClient(create_app(config), raise_server_exceptions=False)


def _anthropic_error(reply, status: int = 400) -> str:
    assert reply.status_code == status, reply.text
    data = reply.json()
    assert data["type"] == "error" and data["error"]["type"] and data["error"]["message"], data
    return data["error"]["message"]


def _openai_error(reply, status: int = 400) -> str:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["type"] and error["message"], error
    return error["message"]


def _memory_error(reply, status: int) -> str:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == status and error["type"] and error["message"], error
    return error["message"]


@pytest.mark.parametrize("field,value", [("system", 5), ("system", {"a": 1}), ("tools", 5), ("tools", [5]),
                                         ("content", 5), ("model", ["m"])])
def test_anthropic_fields_the_layout_reads_are_checked_first(tmp_path, field, value):
    body = {"model": "m", "max_tokens": 2, "metadata": {"user_id": "ns1"}, "messages": [{"role": "user", "content": "hi"}]}
    if field == "content":
        body["messages"][0]["content"] = value
    else:
        body[field] = value
    message = _anthropic_error(_client(tmp_path).post("/v1/messages", json=body))  # was a 502 (a TypeError)
    assert field in message


def test_a_non_string_namespace_field_is_a_400_not_a_turn_without_memory(tmp_path):
    client = _client(tmp_path)
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert "user" in _openai_error(client.post("/v1/chat/completions", json={**chat, "user": 123}))
    assert "metadata.user_id" in _anthropic_error(client.post("/v1/messages", json={
        **chat, "max_tokens": 2, "metadata": {"user_id": ["a"]}}))


def test_the_upstreams_error_comes_back_in_the_apis_shape_with_its_status_and_message(tmp_path, upstream):
    client = _client(tmp_path, upstream.url)
    chat = {"model": "m", "max_tokens": -1, "messages": [{"role": "user", "content": "hi"}]}
    for body in (chat, {**chat, "user": "ns1"}):  # pass-through and memory turn
        assert _openai_error(client.post("/v1/chat/completions", json=body)) == SGLANG_ERROR["message"]
    assert _anthropic_error(client.post("/v1/messages", json={**chat, "metadata": {"user_id": "ns1"}})) == \
        SGLANG_ERROR["message"]
    assert _openai_error(client.post("/v1/completions", json={"prompt": "x"})) == SGLANG_ERROR["message"]
    native = client.post("/generate", json={"text": "x"})  # SGLang's own route: its own shape, as it came
    assert native.status_code == 400 and native.json() == SGLANG_ERROR


def test_header_bytes_that_are_not_ascii_are_forwarded_as_they_came(tmp_path, upstream):
    client = _client(tmp_path, upstream.url)
    reply = client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                        headers={"x-amem-session": "café-session".encode()})  # UTF-8: the test client keeps it
    assert reply.status_code == 400, reply.text  # the upstream's answer, not a 502 (a UnicodeEncodeError)
    assert "x-amem-session: café-session".encode() in upstream.seen[-1].lower()


def test_the_local_store_answers_every_memory_path_itself(tmp_path, upstream):
    client = _client(tmp_path, upstream.url)
    assert "--memory" in _memory_error(client.post("/amem/v1/sessions", json={"namespace": "ns1"}), 404)
    _memory_error(client.delete("/amem/v1/sessions/abc"), 404)
    _memory_error(client.get("/amem/v1/anything"), 404)
    _memory_error(client.patch("/amem/v1/namespaces"), 405)
    _memory_error(client.put("/amem/v1/remember", json={}), 405)
    _memory_error(client.post("/amem/v1/remember", content=b"\xff{", headers={"content-type": "application/json"}), 400)
    assert upstream.seen == []  # none of them went to the chat upstream


def test_the_local_store_keeps_the_servers_limits_on_text(tmp_path):
    client = _client(tmp_path)
    bad = b'{"namespace": "ns1", "texts": ["before \\ud800 after"]}'  # a lone surrogate, as a JSON escape
    assert "unicode" in _memory_error(client.post("/amem/v1/remember", content=bad,
                                                  headers={"content-type": "application/json"}), 400)
    assert "non-empty" in _memory_error(client.post("/amem/v1/remember", json={"namespace": "ns1", "texts": ["  "]}), 400)
    search = b'{"namespace": "ns1", "query": "x \\udcff"}'
    _memory_error(client.post("/amem/v1/search", content=search, headers={"content-type": "application/json"}), 400)
    many = client.post("/amem/v1/remember", json={"namespace": "ns1", "texts": ["x"] * 1100})
    assert "1100 chunks" in _memory_error(many, 413)
    assert client.get("/amem/v1/namespaces").json() == {"namespaces": []}  # nothing was stored


def test_a_body_over_the_limit_is_a_413_in_the_apis_shape_declared_or_chunked(tmp_path, upstream):
    config = ProxyConfig(upstream=upstream.url, store_dir=str(tmp_path / "m"), state_dir=str(tmp_path / "s"),
                         max_request_bytes=1000)
    client = TestClient(create_app(config), raise_server_exceptions=False)
    big = json.dumps({"model": "m", "user": "ns1", "messages": [{"role": "user", "content": "x" * 2000}]}).encode()
    assert "limit" in _openai_error(client.post("/v1/chat/completions", content=big), 413)
    assert "limit" in _anthropic_error(client.post("/v1/messages", content=big), 413)
    assert "limit" in _memory_error(client.post("/amem/v1/remember", content=big), 413)
    chunked = client.post("/v1/chat/completions", content=iter([big[:600], big[600:]]))  # no Content-Length
    assert "limit" in _openai_error(chunked, 413)
    assert upstream.seen == []  # nothing over the limit went upstream
    small = client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert small.status_code == 400 and upstream.seen  # under it: forwarded (the stand-in's 400)


def test_the_local_store_refuses_nan_metadata_and_still_lists_what_it_holds(tmp_path):
    """As on the server's memory API: NaN or Infinity in metadata (Python's JSON parser reads them)
    is a 400 naming the field, nothing stored; the namespace stays listable and searchable."""
    client = _client(tmp_path)
    assert client.post("/amem/v1/remember", json={"namespace": "ns1", "texts": ["Carol likes tea."]}).status_code == 200
    for bad in (b'{"namespace": "ns1", "texts": ["Rex barks."], "metadata": {"score": NaN}}',
                b'{"namespace": "ns1", "documents": [{"text": "Rex barks.", "metadata": {"s": [1e999]}}]}'):
        message = _memory_error(client.post("/amem/v1/remember", content=bad,
                                            headers={"content-type": "application/json"}), 400)
        assert "NaN or Infinity" in message and "metadata" in message
    listed = client.get("/amem/v1/namespaces/ns1/chunks")
    assert listed.status_code == 200 and [c["text"] for c in listed.json()["chunks"]] == ["Carol likes tea."]
    assert client.post("/amem/v1/search", json={"namespace": "ns1", "query": "tea"}).status_code == 200
