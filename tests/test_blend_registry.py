"""Every registered blend policy, through a real splice on real SGLang CPU pools: the plan the cache
hands to the blend pass (which positions it recomputes, its deviation budget), its spelling, and
its validation in config files and per-request payloads."""

from __future__ import annotations

import pytest

from amem_sgl.blend import policy as policy_mod
from amem_sgl.blend.policy import REGISTRY, BlendPolicy, Strategy, register
from amem_sgl.chunks import build_kv_hints
from amem_sgl.chunks.hints import parse_kv_hints
from amem_sgl.config import AmemConfig
from tests.pools import finish, start
from tests.test_chunk_splice import A, B, C, compose, make

K, RATIO = 3, 0.25

# What each built-in policy recomputes of a spliced chunk [s, e), written independently of the code.
SPEC = {
    "none": lambda s, e: [],
    "sink": lambda s, e: list(range(s, min(s + K, e))),
    "tail": lambda s, e: list(range(max(e - K, s), e)),
    "edges": lambda s, e: sorted(set(range(s, min(s + K, e))) | set(range(max(e - K, s), e))),
    "hkvd": lambda s, e: [],
    "sink+hkvd": lambda s, e: list(range(s, min(s + K, e))),
    "edges+hkvd": lambda s, e: sorted(set(range(s, min(s + K, e))) | set(range(max(e - K, s), e))),
    "cacheblend": lambda s, e: [],
    "edges+cacheblend": lambda s, e: sorted(set(range(s, min(s + K, e))) | set(range(max(e - K, s), e))),
    "query": lambda s, e: [],
    "edges+query": lambda s, e: sorted(set(range(s, min(s + K, e))) | set(range(max(e - K, s), e))),
    "ape": lambda s, e: [],
    "edges+ape": lambda s, e: sorted(set(range(s, min(s + K, e))) | set(range(max(e - K, s), e))),
    "all": lambda s, e: list(range(s, e)),
}
APE = {"ape", "edges+ape"}  # a plan even with nothing recomputed: the extend attends by APE's rule
DEVIATION = {"hkvd", "sink+hkvd", "edges+hkvd", "cacheblend", "edges+cacheblend", "query", "edges+query"}
QUERY = {"query", "edges+query"}  # their probe runs the question (the prompt's tail), not the chunks


def handed_plan(cache, req):
    """The blend plan the cache handed over with this request at admission (None: nothing to do)."""
    return cache.blend_plans.get(req.rid)


def test_the_builtin_policies_are_registered():
    assert set(SPEC) == set(REGISTRY) == set(policy_mod.POLICIES)


@pytest.mark.parametrize("name", sorted(SPEC))
def test_each_policy_picks_its_positions_and_budget_on_a_real_splice(name):
    cache, pools = make(registered=(A, B, C), blend=True)
    chosen = BlendPolicy(name, K, RATIO, 1)
    prompt, spans = compose([C, A, B])
    req = start(cache, pools, prompt, build_kv_hints("alice", spans, blend=chosen))
    assert req.prefix_len == spans[-1][1]
    assert req.customized_info["amem"][0]["in_place_tokens"] == spans[0][1] - spans[0][0]
    spans = spans[1:]  # C sits where and behind what it was registered: in place, never recomputed
    total = sum(e - s for s, e in spans)
    want = [p for s, e in spans for p in SPEC[name](s, e)]
    budget = min(round(RATIO * total), total - len(want)) if name in DEVIATION else 0
    plan = handed_plan(cache, req)
    if not want and not budget and name not in APE:
        assert plan is None
    else:
        assert list(plan.positions) == want and plan.budget == budget
        assert plan.end == spans[-1][1] and plan.segments == tuple((s, e - s) for s, e in spans)
    usage = req.customized_info["amem"][0]
    assert usage["recomputed_tokens"] == len(want) + budget
    probed = len(prompt) - spans[-1][1] if name in QUERY else total
    assert usage["probed_tokens"] == (probed if budget else 0)
    # labelled by the policy when it shaped the request: recomputed tokens, or APE's rule on the extend
    assert usage["blend_policy"] == (chosen.label if want or budget or name in APE else "none")
    finish(cache, req)


@pytest.mark.parametrize("name", sorted(SPEC))
def test_each_policy_label_parses_back(name):
    for p in (BlendPolicy(name, K, RATIO, 1), BlendPolicy(name, 7, 0.5, 3)):
        parsed = BlendPolicy.parse(p.label)
        assert parsed.label == p.label and parsed.select([(0, 20)]) == p.select([(0, 20)])
        assert parsed.deviation_budget([(0, 20)]) == p.deviation_budget([(0, 20)])


@pytest.mark.parametrize("text", ["sink:4:0.1", "none:3", "all@2", "edges:8@2", "hkvd:0.1:0.2",
                                  "sink:x", "bogus:1"])
def test_spellings_a_policy_does_not_take_are_refused(text):
    with pytest.raises(ValueError):
        BlendPolicy.parse(text)


def test_config_and_payloads_validate_against_the_registry():
    with pytest.raises(ValueError, match="amem.blend"):
        AmemConfig.from_dict({"blend": {"policy": "bogus"}})
    assert AmemConfig.from_dict({"blend": {"policy": "tail", "sink_tokens": 5}}).blend.to_policy().label == "tail:5"
    hints = build_kv_hints("alice", [(0, 4)])
    payload = hints["actions"][0]["payload"]
    for good, label in (("edges+hkvd:4:0.1@2", "edges+hkvd:4:0.1@2"), ({"policy": "sink", "sink_tokens": 2}, "sink:2")):
        payload["blend"] = good
        assert parse_kv_hints(hints).blend.label == label
    for bad in ("bogus", {"policy": "bogus"}, {"policy": "sink", "k": 2}, 7, "sink:0"):
        payload["blend"] = bad
        with pytest.raises(ValueError, match="amem.chunks"):
            parse_kv_hints(hints)


def test_a_new_policy_is_one_class(monkeypatch):
    monkeypatch.setattr(policy_mod, "REGISTRY", dict(REGISTRY))

    @register
    class Middle(Strategy):
        name, takes_tokens = "middle", True

        @classmethod
        def fixed(cls, start, end, k):
            mid = (start + end) // 2
            return range(mid, min(mid + k, end))

    p = BlendPolicy.parse("middle:2")
    assert p.label == "middle:2" and p.select([(10, 10)]) == [15, 16]
    assert parse_kv_hints({"actions": [{"action_type": "amem.chunks", "action_version": "1", "payload": {
        "namespace": "alice", "spans": [[0, 4]], "blend": "middle:2"}}]}).blend == p
    with pytest.raises(ValueError, match="already registered"):
        register(Middle)
