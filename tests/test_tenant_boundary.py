"""Tenant boundaries on the real server that no other test covers, measured through its responses:

* exact mode: two namespaces with the same memory texts run the same exact-fidelity turn; the
  second namespace gets none of the first one's exact prefix (its ``cached_tokens`` is what a fresh
  namespace's first exact turn gets), while the first namespace repeating its turn hits it;
* forget on the device: forgetting one namespace frees only its own KV (``forgotten_tokens`` rises
  by exactly its chunks' tokens) and another namespace with the same texts still splices its chunks
  from the device and keeps its exact prefix;
* /metrics and /get_server_info name no namespace and no chunk id."""

from __future__ import annotations

import uuid

import pytest
import requests

from amem_sgl.sdk import Amem

pytestmark = pytest.mark.slow

TEXTS = ["Quentin Ravel keeps his spare key under the blue flowerpot.", "Quentin Ravel's boat is named Albatross."]
QUESTION = "Where does Quentin Ravel keep his spare key?"


@pytest.fixture(scope="module")
def amem(amem_server):
    return Amem(amem_server.url)


def names(*roles: str) -> list[str]:
    suffix = uuid.uuid4().hex[:12]
    return [f"tb-{role}-{suffix}" for role in roles]


def turn(server, namespace: str | None, fidelity: str | None = None) -> dict:
    """One OpenAI chat turn; its usage with ``cached`` (prompt_tokens_details.cached_tokens) added."""
    body = {"model": "default", "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": QUESTION}]}
    if namespace:
        body["user"] = namespace
    headers = {"X-Amem-Fidelity": fidelity} if fidelity else {}
    reply = requests.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=600)
    assert reply.status_code == 200, reply.text
    usage = reply.json()["usage"]
    usage["cached"] = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    usage["amem"] = usage.get("amem") or {}
    return usage


def test_exact_turns_never_share_a_prefix_across_namespaces(amem_server, amem):
    alice, bob, fresh = names("alice", "bob", "fresh")
    for namespace in (alice, bob, fresh):
        amem.remember(namespace, TEXTS)
    # Control: the first exact turn of a namespace with nothing of its own in the tree yet.
    baseline = turn(amem_server, fresh, "exact")
    first = turn(amem_server, alice, "exact")
    again = turn(amem_server, alice, "exact")  # alice's exact prefix is in the tree now
    other = turn(amem_server, bob, "exact")    # the same prompt tokens, another namespace
    for usage in (baseline, first, again, other):
        assert usage["amem"]["memory"]["fidelity"] == "exact" and usage["amem"].get("spliced_tokens", 0) == 0, usage
    assert other["prompt_tokens"] == again["prompt_tokens"] == baseline["prompt_tokens"]
    memory_tokens = sum(c.tokens for c in amem.list(alice))
    # Alice's own repeat reuses her whole prefix, memory included (so the boundary has something to keep).
    assert again["cached"] >= again["prompt_tokens"] - 8 and again["cached"] > baseline["cached"] + memory_tokens, again
    assert other["cached"] <= baseline["cached"], (
        f"bob's exact turn reused alice's exact prefix: cached {other['cached']} tokens, a fresh namespace's "
        f"first exact turn {baseline['cached']}, alice's repeat {again['cached']}")


def test_forgetting_one_namespace_frees_only_its_own_device_kv(amem_server, amem):
    alice, bob = names("alice", "bob")
    start = amem_server.amem_state()["stats"]
    alice_ids = amem.remember(alice, TEXTS).ids
    # All alice's device KV: her chunk nodes and the salted preamble they were registered behind.
    alice_kv = amem_server.amem_state()["stats"]["inserted_tokens"] - start["inserted_tokens"]
    bob_ids = amem.remember(bob, TEXTS).ids
    assert not set(alice_ids) & set(bob_ids)  # chunk ids are per namespace, even for the same text
    alice_tokens = sum(c.tokens for c in amem.list(alice))
    bob_tokens = sum(c.tokens for c in amem.list(bob))
    turn(amem_server, bob, "exact")  # bob's exact prefix goes into the tree
    before = amem_server.amem_state()["stats"]
    assert sorted(amem.forget(alice)) == sorted(alice_ids)
    after = amem_server.amem_state()["stats"]
    assert alice not in amem.namespaces() and sorted(c.id for c in amem.list(bob)) == sorted(bob_ids)
    # Alice never ran a turn: her device KV is what her remember put there, and only that was freed.
    freed = after["forgotten_tokens"] - before["forgotten_tokens"]
    assert alice_kv >= alice_tokens and freed == alice_kv, (
        f"forgetting alice freed {freed} tokens; her remember inserted {alice_kv} (chunks {alice_tokens}, bob's {bob_tokens})")
    # Bob's exact prefix survived alice's forget...
    exact = turn(amem_server, bob, "exact")
    assert exact["cached"] >= exact["prompt_tokens"] - 8, f"bob lost his exact prefix to alice's forget: {exact}"
    # ...and his chunk nodes too: a fast turn splices them from the device (nothing restored or missed).
    fast = turn(amem_server, bob, "fast")
    final = amem_server.amem_state()["stats"]
    assert fast["amem"]["memory"]["chunks"] and set(fast["amem"]["memory"]["chunks"]) <= set(bob_ids), fast
    assert fast["amem"]["spliced_tokens"] == bob_tokens and fast["amem"]["loaded_tokens"] == 0, (
        f"bob's chunks were not spliced from the device after alice's forget: {fast['amem']}")
    assert final["chunk_misses"] == after["chunk_misses"] and final["chunks_restored"] == after["chunks_restored"]


def test_metrics_and_server_info_name_no_namespace_and_no_chunk_id(amem_server, amem):
    secret = f"zz-secret-{uuid.uuid4().hex}"
    ids = amem.remember(secret, TEXTS).ids
    before = amem_server.amem_state()["stats"]
    exact, fast = turn(amem_server, secret, "exact"), turn(amem_server, secret, "fast")
    assert exact["amem"]["memory"]["namespace"] == secret and fast["amem"]["spliced_tokens"] > 0, (exact, fast)
    with amem.start_session(secret, chunk_ids=ids, fidelity="fast") as session:
        session.ask(QUESTION, max_tokens=4)
        metrics = requests.get(f"{amem_server.url}/metrics", timeout=60)
        info = requests.get(f"{amem_server.url}/get_server_info", timeout=60)
        session_id = session.id
    assert metrics.status_code == info.status_code == 200
    # The reports did count this namespace's work (so there was something to leak)...
    assert "amem:spliced_tokens_total" in metrics.text
    assert info.json()["internal_states"][0]["amem"]["stats"]["spliced_tokens"] > before["spliced_tokens"]
    # ...under no name of it: not the namespace (nor its random part), no chunk id (nor a 16-hex prefix).
    for text, where in ((metrics.text, "/metrics"), (info.text, "/get_server_info")):
        for needle in (secret, secret.removeprefix("zz-secret-"), session_id, *ids, *(i[:16] for i in ids)):
            assert needle not in text, f"{where} shows {needle!r}"
