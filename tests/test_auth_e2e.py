"""API keys scoped to namespaces on a real server (one started for this module with a keys file and
SGLang's own --api-key): a namespace is a tenant boundary on every route that can use it.

Keys: alice's (namespace alice), bob's (namespace bob), SGLang's --api-key (the operator: admin).
Nobody crosses: bob's key gets 403 on every route for alice's namespace, no key gets 401, and
alice's memory is intact afterwards."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest
import requests
import yaml

from amem_sgl.local_server import free_port, start_server
from amem_sgl.server import auth
from tests.server import ROOT, STARTUP_BOUND_S

pytestmark = pytest.mark.slow

SGLANG_KEY = "sgl-operator-key-for-tests"
ALICE = ["Alice's bank PIN is 7391.", "Alice's sister Maria lives in Denver."]
BOB = ["Bob's dog is named Rex."]


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """(server, keys file, {name: key}) -- started once for the module, stopped after it."""
    work = tmp_path_factory.mktemp("amem-auth")
    keys_file = work / "keys.json"
    keys = {"alice": auth.add_key(keys_file, ["alice"])[0], "bob": auth.add_key(keys_file, ["bob"])[0]}
    config = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    config.setdefault("amem", {})["auth"] = {"keys_file": str(keys_file)}
    config_path = work / "auth.yaml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    server = start_server(
        f"{sys.executable} -m amem_sgl.launch_server --config {config_path} --port {port} "
        f"--max-total-tokens 16384 --api-key {SGLANG_KEY}", port=port, log_path=work / "server.log", cwd=ROOT,
        timeout_s=STARTUP_BOUND_S, env={"PYTHONUNBUFFERED": "1", "AMEM_SGL_RESIDENCY_DIR": str(work / "residency"),
                                         "AMEM_SGL_MEMORY_DIR": str(work / "memory")})
    try:
        yield server, keys_file, keys
    finally:
        server.stop()


def call(server, method, path, key=None, body=None, headers=None, timeout=300):
    h = dict(headers or {})
    if key:
        h["Authorization"] = f"Bearer {key}"
    return requests.request(method, f"{server.url}{path}", json=body, headers=h, timeout=timeout)


def hints(namespace, spans, **extra):
    return {"protocol_version": "1", "message_id": "m", "actions": [
        {"action_id": "a", "action_type": "amem.chunks", "action_version": "1",
         "payload": {"namespace": namespace, "spans": spans, **extra}}]}


@pytest.fixture(scope="module")
def remembered(keyed):
    server, _, keys = keyed
    alice = call(server, "POST", "/amem/v1/remember", keys["alice"], {"namespace": "alice", "texts": ALICE})
    assert alice.status_code == 200, alice.text
    bob = call(server, "POST", "/amem/v1/remember", keys["bob"], {"namespace": "bob", "texts": BOB})
    assert bob.status_code == 200, bob.text
    return alice.json()["ids"], bob.json()["ids"]


def assert_denied(reply, status, shape):
    assert reply.status_code == status, (reply.status_code, reply.text)
    data = reply.json()
    if shape == "memory":
        assert data["error"]["code"] == status and data["error"]["message"]
        assert data["error"]["type"] == {401: "authentication_error", 403: "permission_error"}[status]
    elif shape == "openai":
        assert data["object"] == "error" and data["code"] == status and data["message"]
    elif shape == "anthropic":
        assert data["type"] == "error" and data["error"]["message"]
    else:
        assert set(data) == {"error"} and data["error"]["message"]
    assert "7391" not in reply.text and "Denver" not in reply.text


def test_memory_routes_refuse_other_tenants_and_no_key(keyed, remembered):
    server, _, keys = keyed
    alice_ids, _ = remembered
    cid = alice_ids[0]
    routes = [("POST", "/amem/v1/remember", {"namespace": "alice", "texts": ["Bob was here."]}),
              ("POST", "/amem/v1/search", {"namespace": "alice", "query": "PIN"}),
              ("GET", "/amem/v1/namespaces/alice/chunks", None),
              ("GET", f"/amem/v1/namespaces/alice/chunks/{cid}", None),
              ("DELETE", f"/amem/v1/namespaces/alice/chunks/{cid}", None),
              ("DELETE", "/amem/v1/namespaces/alice", None),
              ("POST", "/amem/v1/sessions", {"namespace": "alice", "query": "PIN"}),
              ("GET", "/amem/v1/namespaces/carol/chunks", None)]  # unknown namespace: 403, not 404
    for method, path, body in routes:
        assert_denied(call(server, method, path, keys["bob"], body), 403, "memory")
        assert_denied(call(server, method, path, None, body), 401, "memory")
        assert_denied(call(server, method, path, "amem_not-a-key", body), 401, "memory")
    session = call(server, "POST", "/amem/v1/sessions", keys["alice"], {"namespace": "alice", "query": "PIN"})
    assert session.status_code == 200, session.text
    sid = session.json()["session_id"]
    assert_denied(call(server, "DELETE", f"/amem/v1/sessions/{sid}", keys["bob"]), 403, "memory")
    chat = {"model": "default", "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": "PIN?"}]}
    assert_denied(call(server, "POST", "/v1/chat/completions", keys["bob"], chat, {"X-Amem-Session": sid}),
                  403, "openai")
    # Alice's key works on her namespace; listing shows each key only what it covers.
    listed = call(server, "GET", "/amem/v1/namespaces/alice/chunks", keys["alice"])
    assert listed.status_code == 200 and sorted(c["id"] for c in listed.json()["chunks"]) == sorted(alice_ids)
    assert call(server, "GET", f"/amem/v1/namespaces/alice/chunks/{cid}", keys["alice"]).json()["id"] == cid
    found = call(server, "POST", "/amem/v1/search", keys["alice"], {"namespace": "alice", "query": "bank PIN"})
    assert found.status_code == 200 and "7391" in found.text
    assert call(server, "GET", "/amem/v1/namespaces", keys["alice"]).json()["namespaces"] == ["alice"]
    assert call(server, "GET", "/amem/v1/namespaces", keys["bob"]).json()["namespaces"] == ["bob"]
    assert sorted(call(server, "GET", "/amem/v1/namespaces", SGLANG_KEY).json()["namespaces"]) == ["alice", "bob"]
    assert call(server, "DELETE", f"/amem/v1/sessions/{sid}", keys["alice"]).status_code == 200
    # Nothing bob tried changed alice's memory.
    assert sorted(c["id"] for c in call(server, "GET", "/amem/v1/namespaces/alice/chunks",
                                        SGLANG_KEY).json()["chunks"]) == sorted(alice_ids)


def test_openai_and_anthropic_turns_need_the_namespaces_key(keyed, remembered):
    server, _, keys = keyed
    alice_ids, bob_ids = remembered
    question = [{"role": "user", "content": "What is Alice's bank PIN?"}]
    chat = {"model": "default", "max_tokens": 12, "temperature": 0, "messages": question}
    assert_denied(call(server, "POST", "/v1/chat/completions", None, {**chat, "user": "alice"}), 401, "openai")
    assert_denied(call(server, "POST", "/v1/chat/completions", keys["bob"], {**chat, "user": "alice"}), 403, "openai")
    assert_denied(call(server, "POST", "/v1/chat/completions", keys["bob"], {**chat, "stream": True, "user": "alice"}),
                  403, "openai")
    assert_denied(call(server, "POST", "/v1/chat/completions", keys["bob"], chat, {"X-Amem-Namespace": "alice"}),
                  403, "openai")
    # bob's own namespace in the body, alice's in the header: the header is what the turn would use.
    assert_denied(call(server, "POST", "/v1/chat/completions", keys["bob"], {**chat, "user": "bob"},
                       {"X-Amem-Namespace": "alice"}), 403, "openai")
    assert_denied(call(server, "POST", "/v1/completions", keys["bob"],
                       {"model": "default", "prompt": "Alice's PIN is", "max_tokens": 4, "user": "alice"}), 403, "openai")
    messages = {"model": "default", "max_tokens": 12, "messages": question}
    assert_denied(call(server, "POST", "/v1/messages", keys["bob"], messages, {"X-Amem-Namespace": "alice"}),
                  403, "anthropic")
    # Alice's own key: a memory turn over her chunks (usage reports them; SGLang's key let it through).
    reply = call(server, "POST", "/v1/chat/completions", keys["alice"], {**chat, "user": "alice"})
    assert reply.status_code == 200, reply.text
    used = reply.json()["usage"]["amem"]["memory"]["chunks"]
    assert used and set(used) <= set(alice_ids) and reply.headers["x-amem-chunks"]
    anthropic = call(server, "POST", "/v1/messages", keys["alice"], messages, {"X-Amem-Namespace": "alice"})
    assert anthropic.status_code == 200, anthropic.text
    bobs = call(server, "POST", "/v1/chat/completions", keys["bob"], {**chat, "user": "bob"})
    assert bobs.status_code == 200 and not set(bobs.json()["usage"]["amem"]["memory"]["chunks"]) & set(alice_ids)


def test_generate_chunk_hints_need_the_namespaces_key(keyed, remembered):
    server, _, keys = keyed
    body = {"input_ids": [1, 2, 3, 4, 5, 6], "sampling_params": {"max_new_tokens": 1},
            "kv_hints": hints("alice", [[2, 5]])}
    assert_denied(call(server, "POST", "/generate", None, body), 401, "native")
    assert_denied(call(server, "POST", "/generate", keys["bob"], body), 403, "native")
    forget = {"input_ids": [1], "sampling_params": {"max_new_tokens": 0}, "kv_hints": {
        **hints("alice", []), "actions": [{**hints("alice", [])["actions"][0], "payload": {
            "namespace": "alice", "spans": [], "forget": ["*"]}}]}}
    assert_denied(call(server, "POST", "/generate", keys["bob"], forget), 403, "native")
    batch = {"input_ids": [[1, 2, 3, 4], [1, 2, 3, 4]], "sampling_params": {"max_new_tokens": 1},
             "kv_hints": [hints("bob", [[1, 3]]), hints("alice", [[1, 3]])]}
    assert_denied(call(server, "POST", "/generate", keys["bob"], batch), 403, "native")
    escaped = json.dumps(body).replace("kv_hints", "kv\\u005fhints").replace("amem.chunks", "amem\\u002echunks")
    reply = requests.post(f"{server.url}/generate", data=escaped, timeout=300, headers={
        "Authorization": f"Bearer {keys['bob']}", "content-type": "application/json"})
    assert_denied(reply, 403, "native")
    assert call(server, "POST", "/generate", keys["alice"], body).status_code == 200
    assert call(server, "POST", "/generate", keys["bob"], {**body, "kv_hints": hints("bob", [[2, 5]])}).status_code == 200


def test_plain_requests_keep_sglangs_api_key_semantics(keyed):
    server, _, keys = keyed
    plain = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}}
    assert call(server, "POST", "/generate", SGLANG_KEY, plain).status_code == 200
    assert call(server, "POST", "/generate", None, plain).status_code == 401
    # An amem key unlocks the namespaces it covers, not SGLang's plain inference or admin routes.
    assert call(server, "POST", "/generate", keys["alice"], plain).status_code == 401
    assert call(server, "POST", "/flush_cache", keys["alice"]).status_code == 401
    chat = {"model": "default", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
    assert call(server, "POST", "/v1/chat/completions", SGLANG_KEY, chat).status_code == 200
    assert call(server, "POST", "/v1/chat/completions", None, chat).status_code == 401
    assert requests.get(f"{server.url}/health", timeout=30).status_code == 200


def test_keys_added_and_removed_while_the_server_runs(keyed):
    server, keys_file, _ = keyed
    carol, _ = auth.add_key(keys_file, ["carol", "team-*"])
    remember = {"namespace": "carol", "texts": ["Carol plays the cello."]}
    assert call(server, "POST", "/amem/v1/remember", carol, remember).status_code == 200
    assert call(server, "POST", "/amem/v1/remember", carol, {"namespace": "team-red", "texts": ["Red wins."]}).status_code == 200
    assert_denied(call(server, "POST", "/amem/v1/search", carol, {"namespace": "alice", "query": "PIN"}), 403, "memory")
    data = json.loads(keys_file.read_text())
    del data["keys"][auth.key_hash(carol)]
    auth.write_private(keys_file, json.dumps(data))
    assert_denied(call(server, "POST", "/amem/v1/search", carol, {"namespace": "carol", "query": "cello"}), 401, "memory")
    admin, _ = auth.add_key(keys_file, [], admin=True)
    assert "carol" in call(server, "GET", "/amem/v1/namespaces", admin).json()["namespaces"]


def test_reserved_cache_keys_are_refused_with_keys_on_too(keyed):
    server, _, keys = keyed
    body = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 1}, "extra_key": "amem:ns:alice"}
    reply = call(server, "POST", "/generate", SGLANG_KEY, body)
    assert reply.status_code == 400 and "reserved" in reply.json()["error"]["message"], reply.text


def test_the_mcp_server_passes_its_key(keyed, remembered):
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters

    server, _, keys = keyed

    async def session():
        params = StdioServerParameters(command=sys.executable, args=["-m", "amem_sgl.cli", "--url", server.url, "mcp"],
                                       env={**os.environ, "AMEM_API_KEY": keys["bob"]})
        async with Client(params) as client:
            theirs = await client.call_tool("recall", {"namespace": "alice", "query": "PIN"})
            own = await client.call_tool("recall", {"namespace": "bob", "query": "dog"})
            return theirs, own

    theirs, own = asyncio.run(session())
    assert theirs.is_error and "403" in str(theirs.content) and "7391" not in str(theirs.content)
    assert not own.is_error and "Rex" in str(own.structured_content or own.content)


def test_the_cli_passes_its_key(keyed, remembered):
    import subprocess

    server, _, keys = keyed
    search = [sys.executable, "-m", "amem_sgl.cli", "--url", server.url]
    denied = subprocess.run(search + ["--api-key", keys["bob"], "search", "alice", "PIN"], capture_output=True,
                            text=True, timeout=120)
    assert denied.returncode == 1 and "403" in denied.stderr and "7391" not in denied.stdout
    env = {k: v for k, v in os.environ.items() if k != "AMEM_API_KEY"}
    allowed = subprocess.run(search + ["search", "alice", "bank PIN"], capture_output=True, text=True, timeout=120,
                             env={**env, "AMEM_API_KEY": keys["alice"]})
    assert allowed.returncode == 0 and "7391" in allowed.stdout, allowed.stderr
    anonymous = subprocess.run(search + ["search", "alice", "PIN"], capture_output=True, text=True, timeout=120,
                               env=env)
    assert anonymous.returncode == 1 and "401" in anonymous.stderr
