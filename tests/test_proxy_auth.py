"""``amem proxy --keys-file`` on real processes: namespace-scoped amem keys made with the real
``amem keys add`` CLI, a proxy process, and a real SGLang 0.5.23 upstream behind a recording relay
(tests/proxy_upstream.py), so a test sees every byte the upstream was sent.

* local store (``--store``): 401 without a valid key, 403 for a namespace the key does not cover, in
  each API's own error shape (OpenAI, Anthropic, the memory API's), and the upstream never sees a
  refused request; a key for namespace A reads nothing of namespace B; keys added and removed with the
  CLI take effect while the proxy runs.
* remote memory (``--memory URL``): tests/test_proxy_auth_remote.py.
"""

from __future__ import annotations

import re
import subprocess
import sys

import anthropic
import openai
import pytest
import requests

from amem_sgl.local_server import free_port, start_server
from amem_sgl.sdk import Amem, AmemError
from tests.proxy_upstream import RecordingRelay, plain_upstream

pytestmark = pytest.mark.slow
ALICE = ["The bank PIN of Alice Moreau is 7391.", "Alice Moreau keeps bees."]
BOB = ["The locker code of Bob Tanaka is 2284.", "Bob Tanaka rows on Sundays."]
PROVIDER = {"Authorization": "Bearer sk-provider-key"}  # the client's upstream key: never an amem key


def cli_key(keys_file, *namespaces: str, admin: bool = False) -> tuple[str, str]:
    """(key, name) from the real ``amem keys add``."""
    done = subprocess.run(["amem", "keys", "add", str(keys_file), *namespaces, *(["--admin"] if admin else [])],
                          capture_output=True, text=True, timeout=120, check=True)
    return done.stdout.strip().splitlines()[0], re.search(r"key (k-[0-9a-f]+)", done.stderr).group(1)


def amem_key(key: str) -> dict:
    return {"X-Amem-Api-Key": key}


def posts(relay: RecordingRelay) -> list[tuple[str, dict, bytes]]:
    return [r for r in relay.requests() if r[0].startswith("POST")]


def start_proxy(work, upstream: str, *flags: str):
    port = free_port()
    return start_server(f"{sys.executable} -m amem_sgl.proxy --upstream {upstream} --port {port} "
                        f"--state-dir {work}/state --exit-with-parent {' '.join(flags)}", port=port,
                        log_path=work / "proxy.log",
                        timeout_s=180)


def chat(proxy, key: str | None, namespace: str, api: str = "openai", **extra):
    headers = {**PROVIDER, **(amem_key(key) if key else {})}
    if api == "openai":
        body = {"model": "default", "user": namespace, "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": "What is the bank PIN of Alice Moreau?"}]}
        return requests.post(proxy.url + "/v1/chat/completions", json=body, headers=headers, timeout=600, **extra)
    body = {"model": "default", "metadata": {"user_id": namespace}, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the bank PIN of Alice Moreau?"}]}
    return requests.post(proxy.url + "/v1/messages", json=body, headers=headers, timeout=600, **extra)


def assert_refused(reply, status: int, shape: str) -> None:
    assert reply.status_code == status, reply.text
    data = reply.json()
    kind = {401: "authentication_error", 403: "permission_error"}[status]
    if shape == "anthropic":
        assert data["type"] == "error" and data["error"]["type"] == kind and data["error"]["message"]
    else:  # OpenAI's shape; the memory API's is the same envelope (message, type, code)
        assert data["error"]["type"] == kind and data["error"]["message"] and data["error"]["code"] == status


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    work = tmp_path_factory.mktemp("proxy-auth")
    keys_file = work / "keys.json"
    keys = {name: cli_key(keys_file, name)[0] for name in ("alice", "bob")}
    keys["team"] = cli_key(keys_file, "team-*")[0]
    keys["admin"] = cli_key(keys_file, admin=True)[0]
    upstream = plain_upstream()
    relay = RecordingRelay(("127.0.0.1", int(upstream.url.rsplit(":", 1)[1])))
    proxy = start_proxy(work, relay.url, f"--store {work}/memory --keys-file {keys_file}")
    try:  # stopped however the module ends, set-up failures included
        ids = {"alice": Amem(proxy.url, api_key=keys["alice"]).remember("alice", ALICE).ids}  # Bearer, as the SDK sends
        reply = requests.post(proxy.url + "/amem/v1/remember", json={"namespace": "bob", "texts": BOB},
                              headers=amem_key(keys["bob"]), timeout=300)
        assert reply.status_code == 200, reply.text
        ids["bob"] = reply.json()["ids"]
        yield {"proxy": proxy, "relay": relay, "keys": keys, "keys_file": keys_file, "ids": ids}
    finally:
        proxy.stop()


def test_chat_turns_need_a_key_covering_the_namespace_and_the_upstream_never_sees_a_refusal(local):
    proxy, relay, keys = local["proxy"], local["relay"], local["keys"]
    relay.clear()
    assert_refused(chat(proxy, None, "alice"), 401, "openai")
    assert_refused(chat(proxy, "amem_not-a-key", "alice"), 401, "openai")
    assert_refused(chat(proxy, keys["bob"], "alice"), 403, "openai")
    assert_refused(chat(proxy, None, "alice", "anthropic"), 401, "anthropic")
    assert_refused(chat(proxy, keys["bob"], "alice", "anthropic"), 403, "anthropic")
    assert_refused(chat(proxy, keys["team"], "alice", "anthropic"), 403, "anthropic")
    # On the chat routes Authorization is the provider's: an amem key there is not read as one.
    named = requests.post(proxy.url + "/v1/chat/completions", timeout=600, headers={
        "Authorization": f"Bearer {keys['alice']}", "X-Amem-Namespace": "alice"}, json={
        "model": "default", "max_tokens": 4, "messages": [{"role": "user", "content": "PIN?"}]})
    assert_refused(named, 401, "openai")
    assert "X-Amem-Api-Key" in named.json()["error"]["message"]
    assert posts(relay) == []  # none of them reached the upstream

    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-provider-key",
                           default_headers=amem_key(keys["alice"]))
    reply = client.chat.completions.create(model="default", user="alice", max_tokens=4, temperature=0,
                                           messages=[{"role": "user", "content": "What is the bank PIN of Alice Moreau?"}])
    assert local["ids"]["alice"][0] in reply.usage.model_dump()["amem"]["chunk_ids"]
    with anthropic.Anthropic(base_url=proxy.url, api_key="sk-ant-provider",
                             default_headers=amem_key(keys["alice"])).messages.stream(
            model="default", max_tokens=4, metadata={"user_id": "alice"},
            messages=[{"role": "user", "content": "What is the bank PIN of Alice Moreau?"}]) as events:
        (delta,) = [e for e in events if e.type == "message_delta"]
    assert delta.usage.model_dump()["amem"]["chunks_used"] >= 1
    sent = posts(relay)
    assert [line.split()[1] for line, _, _ in sent] == ["/v1/chat/completions", "/v1/messages"]
    for _, headers, body in sent:  # the amem key stays in the proxy; the provider's key (the anthropic SDK
        # sends it as Authorization too) goes on unchanged
        assert "x-amem-api-key" not in headers and keys["alice"].encode() not in body
    assert sent[0][1]["authorization"] == "Bearer sk-provider-key" and sent[1][1]["authorization"] == "Bearer sk-ant-provider"
    assert b"7391" in sent[0][2]  # alice's own memory went into her turn


def test_a_key_for_one_namespace_reads_nothing_of_another_through_the_proxy(local):
    proxy, relay, keys, ids = local["proxy"], local["relay"], local["keys"], local["ids"]
    url, bob = proxy.url + "/amem/v1", amem_key(keys["bob"])
    attempts = [("POST", "/search", {"namespace": "alice", "query": "bank PIN", "k": 2}),
                ("POST", "/remember", {"namespace": "alice", "texts": ["Alice's PIN is now 0000."]}),
                ("GET", "/namespaces/alice/chunks", None), ("GET", f"/namespaces/alice/chunks/{ids['alice'][0]}", None),
                ("DELETE", f"/namespaces/alice/chunks/{ids['alice'][0]}", None), ("DELETE", "/namespaces/alice", None)]
    for method, path, body in attempts:
        assert_refused(requests.request(method, url + path, json=body, headers=bob, timeout=60), 403, "memory")
        assert_refused(requests.request(method, url + path, json=body, timeout=60), 401, "memory")
    with pytest.raises(AmemError) as refused:  # the SDK with bob's key (Authorization: Bearer)
        Amem(proxy.url, api_key=keys["bob"]).search("alice", "bank PIN")
    assert refused.value.status == 403
    assert Amem(proxy.url, api_key=keys["bob"]).namespaces() == ["bob"]
    assert requests.get(url + "/namespaces", headers=amem_key(keys["team"]), timeout=60).json() == {"namespaces": []}
    assert sorted(Amem(proxy.url, api_key=keys["admin"]).namespaces()) == ["alice", "bob"]
    assert_refused(requests.get(url + "/namespaces", timeout=60), 401, "memory")
    # Alice's memory is as it was, and bob's own turn never carries any of it.
    assert [c.id for c in Amem(proxy.url, api_key=keys["alice"]).list("alice")] == ids["alice"]
    relay.clear()
    reply = chat(proxy, keys["bob"], "bob")
    assert reply.status_code == 200, reply.text
    assert set(reply.json()["usage"]["amem"]["chunk_ids"]) <= set(ids["bob"])
    (_, _, sent), = posts(relay)
    assert b"7391" not in sent and not any(text.encode() in sent for text in ALICE)
    team = requests.post(url + "/remember", json={"namespace": "team-red", "texts": ["Red team meets at 9."]},
                         headers=amem_key(keys["team"]), timeout=300)
    assert team.status_code == 200, team.text  # a glob key covers the namespaces it matches


def test_a_request_naming_no_namespace_needs_no_amem_key(local):
    local["relay"].clear()
    reply = requests.post(local["proxy"].url + "/v1/chat/completions", headers=PROVIDER, timeout=600, json={
        "model": "default", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
    assert reply.status_code == 200, reply.text  # no memory touched: forwarded untouched, as without keys
    assert len(posts(local["relay"])) == 1


def test_what_the_proxy_forwards_untouched_names_only_the_callers_namespaces(local):
    """An amem upstream would serve whatever namespace a forwarded request names: with keys on, a
    chat turn's body ``user`` beside another X-Amem-Namespace, a passthrough ``/v1/completions``
    ``user``, ``/generate`` chunk hints and an X-Amem-Session are checked like the proxy's own
    memory -- refused before anything reaches the upstream."""
    from amem_sgl.chunks.hints import build_kv_hints

    proxy, relay, keys = local["proxy"], local["relay"], local["keys"]
    relay.clear()
    alice = {**PROVIDER, **amem_key(keys["alice"])}
    body = {"model": "default", "user": "bob", "max_tokens": 2, "messages": [{"role": "user", "content": "PIN?"}]}
    reply = requests.post(proxy.url + "/v1/chat/completions", json=body, timeout=600,
                          headers={**alice, "X-Amem-Namespace": "alice"})
    assert_refused(reply, 403, "openai")
    reply = requests.post(proxy.url + "/v1/completions", json={"model": "default", "user": "bob", "prompt": "Bob's"},
                          headers=PROVIDER, timeout=600)
    assert_refused(reply, 401, "openai")
    reply = requests.post(proxy.url + "/v1/completions", json={"model": "default", "user": "bob", "prompt": "Bob's"},
                          headers=alice, timeout=600)
    assert_refused(reply, 403, "openai")
    hints = {"input_ids": [1, 2, 3], "kv_hints": build_kv_hints("bob", [(0, 2)]), "sampling_params": {"max_new_tokens": 1}}
    assert requests.post(proxy.url + "/generate", json=hints, headers=alice, timeout=600).status_code == 403
    reply = requests.post(proxy.url + "/v1/completions", json={"model": "default", "prompt": "x", "max_tokens": 1},
                          headers={**alice, "X-Amem-Session": "someone-elses"}, timeout=600)
    assert reply.status_code == 400 and "X-Amem-Session" in reply.json()["error"]["message"]
    assert posts(relay) == []  # nothing refused reached the upstream
    mine = requests.post(proxy.url + "/v1/completions", headers=alice, timeout=600,
                         json={"model": "default", "user": "alice", "prompt": "Hello", "max_tokens": 1})
    assert mine.status_code == 200, mine.text  # the caller's own namespace is forwarded as before
    assert len(posts(relay)) == 1


def test_keys_added_and_removed_with_the_cli_take_effect_while_the_proxy_runs(local):
    proxy, keys_file = local["proxy"], local["keys_file"]
    carol, name = cli_key(keys_file, "carol")
    remembered = requests.post(proxy.url + "/amem/v1/remember", json={"namespace": "carol", "texts": ["Carol sings."]},
                               headers=amem_key(carol), timeout=300)
    assert remembered.status_code == 200, remembered.text
    subprocess.run(["amem", "keys", "remove", str(keys_file), name], check=True, timeout=120)
    assert_refused(requests.get(proxy.url + "/amem/v1/namespaces/carol/chunks", headers=amem_key(carol),
                                timeout=60), 401, "memory")
    assert_refused(chat(proxy, carol, "carol", "anthropic"), 401, "anthropic")
