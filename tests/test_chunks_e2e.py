"""Chunk splicing on the real server: register chunks once, reuse them in any order."""

from __future__ import annotations

import pytest
import requests

from amem_sgl.chunks import build_kv_hints
from amem_sgl.chunks.client import AmemRequestError, ChunkClient, ComposedPrompt, error_message
from tests.greedy import TOP2, assert_same_greedy

pytestmark = pytest.mark.slow

FACTS = ["Maria, Alice's sister, lives in Denver.\n", "Alice works at Boeing in Seattle.\n",
         "Bob, Alice's cousin, is a chef in Portland.\n"]
QUESTION = "Where does Alice's sister live?"


@pytest.fixture(scope="module")
def client(amem_server):
    return ChunkClient(amem_server.url)


def test_chunks_registered_once_are_spliced_in_another_order_and_answer_like_a_full_prefill(
        client, amem_server):
    before = amem_server.amem_state()
    assert before["chunk_reuse"], before["chunk_reuse_reason"]
    chunks = [client.register(fact, "e2e-alice") for fact in FACTS]
    after_register = amem_server.amem_state()
    assert after_register["stats"]["chunks_registered"] - before["stats"]["chunks_registered"] == 3

    from amem_sgl.blend.policy import BlendPolicy

    pure = BlendPolicy("none")  # pure splicing here; blending is tested below
    first = client.layout.compose([c.token_ids for c in chunks], QUESTION)
    client.generate(first, "e2e-alice", max_new_tokens=24, blend=pure)
    second = client.layout.compose([chunks[i].token_ids for i in (2, 0, 1)], QUESTION)
    spliced = client.generate(second, "e2e-alice", max_new_tokens=24, blend=pure, extra=TOP2)
    full = client.generate(second, max_new_tokens=24, isolated=True, extra=TOP2)

    preamble = len(client.layout.preamble)
    assert spliced.cached_tokens >= preamble + second.chunk_tokens  # every chunk token from the cache
    assert full.cached_tokens == 0  # the reference really prefilled everything
    # Pure splicing is not a full prefill (two chunks rotated, blind to the chunks before them): the
    # same greedy answer up to a near-tie of either, not the same bits.
    assert assert_same_greedy(spliced, full) >= 4 and "Denver" in spliced.text
    # The response reports what the cache did for this request (meta_info["amem"]).
    assert spliced.amem["namespace"] == "e2e-alice" and spliced.amem["recomputed_tokens"] == 0
    assert 0 < spliced.amem["spliced_tokens"] <= second.chunk_tokens and full.amem == {}
    stats = amem_server.amem_state()["stats"]
    assert stats["spliced_tokens"] - after_register["stats"]["spliced_tokens"] >= 2 * second.chunk_tokens - 1


def test_another_namespace_gets_no_chunk_kv(client, amem_server):
    chunk = client.register("The vault code is 4817.\n", "e2e-carol")
    prompt = client.layout.compose([chunk.token_ids], "What is the vault code?")
    other = client.generate(prompt, "e2e-dave", max_new_tokens=8)
    assert other.cached_tokens <= len(client.layout.preamble)  # the preamble only


def test_malformed_chunk_hints_get_a_400_with_a_message(amem_server):
    body = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 1},
            "kv_hints": {"protocol_version": "1"}}  # missing message_id: SGLang refuses the envelope
    reply = requests.post(f"{amem_server.url}/generate", json=body, timeout=60)
    assert reply.status_code == 400 and "kv_hints" in error_message(reply)
    bad = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 1},
           "kv_hints": build_kv_hints("x", [(0, 10)])}
    reply = requests.post(f"{amem_server.url}/generate", json=bad, timeout=60)
    assert reply.status_code == 400 and "runs past the prompt" in error_message(reply)
    assert requests.get(f"{amem_server.url}/health", timeout=30).status_code == 200


@pytest.mark.parametrize("payload, message", [
    ({"namespace": "bad name!", "spans": [[0, 2]]}, "namespace"),
    ({"namespace": "x", "spans": [[2, 1]]}, "empty or negative"),
    ({"namespace": "x", "spans": [[0, 2], [1, 3]]}, "must not overlap"),
    ({"namespace": "x", "spans": "0-2"}, "list of"),
    ({"namespace": "x", "spans": [[0, 2]], "extra": 1}, "unknown payload field"),
])
def test_bad_amem_actions_are_refused_with_the_reason(amem_server, payload, message):
    envelope = build_kv_hints("x", [(0, 1)])
    envelope["actions"][0]["payload"] = payload
    body = {"input_ids": [1, 2, 3, 4], "sampling_params": {"max_new_tokens": 1}, "kv_hints": envelope}
    reply = requests.post(f"{amem_server.url}/generate", json=body, timeout=60)
    assert reply.status_code == 400 and message in error_message(reply)


def test_the_client_raises_the_servers_message(client):
    with pytest.raises(AmemRequestError, match="runs past the prompt") as err:
        client.generate(ComposedPrompt([1, 2], [(0, 5)]), "x")
    assert err.value.status == 400


def test_blend_all_reproduces_the_full_prefill_and_sink_recomputes_k_per_chunk(client, amem_server):
    from amem_sgl.blend.policy import BlendPolicy

    if not amem_server.amem_state()["blend_available"]:
        pytest.fail("blend unavailable on the CPU engine: " + amem_server.amem_state()["chunk_reuse_reason"])
    facts = ["Maria, Alice's sister, lives in Denver and teaches chemistry at a high school.\n",
             "Alice works at Boeing in Seattle as an engineer on the wing team.\n",
             "Bob, Alice's cousin, is a chef in Portland who runs a small bistro.\n"]
    question = "Which city does Alice's sister live in, and what does she teach?"
    results, prompts = {}, {}
    for policy in (BlendPolicy("all"), BlendPolicy("sink", 4)):
        namespace = f"e2e-blend-{policy.policy}"
        chunks = [client.register(f, namespace).token_ids for f in facts]
        prompt = prompts[policy.policy] = client.layout.compose([chunks[i] for i in (2, 1, 0)], question)
        before = amem_server.amem_state()["stats"]
        results[policy.policy] = client.generate(prompt, namespace, max_new_tokens=24, blend=policy)
        after = amem_server.amem_state()["stats"]
        # The first chunk sits where and behind what it was registered (in place): never recomputed.
        in_place = prompt.spans[0][1] - prompt.spans[0][0]
        expected = prompt.chunk_tokens - in_place if policy.policy == "all" else 4 * (len(chunks) - 1)
        assert after["recomputed_tokens"] - before["recomputed_tokens"] == expected
        assert results[policy.policy].amem == {
            "namespace": namespace, "spliced_tokens": prompt.chunk_tokens, "recomputed_tokens": expected,
            "probed_tokens": 0, "probe_layers": 0, "blend_policy": policy.label,
            "extended_tokens": len(prompt.input_ids) - prompt.spans[-1][1], "loaded_tokens": 0, "gap_tokens": 0,
            "in_place_tokens": in_place, "computed_chunk_tokens": 0}  # every chunk spliced: none prefilled
        assert after["blend_passes"] - before["blend_passes"] == 1
    full = client.generate(prompts["all"], max_new_tokens=24, isolated=True)
    assert results["all"].output_ids == full.output_ids


def test_hkvd_probes_every_spliced_token_then_recomputes_its_budget(client, amem_server):
    """hkvd:1.0 picks every token by deviation (so it must equal the full prefill); hkvd:0.3 runs the
    probe over all spliced tokens and recomputes 30% of them."""
    from amem_sgl.blend.policy import BlendPolicy

    facts = ["Maria, Alice's sister, lives in Denver and teaches chemistry at a high school.\n",
             "Alice works at Boeing in Seattle as an engineer on the wing team.\n",
             "Bob, Alice's cousin, is a chef in Portland who runs a small bistro.\n"]
    question = "Which city does Alice's sister live in?"
    for policy in (BlendPolicy.parse("hkvd:1.0"), BlendPolicy.parse("sink+hkvd:2:0.3@2")):
        namespace = "e2e-" + policy.policy.replace("+", "-") + f"-{policy.ratio:g}"
        chunks = [client.register(f, namespace).token_ids for f in facts]
        prompt = client.layout.compose([chunks[i] for i in (1, 2, 0)], question)
        before = amem_server.amem_state()["stats"]
        got = client.generate(prompt, namespace, max_new_tokens=16, blend=policy)
        after = amem_server.amem_state()["stats"]
        n = prompt.chunk_tokens - (prompt.spans[0][1] - prompt.spans[0][0])  # the first chunk is in place
        expected = min(n, 2 * (len(chunks) - 1) + round(policy.ratio * n)) if policy.policy == "sink+hkvd" else n
        assert got.amem["recomputed_tokens"] == expected and got.amem["probed_tokens"] == n
        assert got.amem["probe_layers"] == policy.check_layer + 1
        assert after["recomputed_tokens"] - before["recomputed_tokens"] == expected
        assert after["probed_tokens"] - before["probed_tokens"] == n
        assert after["probe_passes"] - before["probe_passes"] == 1 and after["blend_failures"] == 0
        if policy.ratio == 1.0:
            assert got.output_ids == client.generate(prompt, max_new_tokens=16, isolated=True).output_ids


def test_splice_and_blend_counters_reach_sglang_metrics(client, amem_server):
    chunk = client.register("The lighthouse keeper's name is Ottoline.\n", "e2e-metrics")
    prompt = client.layout.compose([chunk.token_ids], "What is the keeper's name?")
    client.generate(prompt, "e2e-metrics", max_new_tokens=4)
    text = requests.get(f"{amem_server.url}/metrics", timeout=30).text
    spliced = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("amem:spliced_tokens_total{")]
    assert spliced and sum(spliced) >= len(chunk.token_ids), text[:2000]
    assert "amem:spliced_requests_total{" in text and "sglang:" in text


def test_a_30_turn_session_over_a_stable_working_set_recomputes_nothing_after_turn_one(client, amem_server):
    """Turn 1 splices and blends the working set; its blended sequence goes back into the tree, so
    turns 2..30 (same chunks, same order, new questions) are plain prefix hits: 0 spliced, 0 recomputed."""
    from amem_sgl.blend.policy import BlendPolicy

    namespace = "e2e-session"
    facts = ["Nadia lives in Lisbon and keeps bees on her roof.\n",
             "Tomas, Nadia's brother, repairs clocks in Osaka.\n",
             "Priya, Nadia's manager, swims every morning in Oslo.\n"]
    chunks = [client.register(f, namespace).token_ids for f in facts]
    policy = BlendPolicy.parse("sink+hkvd:4:0.1")
    reports = []
    for turn in range(30):
        prompt = client.layout.compose(chunks, f"Question {turn + 1}: who lives in which city?")
        got = client.generate(prompt, namespace, max_new_tokens=2, blend=policy)
        reports.append((got.amem, got.cached_tokens, len(client.layout.preamble) + prompt.chunk_tokens))
    first, _, _ = reports[0]
    assert first["spliced_tokens"] > 0 and first["recomputed_tokens"] > 0
    for turn, (usage, cached, working_set) in enumerate(reports[1:], start=2):
        assert usage.get("spliced_tokens", 0) == 0 and usage.get("recomputed_tokens", 0) == 0, (turn, usage)
        assert cached >= working_set, (turn, cached, working_set)
