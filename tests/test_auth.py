"""API keys scoped to namespaces and the per-server secret, without a server: the keys file (hashes
only, 0600, reload on change, fail closed), the guard's reading of bodies, the launch plan's refusal
of a non-loopback host without keys, and chunk ids / namespace salts keyed by the secret."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys

import pytest
from types import SimpleNamespace

from amem_sgl.chunks import identity
from amem_sgl.server import auth
from amem_sgl.server.limits import AuthGuard, body_namespaces, denial_response


def test_keys_add_stores_only_a_hash_in_a_0600_file_and_the_key_resolves_to_its_namespaces(tmp_path):
    path = tmp_path / "keys.json"
    key, name = auth.add_key(path, ["alice", "team-*"])
    admin, _ = auth.add_key(path, [], admin=True)
    text = path.read_text()
    assert key not in text and admin not in text and auth.key_hash(key) in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    store = auth.KeyStore(path)
    alice = store.lookup(key)
    assert alice.name == name and alice.covers("alice") and alice.covers("team-red")
    assert not alice.covers("bob") and not alice.covers("alice2") and not alice.covers("xteam-red")
    assert store.lookup(admin).covers("anyone") and store.lookup(admin).admin
    assert store.lookup("amem_" + "x" * 43) is None and store.lookup(key + "x") is None and store.lookup(None) is None


def test_the_cli_prints_the_key_once_and_it_works(tmp_path):
    path = tmp_path / "keys.json"
    done = subprocess.run([sys.executable, "-m", "amem_sgl.cli", "keys", "add", str(path), "carol"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert key.startswith(auth.KEY_PREFIX) and "only time" in done.stderr and key not in path.read_text()
    assert auth.KeyStore(path).lookup(key).covers("carol")
    bad = subprocess.run([sys.executable, "-m", "amem_sgl.cli", "keys", "add", str(path), "no spaces"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not a namespace" in bad.stderr
    name = auth.list_keys(path)[0].name
    listed = subprocess.run([sys.executable, "-m", "amem_sgl.cli", "keys", "list", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert json.loads(listed.stdout) == {"name": name, "admin": False, "namespaces": ["carol"]}
    assert key not in listed.stdout and auth.key_hash(key) not in listed.stdout
    removed = subprocess.run([sys.executable, "-m", "amem_sgl.cli", "keys", "remove", str(path), name],
                             capture_output=True, text=True, timeout=120)
    assert removed.returncode == 0 and auth.KeyStore(path).lookup(key) is None
    again = subprocess.run([sys.executable, "-m", "amem_sgl.cli", "keys", "remove", str(path), name],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "no key named" in again.stderr


def test_a_key_added_or_removed_while_running_takes_effect_on_the_next_lookup(tmp_path):
    path = tmp_path / "keys.json"
    first, _ = auth.add_key(path, ["alice"])
    store = auth.KeyStore(path)
    assert store.lookup(first) is not None
    second, _ = auth.add_key(path, ["bob"])
    assert store.lookup(second).covers("bob")
    data = json.loads(path.read_text())
    del data["keys"][auth.key_hash(first)]
    auth.write_private(path, json.dumps(data))
    assert store.lookup(first) is None and store.lookup(second) is not None


def test_a_broken_keys_file_fails_closed_and_recovers(tmp_path):
    path = tmp_path / "keys.json"
    key, _ = auth.add_key(path, ["alice"])
    store = auth.KeyStore(path)
    good = path.read_text()
    path.write_text("{not json")
    with pytest.raises(auth.AuthUnavailable):
        store.lookup(key)
    path.unlink()
    with pytest.raises(auth.AuthUnavailable):
        store.lookup(key)
    path.write_text(good)
    assert store.lookup(key).covers("alice")
    path.write_text(json.dumps({"version": 1, "keys": {"0" * 64: {"namespaces": "alice"}}}))
    with pytest.raises(ValueError, match="namespaces must be a list"):
        auth.KeyStore(path)
    with pytest.raises(ValueError, match="No such file"):
        auth.KeyStore(tmp_path / "missing.json")


def test_add_key_refuses_to_rewrite_a_file_it_cannot_read(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text("[]")
    with pytest.raises(ValueError):
        auth.add_key(path, ["alice"])
    assert path.read_text() == "[]"


@pytest.mark.parametrize("host, refused", [("0.0.0.0", True), ("::", True), ("192.168.1.7", True),
                                           ("example.org", True), ("127.0.0.1", False), ("127.3.2.1", False),
                                           ("::1", False), ("localhost", False), (None, False)])
def test_the_launch_plan_refuses_a_non_loopback_host_without_keys(tmp_path, host, refused):
    from amem_sgl.launch_server import plan_launch

    argv = ["--host", host] if host else []
    run = lambda extra: plan_launch(argv + extra, cuda_available=False, resolve_model=lambda m: "/m")  # noqa: E731
    if refused:
        with pytest.raises(ValueError, match="non-loopback.*amem keys add.*allow_open"):
            run([])
    else:
        run([])
    keys = tmp_path / "keys.json"
    auth.add_key(keys, ["alice"])
    for section in (f"auth: {{keys_file: {keys}}}", "auth: {allow_open: true}"):
        config = tmp_path / "c.yaml"
        config.write_text(f"amem:\n  {section}\n")
        assert run(["--config", str(config)]).amem.auth is not None


def test_the_launch_plan_refuses_a_keys_file_it_cannot_read(tmp_path):
    from amem_sgl.launch_server import plan_launch

    config = tmp_path / "c.yaml"
    config.write_text(f"amem:\n  auth: {{keys_file: {tmp_path / 'nope.json'}}}\n")
    with pytest.raises(ValueError, match="nope.json"):
        plan_launch(["--config", str(config)], cuda_available=False, resolve_model=lambda m: "/m")


def test_body_namespaces_finds_users_and_chunk_hints_also_escaped_and_batched():
    hint = lambda ns: {"protocol_version": "1", "message_id": "m", "actions": [  # noqa: E731
        {"action_id": "a", "action_type": "amem.chunks", "action_version": "1",
         "payload": {"namespace": ns, "spans": [[0, 1]]}}]}
    assert body_namespaces("/v1/chat/completions", b'{"user": "alice", "messages": []}') == (True, ["alice"])
    assert body_namespaces("/v1/chat/completions", b'{"messages": []}') == (False, [])
    assert body_namespaces("/v1/chat/completions", b'{"\\u0075ser": "alice"}') == (True, ["alice"])
    single = json.dumps({"input_ids": [1], "kv_hints": hint("alice")}).encode()
    assert body_namespaces("/generate", single) == (True, ["alice"])
    batch = json.dumps({"input_ids": [[1], [2]], "kv_hints": [hint("bob"), hint("alice")]}).encode()
    assert body_namespaces("/generate", batch) == (True, ["bob", "alice"])
    escaped = single.replace(b"kv_hints", b"kv\\u005fhints").replace(b"amem.chunks", b"amem\\u002echunks")
    assert b"kv_hints" not in escaped and body_namespaces("/generate", escaped) == (True, ["alice"])
    assert body_namespaces("/generate", b'{"input_ids": [1], "extra_key": "x"}') == (False, [])
    assert body_namespaces("/generate", b"not json") == (False, [])


def test_denials_take_each_apis_error_shape():
    assert json.loads(denial_response("/amem/v1/search", 403, "m")) == {
        "error": {"message": "m", "type": "permission_error", "code": 403}}
    assert json.loads(denial_response("/v1/chat/completions", 401, "m"))["object"] == "error"
    assert json.loads(denial_response("/v1/messages", 403, "m")) == {
        "type": "error", "error": {"type": "permission_error", "message": "m"}}
    assert json.loads(denial_response("/generate", 403, "m")) == {"error": {"message": "m"}}


def _call(guard, path, headers=(), body=b"", method="POST"):
    """One request through the guard; returns (status, body, headers the app saw, principal)."""
    seen = {}

    async def app(scope, receive, send):
        message = await receive()
        seen.update(headers=dict(scope["headers"]), body=message.get("body"), principal=auth.CURRENT.get())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    out = {}

    async def run():
        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            if message["type"] == "http.response.start":
                out["status"] = message["status"]
            else:
                out["body"] = message.get("body", b"")

        scope = {"type": "http", "method": method, "path": path,
                 "headers": [(k.encode(), v.encode()) for k, v in headers]}
        guard.app = app
        await guard(scope, receive, send)

    asyncio.run(run())
    return out["status"], out["body"], seen


def test_the_guard_authorizes_namespaces_and_hands_sglang_its_own_key(tmp_path):
    keys = tmp_path / "keys.json"
    alice, _ = auth.add_key(keys, ["alice"])
    authenticator = auth.Authenticator(keys=auth.KeyStore(keys), sglang_keys=("sgl-key",))
    guard = AuthGuard(None, authenticator, max_bytes=1 << 20, sglang_api_key="sgl-key",
                      session_namespace={"s-alice": "alice"}.get)
    bearer = lambda k: [("authorization", f"Bearer {k}")]  # noqa: E731
    chat = b'{"user": "alice", "messages": [{"role": "user", "content": "hi"}]}'
    assert _call(guard, "/v1/chat/completions", body=chat)[0] == 401
    bob, _ = auth.add_key(keys, ["bob"])  # added while "running"
    status, body, _ = _call(guard, "/v1/chat/completions", bearer(bob), chat)
    assert status == 403 and b"alice" in body
    status, _, seen = _call(guard, "/v1/chat/completions", bearer(alice), chat)
    assert status == 200 and seen["headers"][b"authorization"] == b"Bearer sgl-key" and seen["body"] == chat
    assert seen["principal"].covers("alice")
    assert _call(guard, "/v1/chat/completions", bearer(bob) + [("x-amem-session", "s-alice")], b"{}")[0] == 403
    assert _call(guard, "/v1/messages", bearer(bob) + [("x-amem-namespace", "alice")], b"{}")[0] == 403
    # A repeated header: every value must be covered (the memory hook reads the first one).
    assert _call(guard, "/v1/chat/completions", bearer(bob) + [("x-amem-namespace", "alice"),
                                                                 ("x-amem-namespace", "bob")], b"{}")[0] == 403
    assert _call(guard, "/amem/v1/namespaces", method="GET")[0] == 401
    # A plain request is SGLang's: untouched (an amem key is not turned into SGLang's key).
    status, _, seen = _call(guard, "/v1/chat/completions", bearer(alice), b'{"messages": []}')
    assert status == 200 and seen["headers"][b"authorization"] == f"Bearer {alice}".encode()
    # The memory layer's own token is admin and handed on as SGLang's key, even with auth off.
    open_guard = AuthGuard(None, auth.Authenticator(sglang_keys=("sgl-key",)), max_bytes=1 << 20,
                           sglang_api_key="sgl-key")
    status, _, seen = _call(open_guard, "/generate", open_guard.auth.internal_headers().items(), b"{}")
    assert status == 200 and seen["headers"][b"authorization"] == b"Bearer sgl-key"
    assert _call(guard, "/generate", bearer(alice) + [("x-body-compressed", "zstd")], b"..")[0] == 415


def test_chunk_ids_and_namespace_salts_are_keyed_by_the_server_secret(tmp_path, monkeypatch):
    tokens = [5, 6, 7]
    monkeypatch.delenv(identity.SECRET_FILE_ENV, raising=False)
    open_id, open_salt = identity.chunk_id("alice", "m", tokens), identity.namespace_salt("alice")
    assert open_salt == "amem:ns:alice"
    path = auth.ensure_secret(auth.secret_path(tmp_path / "memory"))
    assert path == tmp_path / "memory.secret" and stat.S_IMODE(path.stat().st_mode) == 0o600
    content = path.read_text()
    assert auth.ensure_secret(path).read_text() == content  # kept, never regenerated
    monkeypatch.setenv(identity.SECRET_FILE_ENV, str(path))
    keyed = identity.chunk_id("alice", "m", tokens)
    salt = identity.namespace_salt("alice")
    assert keyed != open_id and salt.startswith("amem:ns:") and "alice" not in salt
    assert identity.namespace_salt("bob") != salt and identity.chunk_id("bob", "m", tokens) != keyed
    # Stable across processes (the scheduler computes the same id) and another secret gives others.
    code = "from amem_sgl.chunks.identity import chunk_id; print(chunk_id('alice', 'm', [5, 6, 7]))"
    env = {**os.environ, identity.SECRET_FILE_ENV: str(path)}
    assert subprocess.check_output([sys.executable, "-c", code], env=env, text=True).strip() == keyed
    other = auth.ensure_secret(tmp_path / "other.secret")
    monkeypatch.setenv(identity.SECRET_FILE_ENV, str(other))
    assert identity.chunk_id("alice", "m", tokens) != keyed


def test_reserved_extra_keys_are_refused_before_the_scheduler():
    from types import SimpleNamespace

    from amem_sgl.server.validation import ReservedKeyError, check_reserved_keys

    for fields in ({"extra_key": "amem:ns:alice"}, {"cache_salt": "amem:chunk:00"}, {"extra_key": "x|amem:ns:a"},
                   {"extra_key": ["ok", "amem:ns:alice"]}):
        with pytest.raises(ReservedKeyError, match="reserved"):
            check_reserved_keys(SimpleNamespace(**{"extra_key": None, "cache_salt": None, **fields}))
    check_reserved_keys(SimpleNamespace(extra_key="tenant-7", cache_salt="amem-like-but-not"))


def test_another_tenants_plan_and_chunk_hints_are_refused_where_the_request_reaches_sglang(tmp_path, monkeypatch):
    """The checks behind the guard, for routes it does not know: a plan stored under a client-chosen
    rid is reported only to a key covering its namespace; an amem.chunks action reaching the
    tokenizer manager needs such a key too."""
    from types import SimpleNamespace

    from amem_sgl.memory import layer, openai_routes as api
    from amem_sgl.server.validation import check_chunk_hints

    keys = tmp_path / "keys.json"
    alice, _ = auth.add_key(keys, ["alice"])
    bob, _ = auth.add_key(keys, ["bob"])
    authenticator = auth.Authenticator(keys=auth.KeyStore(keys))
    monkeypatch.setattr(auth, "ACTIVE", authenticator)
    plan = layer.Plan([1, 2], {}, "alice", ["c" * 64], [0.9], None)
    monkeypatch.setattr(layer, "ACTIVE", SimpleNamespace(plan_for={"req-1": plan}.get))
    hint = {"protocol_version": "1", "message_id": "m", "actions": [
        {"action_id": "a", "action_type": "amem.chunks", "action_version": "1",
         "payload": {"namespace": "alice", "spans": [[0, 1]]}}]}
    for key, allowed in ((alice, True), (bob, False), (None, False)):
        token = auth.CURRENT.set(authenticator.resolve(key))
        try:
            assert (api.memory_usage("req-1") is not None) == allowed
            if allowed:
                check_chunk_hints(SimpleNamespace(kv_hints=hint), [5, 6], 100)
            else:
                with pytest.raises(ValueError, match="HTTP 40[13]"):
                    check_chunk_hints(SimpleNamespace(kv_hints=hint), [5, 6], 100)
        finally:
            auth.CURRENT.reset(token)
    check_chunk_hints(SimpleNamespace(kv_hints=None), [5, 6], 100)
    monkeypatch.setattr(auth, "ACTIVE", auth.Authenticator())  # auth off: open, as on loopback
    assert api.memory_usage("req-1") is not None
    check_chunk_hints(SimpleNamespace(kv_hints=hint), [5, 6], 100)


def test_a_pattern_or_session_id_with_a_trailing_newline_is_refused(tmp_path):
    """``re.match`` with ``$`` lets a final newline through; the patterns are checked whole."""
    from amem_sgl.proxy.sessions import session_key

    with pytest.raises(ValueError, match="not a namespace or glob pattern"):
        auth.add_key(tmp_path / "keys.json", ["alice*\n"])
    assert not (tmp_path / "keys.json").exists()
    with pytest.raises(ValueError, match="X-Amem-Session"):
        session_key("chat", "alice", "s-1\n", None, None)
    assert session_key("chat", "alice", "s-1", None, None) != session_key("chat", "alice", "s-2", None, None)


def test_a_chunk_action_reaching_the_tokenizer_manager_must_fit_its_prompt():
    """Routes and in-process callers /generate's body guard never sees: SGLang's per-request
    validation refuses (a 400 on every route) an action the scheduler would otherwise drop with a
    log line -- spans past the tokenized prompt, over the chunk limit, a malformed envelope, spans
    without token ids -- on a real GenerateReqInput."""
    from amem_sgl.chunks.hints import build_kv_hints
    from amem_sgl.server.validation import ChunkHintError, around_validate_one_request
    from sglang.srt.managers.io_struct import GenerateReqInput

    manager = SimpleNamespace(model_config=SimpleNamespace(vocab_size=100))
    seen = []

    def original(m, obj, input_ids):
        seen.append(input_ids)

    def validate(hints, input_ids):
        obj = GenerateReqInput(input_ids=input_ids, kv_hints=hints)
        return around_validate_one_request(original, manager, obj, input_ids)

    validate(build_kv_hints("alice", [(1, 3)]), [1, 2, 3, 4])
    assert seen == [[1, 2, 3, 4]]
    with pytest.raises(ChunkHintError, match="runs past the prompt"):
        validate(build_kv_hints("alice", [(1, 9)]), [1, 2, 3, 4])
    with pytest.raises(ChunkHintError, match="exceeds the chunk limit"):
        validate(build_kv_hints("alice", [(0, 3000)]), [1] * 3000)
    broken = build_kv_hints("alice", [(1, 3)])
    broken["actions"][0]["payload"]["spans"] = "all of it"
    with pytest.raises(ChunkHintError, match="kv_hints"):
        validate(broken, [1, 2, 3, 4])
    with pytest.raises(ChunkHintError, match="send input_ids"):
        around_validate_one_request(original, manager, SimpleNamespace(kv_hints=build_kv_hints("alice", [(0, 1)])), None)
    assert len(seen) == 1  # nothing refused reached SGLang's own validation


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32", "utf-8-sig"])
def test_a_body_in_another_json_encoding_is_authorized_like_utf8(tmp_path, encoding):
    """FastAPI reads a request body with json.loads, which detects UTF-16/32 (and a UTF-8 BOM): the
    guard must read such a body too, or {"user": "bob"} in UTF-16 reached bob's memory unchecked."""
    from amem_sgl.chunks.hints import build_kv_hints
    from amem_sgl.server.limits import ChunkHintsGuard

    keys = tmp_path / "keys.json"
    alice, _ = auth.add_key(keys, ["alice"])
    guard = AuthGuard(None, auth.Authenticator(keys=auth.KeyStore(keys)), max_bytes=1 << 20)
    bearer = [("authorization", f"Bearer {alice}")]
    chat = json.dumps({"user": "bob", "messages": [{"role": "user", "content": "bank PIN"}]}).encode(encoding)
    assert json.loads(chat)["user"] == "bob"  # what FastAPI will read
    assert _call(guard, "/v1/chat/completions", bearer, chat)[0] == 403
    assert _call(guard, "/v1/completions", (), json.dumps({"user": "bob", "prompt": "x"}).encode(encoding))[0] == 401
    generate = json.dumps({"input_ids": [1, 2, 3], "kv_hints": build_kv_hints("bob", [(0, 2)])}).encode(encoding)
    assert _call(guard, "/generate", bearer, generate)[0] == 403
    own = json.dumps({"user": "alice", "messages": []}).encode(encoding)
    assert _call(guard, "/v1/chat/completions", bearer, own)[0] == 200
    hints = ChunkHintsGuard(app=None, max_chunk_tokens=100)
    past = json.dumps({"input_ids": [1], "kv_hints": build_kv_hints("alice", [(0, 5)])}).encode(encoding)
    assert "runs past the prompt" in hints.check(past)
