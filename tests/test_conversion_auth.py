"""The OpenAI conversion hooks check the caller's key themselves (defense in depth behind AuthGuard).

SGLang converts a chat/completion request in an executor thread, which the guard's contextvar
(``auth.CURRENT``) does not reach: the guard also records the principal in the request's ASGI
state (``raw_request.state``), and the hooks refuse -- 401 without a principal, 403 for a namespace
(or a session's namespace) the key does not cover -- before anything is recalled. No server here:
the guard runs on a hand-built ASGI scope, the hooks get a Starlette Request of what it passed on.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from fastapi import HTTPException
from starlette.requests import Request

from amem_sgl.memory import layer as memory
from amem_sgl.memory import openai_routes as api
from amem_sgl.server import auth
from amem_sgl.server.limits import AuthGuard


class StubLayer:
    """A memory layer that records every plan it is asked for (and plans nothing)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.sessions = {"s-alice": SimpleNamespace(namespace="alice", fidelity=None)}

    def live_session(self, session_id):
        return self.sessions.get(session_id)

    def plan_chat(self, namespace, messages, session_id, fidelity=None, *, reserve_tokens=0):
        self.calls.append(("chat", namespace, session_id))
        return None

    def plan_completion(self, namespace, prompt, session_id=None, *, reserve_tokens=0):
        self.calls.append(("completion", namespace, session_id))
        return None


@pytest.fixture
def keys(tmp_path, monkeypatch):
    path = tmp_path / "keys.json"
    alice, _ = auth.add_key(path, ["alice"])
    bob, _ = auth.add_key(path, ["bob"])
    authenticator = auth.Authenticator(keys=auth.KeyStore(path))
    monkeypatch.setattr(auth, "ACTIVE", authenticator)
    stub = StubLayer()
    monkeypatch.setattr(memory, "ACTIVE", stub)
    monkeypatch.setattr(api, "fidelity_control", lambda layer: SimpleNamespace(level=lambda requested: None))
    return SimpleNamespace(auth=authenticator, alice=alice, bob=bob, layer=stub)


def through_guard(authenticator, headers=(), unseen=()) -> Request:
    """The raw request SGLang's route sees after AuthGuard passed a plain (namespace-free) request on:
    a request whose memory use the guard did not see -- the case the hooks' own check is for
    (``unseen``: headers the route sees but the guard did not)."""
    seen = {}

    async def app(scope, receive, send):
        seen["scope"] = scope
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def run():
        async def receive():
            return {"type": "http.request", "body": b'{"messages": []}', "more_body": False}

        async def send(message):
            pass

        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
                 "headers": [(k.encode(), v.encode()) for k, v in headers], "state": {}}
        await AuthGuard(app, authenticator, max_bytes=1 << 20)(scope, receive, send)

    asyncio.run(run())
    scope = seen["scope"]
    return Request({**scope, "headers": scope["headers"] + [(k.encode(), v.encode()) for k, v in unseen]})


def bearer(key):
    return [("authorization", f"Bearer {key}")]


def original(serving, request, raw_request):
    return SimpleNamespace(rid=None), "processed"


def chat(user=None):
    return SimpleNamespace(user=user, messages=[{"role": "user", "content": "hi"}])


def completion(user=None):
    return SimpleNamespace(user=user, prompt="hi")


HOOKS = [(api.around_chat_conversion, chat, "chat"), (api.around_completion_conversion, completion, "completion")]


@pytest.mark.parametrize("hook,make,kind", HOOKS)
def test_a_key_that_does_not_cover_the_namespace_is_refused_before_any_recall(keys, hook, make, kind):
    raw = through_guard(keys.auth, bearer(keys.bob))
    with pytest.raises(HTTPException) as refused:
        hook(original, None, make("alice"), raw)
    assert refused.value.status_code == 403 and "alice" in refused.value.detail
    raw = through_guard(keys.auth, bearer(keys.bob), unseen=[("x-amem-namespace", "alice")])
    with pytest.raises(HTTPException) as refused:
        hook(original, None, make(), raw)
    assert refused.value.status_code == 403
    assert keys.layer.calls == []


@pytest.mark.parametrize("hook,make,kind", HOOKS)
def test_a_request_without_a_principal_is_refused_401(keys, hook, make, kind):
    for raw in (through_guard(keys.auth),  # no key: the guard recorded None
                through_guard(keys.auth, bearer("amem_not-a-key")),
                SimpleNamespace(headers={}, state=SimpleNamespace()),  # nothing recorded: fail closed
                None):
        with pytest.raises(HTTPException) as refused:
            hook(original, None, make("alice"), raw)
        assert refused.value.status_code == 401
    assert keys.layer.calls == []


@pytest.mark.parametrize("hook,make,kind", HOOKS)
def test_a_session_of_a_namespace_the_key_does_not_cover_is_refused(keys, hook, make, kind):
    # The guard does not know the session here (its look-up answers None): the hook must.
    raw = through_guard(keys.auth, bearer(keys.bob) + [("x-amem-session", "s-alice")])
    with pytest.raises(HTTPException) as refused:
        hook(original, None, make("bob"), raw)  # `user` bob, but the session's namespace (alice) wins
    assert refused.value.status_code == 403 and "alice" in refused.value.detail
    assert keys.layer.calls == []
    raw = through_guard(keys.auth, bearer(keys.alice) + [("x-amem-session", "s-alice")])
    hook(original, None, make(), raw)
    assert keys.layer.calls == [(kind, None, "s-alice")]


@pytest.mark.parametrize("hook,make,kind", HOOKS)
def test_a_covering_key_and_the_internal_token_are_served(keys, hook, make, kind):
    assert hook(original, None, make("alice"), through_guard(keys.auth, bearer(keys.alice)))[1] == "processed"
    hook(original, None, make("alice"), through_guard(keys.auth, keys.auth.internal_headers().items()))
    # The memory layer's own token, on a request the guard did not see: admin.
    hook(original, None, make("alice"), SimpleNamespace(headers=keys.auth.internal_headers(), state=SimpleNamespace()))
    assert keys.layer.calls == [(kind, "alice", None)] * 3


@pytest.mark.parametrize("hook,make,kind", HOOKS)
def test_with_auth_off_nothing_is_checked(keys, monkeypatch, hook, make, kind):
    monkeypatch.setattr(auth, "ACTIVE", auth.Authenticator())
    hook(original, None, make("alice"), SimpleNamespace(headers={}, state=SimpleNamespace()))
    hook(original, None, make("alice"), None)
    assert keys.layer.calls == [(kind, "alice", None)] * 2


def test_the_guard_records_its_principal_in_the_request_state(keys):
    assert through_guard(keys.auth, bearer(keys.alice)).state.amem_principal.covers("alice")
    assert through_guard(keys.auth).state.amem_principal is None
