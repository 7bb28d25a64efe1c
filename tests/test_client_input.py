"""Bad input on the client side -- SDK, CLI, MCP tools, proxy flags -- is refused before anything is
sent, with a clear message: never "forget the whole namespace" for an empty chunk id, never another
namespace's URL for a namespace like ``../../bob``, never a traceback from the CLI. No server: a
recording stand-in for ``requests.request`` shows what would have been sent."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

import pytest
import requests

from amem_sgl import cli, sdk
from amem_sgl.sdk import Amem

CHUNK = "ab" * 32  # a well-formed chunk id (64 lowercase hex)


class _Reply:
    status_code = 200
    headers: dict = {}

    def __init__(self, data):
        self._data = data

    def json(self):
        return self._data


@pytest.fixture
def sent(monkeypatch):
    """The (method, url) of every request the SDK sends; each is answered with an empty success."""
    calls = []

    def request(method, url, **kwargs):
        calls.append((method, url))
        return _Reply({"forgotten": [], "chunks": []})

    monkeypatch.setattr(sdk.requests, "request", request)
    return calls


@pytest.mark.parametrize("chunk_id", ["", "   ", "ABAB" * 16, "ab" * 31, "ab" * 33, "../x", "zz" * 32])
def test_forget_with_a_bad_chunk_id_is_a_value_error_not_the_whole_namespace(sent, chunk_id):
    with pytest.raises(ValueError, match="chunk id"):
        Amem("http://127.0.0.1:9").forget("alice", chunk_id)
    assert sent == []


@pytest.mark.parametrize("call", [
    lambda a: a.forget("alice", "../../bob"),
    lambda a: a.forget("../bob"),
    lambda a: a.forget("alice/../bob"),
    lambda a: a.forget("bob?x=1"),
    lambda a: a.forget(""),
    lambda a: a.list("../bob"),
    lambda a: a.list("a%2F..%2Fb"),
    lambda a: a.search("../bob", "q"),
    lambda a: a.remember("../bob", ["text"]),
    lambda a: a.start_session("../bob"),
    lambda a: a.start_session("alice", chunk_ids=[""]),
])
def test_a_namespace_or_chunk_id_that_could_leave_its_path_segment_is_refused(sent, call):
    with pytest.raises(ValueError):
        call(Amem("http://127.0.0.1:9"))
    assert sent == []


def test_path_segments_are_quoted_and_forget_sends_the_route_it_means(sent):
    amem = Amem("http://127.0.0.1:9")
    amem.forget("alice", CHUNK)
    amem.forget("alice")  # None, and only None: the whole namespace
    sdk.Session(amem, "s/../x", "alice", []).end()
    with pytest.raises(ValueError):
        sdk.Session(amem, "..", "alice", []).end()
    assert sent == [("DELETE", f"http://127.0.0.1:9/amem/v1/namespaces/alice/chunks/{CHUNK}"),
                    ("DELETE", "http://127.0.0.1:9/amem/v1/namespaces/alice"),
                    ("DELETE", "http://127.0.0.1:9/amem/v1/sessions/s%2F..%2Fx")]


@pytest.mark.parametrize("url", ["http://", "https:///path", "http://host:port"])
def test_a_url_without_a_host_or_with_a_bad_port_is_a_value_error(url):
    with pytest.raises(ValueError):
        Amem(url)


def test_mcp_forget_with_an_empty_chunk_id_is_a_tool_error(sent):
    pytest.importorskip("mcp")
    from mcp.server.mcpserver.exceptions import ToolError

    from amem_sgl.mcp_server import build_server

    server = build_server("http://127.0.0.1:9")
    for args in ({"namespace": "alice", "chunk_id": ""}, {"namespace": "../bob"}):
        with pytest.raises(ToolError, match="chunk id|namespace"):
            asyncio.run(server.call_tool("forget", args))
    assert sent == []


# ---------------------------------------------------------------------------------------------- CLI


def _closed_port_url() -> str:
    with socket.socket() as s:  # bound, never listening
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    return str(path)


@pytest.mark.parametrize("argv", [
    ["search", "alice", "q", "-k", "0"],
    ["ask", "alice", "q", "--max-tokens", "0"],
    ["remember", "alice", "--file", "/nonexistent/amem-test.txt"],
    ["remember", "alice", "--file", "NOT_UTF8"],
    ["--url", "not-a-url", "search", "alice", "q"],
    ["--url", "http://", "search", "alice", "q"],
    ["--url", "CLOSED", "search", "alice", "q"],
    ["forget", "alice", ""],
    ["forget", "alice", "../../bob"],
    ["forget", "../bob"],
])
def test_the_cli_says_a_bad_argument_in_one_line_and_exits_2(capsys, monkeypatch, not_utf8, argv):
    closed = _closed_port_url()  # the default URL too: were anything sent, it reaches no server
    sent = []
    real = requests.request

    def request(method, url, **kwargs):
        sent.append(url)
        return real(method, url, **kwargs)

    monkeypatch.setattr(sdk.requests, "request", request)
    unreachable = "CLOSED" in argv  # the one case that tries to connect
    argv = [not_utf8 if a == "NOT_UTF8" else closed if a == "CLOSED" else a for a in argv]
    if "--url" not in argv:
        argv = ["--url", closed, *argv]
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "error: " in err and "Traceback" not in err, err
    assert all(url.startswith(closed) for url in sent) and bool(sent) == unreachable, sent


@pytest.mark.parametrize("command", [["search", "alice", "q"], ["ask", "alice", "q"], ["remember", "alice", "x"],
                                     ["forget", "alice"]])
def test_url_and_api_key_work_after_the_subcommand_too(monkeypatch, capsys, command):
    """`amem ask ns q --url U --api-key K` (as the MCP docstring shows `amem mcp --url U`) is the
    same request as `amem --url U --api-key K ask ns q`: sent to U with K, not an argparse error."""
    closed = _closed_port_url()
    sent = []

    def request(method, url, **kwargs):
        sent.append((url, (kwargs.get("headers") or {}).get("Authorization")))
        raise requests.ConnectionError("refused")

    monkeypatch.setattr(sdk.requests, "request", request)
    assert cli.main([*command, "--url", closed, "--api-key", "k-after"]) == 2  # cannot reach: one line
    after = list(sent)
    sent.clear()
    assert cli.main(["--url", closed, "--api-key", "k-after", *command]) == 2
    assert after and after == sent and after[0][0].startswith(closed) and after[0][1] == "Bearer k-after"
    assert "unrecognized arguments" not in capsys.readouterr().err


def test_the_cli_exits_2_without_a_traceback_as_a_process():
    done = subprocess.run([sys.executable, "-m", "amem_sgl.cli", "--url", "not-a-url", "search", "alice", "q"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "error: " in done.stderr, done.stderr


# -------------------------------------------------------------------------------------------- proxy


@pytest.mark.parametrize("flags, said", [
    (["--focus", "-1"], "--focus"),
    (["--timeout", "0"], "--timeout"),
    (["--timeout", "-5"], "--timeout"),
    (["--timeout", "nan"], "--timeout"),
    (["--port", "-1"], "--port"),
    (["--port", "70000"], "--port"),
])
def test_proxy_flags_that_would_fail_every_turn_are_refused_at_start(capsys, flags, said):
    from amem_sgl.proxy.__main__ import parse

    with pytest.raises(SystemExit) as done:
        parse(["--upstream", "http://127.0.0.1:9", *flags])
    assert done.value.code == 2 and said in capsys.readouterr().err


def test_proxy_block_k_over_what_a_memory_server_returns_is_refused_at_start(capsys):
    """A --memory server's search returns at most 100 chunks (SearchRequest.k): more was a 502 every turn."""
    from amem_sgl.proxy.__main__ import parse

    with pytest.raises(SystemExit) as done:
        parse(["--upstream", "http://127.0.0.1:9", "--memory", "http://127.0.0.1:30000", "--block-k", "101"])
    assert done.value.code == 2 and "--block-k" in capsys.readouterr().err
    args = parse(["--upstream", "http://127.0.0.1:9", "--memory", "http://127.0.0.1:30000", "--block-k", "100",
                  "--focus", "0"])
    assert args.block_k == 100 and args.focus == 0
    assert parse(["--upstream", "http://127.0.0.1:9", "--store", "/tmp/x", "--block-k", "200"]).block_k == 200


def test_plan_memory_refuses_a_negative_focus():
    from amem_sgl.proxy import layout
    from amem_sgl.proxy.sessions import Session

    chunks = [{"id": f"{i:064x}", "text": f"Fact {i}.", "created": float(i)} for i in range(4)]
    with pytest.raises(ValueError, match="focus"):
        layout.plan_memory(Session("key", "ns"), chunks, {c["id"]: 5 for c in chunks}, 4, 0.5, focus=-1)
