"""The cacheblend and query policies on the real server (SmolLM2-135M, the session's amem server):
each probes, recomputes exactly its budget (of the chunks not spliced in place), reports its probe's
cost, never fails its blend pass, and with R = 1 (every spliced token recomputed) answers like a full
prefill."""

from __future__ import annotations

import pytest

from amem_sgl.blend.policy import BlendPolicy
from amem_sgl.chunks.client import ChunkClient

pytestmark = pytest.mark.slow

FACTS = ["Maria, Alice's sister, lives in Denver and teaches chemistry at a high school.\n",
         "Alice works at Boeing in Seattle as an engineer on the wing team.\n",
         "Bob, Alice's cousin, is a chef in Portland who runs a small bistro.\n"]
QUESTION = "Which city does Alice's sister live in?"
LAYERS = 30  # SmolLM2-135M


@pytest.fixture(scope="module")
def client(amem_server):
    return ChunkClient(amem_server.url)


@pytest.mark.parametrize("text, passes", [("cacheblend:0.3", 2), ("cacheblend:0.2@3", 3), ("query:0.3", 1),
                                          ("edges+query:2:0.2@9", 1), ("cacheblend:1.0@1", 1), ("query:1.0", 1)])
def test_policy_probes_recomputes_its_budget_and_reports_its_cost(client, amem_server, text, passes):
    policy = BlendPolicy.parse(text)
    namespace = "e2e-pol-" + text.replace("+", "-").replace(":", "-").replace("@", "-")
    chunks = [client.register(f, namespace).token_ids for f in FACTS]
    prompt = client.layout.compose([chunks[i] for i in (1, 2, 0)], QUESTION)
    before = amem_server.amem_state()["stats"]
    got = client.generate(prompt, namespace, max_new_tokens=16, blend=policy)
    after = amem_server.amem_state()["stats"]
    # The first chunk sits where and behind what it was registered: in place, never recomputed;
    # the policy's budget is the other chunks'.
    first, *rest = prompt.spans
    assert got.amem["in_place_tokens"] == first[1] - first[0]
    segments = [(s, e - s) for s, e in rest]
    n = sum(length for _, length in segments)
    tail = len(prompt.input_ids) - prompt.spans[-1][1]
    assert got.amem["recomputed_tokens"] == policy.recomputed_tokens(segments)
    assert policy.recomputed_tokens(segments) == min(n, len(policy.select(segments)) + round(policy.ratio * n))
    probed, layers = policy.probe_cost(segments, LAYERS, tail)
    assert (got.amem["probed_tokens"], got.amem["probe_layers"]) == (probed, pytest.approx(layers))
    assert probed == (tail if policy.strategy.signal == "query" else n)
    assert after["blend_failures"] == before["blend_failures"]
    assert after["probe_passes"] - before["probe_passes"] == passes
    assert after["recomputed_tokens"] - before["recomputed_tokens"] == got.amem["recomputed_tokens"]
    if policy.ratio == 1.0:
        assert got.output_ids == client.generate(prompt, max_new_tokens=16, isolated=True).output_ids
