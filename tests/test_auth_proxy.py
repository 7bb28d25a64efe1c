"""The proxy's one namespace check (amem_sgl.proxy.server.authorize) with namespace-scoped keys: the
caller's amem key travels in X-Amem-Api-Key (its Authorization is the upstream provider's) and is
never forwarded upstream. No upstream runs: an authorized turn gets as far as the (unreachable)
upstream, a 502."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from amem_sgl.server import auth


@pytest.fixture()
def proxy(tmp_path):
    from fastapi.testclient import TestClient

    from amem_sgl.proxy.server import ProxyConfig, create_app

    keys = tmp_path / "keys.json"
    alice, _ = auth.add_key(keys, ["alice"])
    bob, _ = auth.add_key(keys, ["bob"])
    app = create_app(ProxyConfig(upstream="http://127.0.0.1:9", store_dir=str(tmp_path / "store"),
                                 state_dir=str(tmp_path / "state"), timeout_s=5))
    app.state.amem_keys = auth.KeyStore(keys)
    with TestClient(app) as client:
        yield client, alice, bob


def test_the_proxy_refuses_other_tenants_namespaces(proxy):
    client, alice, bob = proxy
    chat = {"model": "m", "user": "alice", "messages": [{"role": "user", "content": "PIN?"}]}
    assert client.post("/v1/chat/completions", json=chat).status_code == 401
    denied = client.post("/v1/chat/completions", json=chat, headers={"X-Amem-Api-Key": bob})
    assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"
    anthropic = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "PIN?"}]}
    denied = client.post("/v1/messages", json=anthropic, headers={"X-Amem-Api-Key": bob, "X-Amem-Namespace": "alice"})
    assert denied.status_code == 403 and denied.json()["type"] == "error"
    allowed = client.post("/v1/chat/completions", json=chat, headers={"X-Amem-Api-Key": alice})
    assert allowed.status_code == 502, allowed.text  # past the check, at the unreachable upstream


def test_the_amem_key_is_never_forwarded_upstream():
    from amem_sgl.proxy.server import _headers_out

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [
        (b"authorization", b"Bearer sk-provider"), (b"x-amem-api-key", b"amem_secret")]}
    assert dict(_headers_out(Request(scope))) == {"authorization": "Bearer sk-provider"}
