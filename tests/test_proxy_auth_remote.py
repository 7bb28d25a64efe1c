"""``amem proxy --memory URL`` with amem keys on real processes: a real amem server with a keys file
of its own (made with the real ``amem keys add``), which is also the chat upstream here behind a
recording relay (so one model server runs for this module; the turns name their namespace with
X-Amem-Namespace, so the server sees plain ones), and two proxy processes in front of it: one with a
keys file of its own and ``--memory-api-key`` (the proxy's key on the server), one with neither,
which passes each caller's own amem key on to the server.
"""

from __future__ import annotations

import sys

import pytest
import requests
import yaml

from amem_sgl.local_server import free_port, start_server
from amem_sgl.sdk import Amem, AmemError
from tests.proxy_upstream import RecordingRelay
from tests.server import ROOT, STARTUP_BOUND_S
from tests.test_proxy_auth import ALICE, BOB, amem_key, assert_refused, cli_key, posts, start_proxy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """An amem server with a keys file of its own (also the chat upstream, behind a relay), and two
    proxies: one with its own keys file and --memory-api-key, one passing each caller's key on."""
    work = tmp_path_factory.mktemp("proxy-auth-remote")
    server_keys, proxy_keys = work / "server-keys.json", work / "proxy-keys.json"
    on_server = {"alice": cli_key(server_keys, "alice")[0], "bob": cli_key(server_keys, "bob")[0],
                 "proxy": cli_key(server_keys, "alice", "bob")[0]}
    on_proxy = {"alice": cli_key(proxy_keys, "alice")[0], "bob": cli_key(proxy_keys, "bob")[0]}
    config = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    config.setdefault("amem", {})["auth"] = {"keys_file": str(server_keys)}
    (work / "auth.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    server = start_server(
        f"{sys.executable} -m amem_sgl.launch_server --config {work / 'auth.yaml'} --port {port} "
        "--max-total-tokens 16384", port=port, log_path=work / "server.log", cwd=ROOT, timeout_s=STARTUP_BOUND_S,
        env={"PYTHONUNBUFFERED": "1", "AMEM_SGL_RESIDENCY_DIR": str(work / "residency"),
             "AMEM_SGL_MEMORY_DIR": str(work / "memory")})
    relay = RecordingRelay(("127.0.0.1", port))
    proxies = []
    try:
        for who in ("alice", "bob"):
            reply = requests.post(server.url + "/amem/v1/remember", timeout=600, json={
                "namespace": who, "texts": ALICE if who == "alice" else BOB},
                headers={"Authorization": f"Bearer {on_server[who]}"})
            assert reply.status_code == 200, reply.text
        for sub in ("keyed", "passing"):
            (work / sub).mkdir()
        keyed = start_proxy(work / "keyed", relay.url, f"--memory {server.url} --keys-file {proxy_keys} "
                                                       f"--memory-api-key {on_server['proxy']}")
        proxies.append(keyed)
        passing = start_proxy(work / "passing", relay.url, f"--memory {server.url}")
        proxies.append(passing)
        yield {"server": server, "relay": relay, "keyed": keyed, "passing": passing, "on_server": on_server,
               "on_proxy": on_proxy}
    finally:
        for p in proxies:
            p.stop()
        server.stop()


def remote_chat(proxy, key: str | None, namespace: str):
    """An Anthropic turn named by X-Amem-Namespace, so the amem server behind the proxy sees a plain one."""
    headers = {"x-api-key": "sk-ant-provider", "X-Amem-Namespace": namespace, **(amem_key(key) if key else {})}
    return requests.post(proxy.url + "/v1/messages", headers=headers, timeout=600, json={
        "model": "default", "max_tokens": 4, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the bank PIN of Alice Moreau?"}]})


def test_the_proxy_shows_its_memory_server_its_own_key_and_checks_its_callers(remote):
    proxy, relay, mine = remote["keyed"], remote["relay"], remote["on_proxy"]
    relay.clear()
    assert_refused(remote_chat(proxy, None, "alice"), 401, "anthropic")
    assert_refused(remote_chat(proxy, mine["bob"], "alice"), 403, "anthropic")
    assert posts(relay) == []
    reply = remote_chat(proxy, mine["alice"], "alice")  # recall from the server under the proxy's key
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["amem"]["chunks_used"] >= 1 and b"7391" in posts(relay)[0][2]
    url = proxy.url + "/amem/v1"
    search = requests.post(url + "/search", json={"namespace": "alice", "query": "bank PIN", "k": 1},
                           headers=amem_key(mine["alice"]), timeout=300)
    assert search.status_code == 200 and "7391" in search.json()["results"][0]["text"]
    for method, path, body in [("POST", "/search", {"namespace": "alice", "query": "bank PIN", "k": 1}),
                               ("GET", "/namespaces/alice/chunks", None), ("DELETE", "/namespaces/alice", None),
                               ("POST", "/sessions", {"namespace": "alice"})]:
        assert_refused(requests.request(method, url + path, json=body, headers=amem_key(mine["bob"]), timeout=60),
                       403, "memory")
    listed = requests.get(url + "/namespaces", headers={"Authorization": f"Bearer {mine['bob']}"}, timeout=60)
    assert listed.status_code == 200 and listed.json()["namespaces"] == ["bob"]  # the server's list, filtered
    assert_refused(requests.get(url + "/namespaces", timeout=60), 401, "memory")
    # A route whose namespace the proxy cannot tell is for admin keys only.
    assert_refused(requests.get(url + "/anything", headers=amem_key(mine["alice"]), timeout=60), 403, "memory")


def test_without_a_key_of_its_own_the_proxy_passes_each_callers_key_on(remote):
    proxy, relay, theirs = remote["passing"], remote["relay"], remote["on_server"]
    relay.clear()
    assert_refused(remote_chat(proxy, None, "alice"), 401, "anthropic")  # the server's refusal, said in chat's shape
    assert_refused(remote_chat(proxy, theirs["bob"], "alice"), 403, "anthropic")
    assert posts(relay) == []
    reply = remote_chat(proxy, theirs["alice"], "alice")
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["amem"]["chunks_used"] >= 1
    hits = Amem(proxy.url, api_key=theirs["alice"]).search("alice", "bank PIN", k=1)
    assert "7391" in hits[0].text
    with pytest.raises(AmemError) as refused:
        Amem(proxy.url, api_key=theirs["bob"]).search("alice", "bank PIN", k=1)
    assert refused.value.status == 403
