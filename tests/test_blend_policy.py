"""Blend policies: which tokens each recomputes, the deviation budget, and the reported cost."""

from __future__ import annotations

import pytest
import torch

from amem_sgl.blend.policy import BlendPolicy
from amem_sgl.blend.attention import attention_mass
from amem_sgl.blend.context import top_positions
from amem_sgl.blend.runner import BlendPlan

SEGMENTS = [(10, 8), (18, 3), (30, 20)]  # spliced chunks (start, length): 31 tokens


@pytest.mark.parametrize("text, policy", [
    ("none", BlendPolicy("none")),
    ("sink:16", BlendPolicy("sink", 16)),
    ("edges:8", BlendPolicy("edges", 8)),
    ("hkvd:0.15", BlendPolicy("hkvd", ratio=0.15)),
    ("hkvd:0.3@3", BlendPolicy("hkvd", ratio=0.3, check_layer=3)),
    ("sink+hkvd:4:0.1", BlendPolicy("sink+hkvd", 4, 0.1)),
    ("edges+hkvd:2:0.05@2", BlendPolicy("edges+hkvd", 2, 0.05, 2)),
    ("cacheblend:0.15", BlendPolicy("cacheblend", ratio=0.15, check_layer=2)),
    ("cacheblend:0.1@1", BlendPolicy("cacheblend", ratio=0.1, check_layer=1)),
    ("edges+cacheblend:8:0.05@3", BlendPolicy("edges+cacheblend", 8, 0.05, 3)),
    ("query:0.15", BlendPolicy("query", ratio=0.15, check_layer=64)),
    ("query:0.1@5", BlendPolicy("query", ratio=0.1, check_layer=5)),
    ("edges+query:4:0.1", BlendPolicy("edges+query", 4, 0.1, 64)),
])
def test_parse_and_label_round_trip(text, policy):
    assert BlendPolicy.parse(text) == policy
    assert BlendPolicy.parse(policy.label) == policy


@pytest.mark.parametrize("text", ["hkvd:1.5", "sink:0", "hkvd:0.1@0", "magic", "sink+hkvd:4:-1", "cacheblend:4:0.1",
                                  "query:0.1:0.2", "edges+query:0.1", "cacheblend:0.1@0"])
def test_invalid_policies_are_refused(text):
    with pytest.raises(ValueError):
        BlendPolicy.parse(text)


def test_fixed_positions_per_policy():
    assert BlendPolicy("sink", 2).select(SEGMENTS) == [10, 11, 18, 19, 30, 31]
    assert BlendPolicy("tail", 2).select(SEGMENTS) == [16, 17, 19, 20, 48, 49]
    assert BlendPolicy("edges", 4).select(SEGMENTS) == [*range(10, 18), 18, 19, 20, 30, 31, 32, 33, 46, 47, 48, 49]
    assert BlendPolicy("hkvd", ratio=0.5).select(SEGMENTS) == []
    assert BlendPolicy("sink+hkvd", 1, 0.5).select(SEGMENTS) == [10, 18, 30]
    assert len(BlendPolicy("all").select(SEGMENTS)) == 31


def test_deviation_budget_and_compute_fraction():
    hkvd = BlendPolicy("hkvd", ratio=0.2, check_layer=1)
    assert hkvd.deviation_budget(SEGMENTS) == round(0.2 * 31) == 6
    # 6 tokens through 30 layers + a probe of 31 tokens through 2 layers, over 31 x 30.
    assert hkvd.compute_fraction(SEGMENTS, 30) == pytest.approx((6 * 30 + 31 * 2) / (31 * 30))
    combo = BlendPolicy("sink+hkvd", 8, 0.9)
    assert combo.recomputed_tokens(SEGMENTS) == 31  # capped at every spliced token
    assert BlendPolicy("sink", 4).compute_fraction(SEGMENTS, 30) == pytest.approx(11 / 31)


def test_plan_adds_the_highest_deviation_tokens_beyond_its_fixed_ones():
    plan = BlendPlan(end=50, positions=(10, 30), segments=((10, 4), (30, 4)), budget=3)
    # probe order: 10 11 12 13 30 31 32 33; the fixed 10 and 30 have the largest deviation but are
    # already in, so the budget goes to the next three: 33, 12, 31.
    deviation = torch.tensor([9.0, 0.1, 5.0, 0.2, 8.0, 4.0, 0.3, 7.0])
    chosen = plan.with_deviation(deviation)
    assert chosen.positions == (10, 12, 30, 31, 33) and chosen.budget == 0


def test_usage_extension_survives_openai_serialisation():
    """The OpenAI usage hook adds usage.amem, and SGLang's response model keeps it when serialised."""
    from amem_sgl import plugin
    from amem_sgl import sglang_compat as sgl
    from sglang.srt.entrypoints.openai.protocol import CompletionResponse
    from sglang.srt.entrypoints.openai.usage_processor import UsageProcessor

    sgl.allow_usage_extension_fields()
    report = {"namespace": "alice", "spliced_tokens": 40, "recomputed_tokens": 6, "probed_tokens": 40,
              "probe_layers": 2, "extended_tokens": 9, "blend_policy": "hkvd:0.15"}
    responses = [{"meta_info": {"prompt_tokens": 60, "completion_tokens": 5, "amem": [report]}},
                 {"meta_info": {"prompt_tokens": 60, "completion_tokens": 7, "amem": [report]}}]
    usage = plugin._response_usage(UsageProcessor.calculate_response_usage, responses, n_choices=2)
    body = CompletionResponse(id="x", model="m", choices=[], usage=usage).model_dump()
    assert body["usage"]["completion_tokens"] == 12  # SGLang's own sums are untouched
    assert body["usage"]["amem"]["spliced_tokens"] == 40 and body["usage"]["amem"]["namespace"] == "alice"
    plain = plugin._response_usage(UsageProcessor.calculate_response_usage, [{"meta_info": {"prompt_tokens": 3}}])
    assert "amem" not in CompletionResponse(id="y", model="m", choices=[], usage=plain).model_dump()["usage"]


def test_cacheblend_keeps_shrink_linearly_to_its_budget_and_count_every_stage():
    b = BlendPolicy.parse("cacheblend:0.2")  # check layers 1 and 2
    assert b.deviation_budget(SEGMENTS) == 6 and b.plan_fields(SEGMENTS, 30) == {"signal": "value", "keeps": (12, 6)}
    # all 31 tokens through layers 0-1, then the 12 candidates through layers 0-2; 6 through all 30.
    assert b.probe_cost(SEGMENTS, 30) == (31, pytest.approx((2 * 31 + 3 * 12) / 31, abs=1e-4))
    assert b.compute_fraction(SEGMENTS, 30) == pytest.approx((6 * 30 + 2 * 31 + 3 * 12) / (31 * 30), abs=1e-5)
    three = BlendPolicy.parse("cacheblend:0.2@3")
    assert three.plan_fields(SEGMENTS, 30)["keeps"] == (18, 12, 6)
    assert three.probe_cost(SEGMENTS, 30)[1] == pytest.approx((2 * 31 + 3 * 18 + 4 * 12) / 31, abs=1e-4)
    assert BlendPolicy.parse("cacheblend:0.2@1").plan_fields(SEGMENTS, 30)["keeps"] == (6,)  # the reference code
    assert BlendPolicy.parse("cacheblend:0.2@3").plan_fields(SEGMENTS, 3)["keeps"] == (12, 6)  # capped: 3 layers
    assert BlendPolicy.parse("cacheblend:0.6").plan_fields(SEGMENTS, 30)["keeps"] == (31, 19)  # at most every token
    combo = BlendPolicy.parse("edges+cacheblend:2:0.2")
    assert combo.plan_fields(SEGMENTS, 30)["keeps"] == (12, 6) and len(combo.select(SEGMENTS)) == 11


def test_query_probe_costs_the_question_through_its_layers():
    q = BlendPolicy.parse("query:0.2")
    assert q.plan_fields(SEGMENTS, 30) == {"signal": "query", "keeps": ()} and q.plan_check_layer(30) == 29
    assert q.probe_cost(SEGMENTS, 30, extended=9) == (9, 30)
    assert q.compute_fraction(SEGMENTS, 30, extended=9) == pytest.approx((6 * 30 + 9 * 30) / (31 * 30))
    assert BlendPolicy.parse("query:0.2@3").probe_cost(SEGMENTS, 30, extended=9) == (9, 4)
    assert BlendPolicy.parse("query:0").probe_cost(SEGMENTS, 30, extended=9) == (0, 0)  # no budget, no probe


def test_top_positions_picks_the_highest_allowed():
    rows = [3, 4, 5, 6, 7]
    scores = torch.tensor([9.0, 1.0, 8.0, 2.0, 7.0])
    assert top_positions(rows, scores, [4, 5, 6, 7], 2) == [5, 7]  # 3 scores highest but is not allowed
    assert top_positions(rows, scores, [4], 3) == [4] and top_positions(rows, scores, [], 3) == []


def _naive_mass(query, k_cache, rows, seq_lens, extend_lens, positions, score_from, scale):
    out, start = [], 0
    heads, kv_heads = query.shape[1], k_cache.shape[1]
    for i, (q_len, kv_len) in enumerate(zip(extend_lens, seq_lens)):
        mass = torch.zeros(kv_len, dtype=torch.float64)
        keys = k_cache[rows[i][:kv_len]].double()
        for t in range(start, start + q_len):
            pos = int(positions[t])
            if pos < score_from[i]:
                continue
            for h in range(heads):
                logits = keys[: pos + 1, h // (heads // kv_heads)] @ query[t, h].double() * scale
                mass[: pos + 1] += torch.softmax(logits, dim=0)
        out.append(mass)
        start += q_len
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_attention_mass_equals_a_per_head_softmax_on_fresh_random_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    heads, kv_heads, dim, slots = 6, 2, 8, 200
    seq_lens, extend_lens = [40, 57], [7, 12]
    # sequence 0: question rows at 33..39 (all scored); sequence 1: a gap at 20, then the question 46..56
    positions = torch.tensor([*range(33, 40), 20, *range(46, 57)])
    score_from = [33, 46]
    req_to_token = torch.stack([torch.randperm(slots, generator=gen)[:64] for _ in range(3)])
    pool_rows = torch.tensor([2, 0])
    query = torch.randn(sum(extend_lens), heads, dim, generator=gen)
    k_cache = torch.randn(slots, kv_heads, dim, generator=gen) * 2
    got = attention_mass(query, k_cache, req_to_token, pool_rows, torch.tensor(seq_lens), torch.tensor(extend_lens),
                         positions, score_from, scaling=dim ** -0.5)
    want = _naive_mass(query, k_cache, req_to_token[pool_rows], seq_lens, extend_lens, positions, score_from,
                       dim ** -0.5)
    for g, w, n_q in zip(got, want, (7, 11)):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6)
        assert float(g.sum()) == pytest.approx(n_q * heads, rel=1e-5)  # each row's softmax sums to 1
    again = attention_mass(query, k_cache, req_to_token, pool_rows, torch.tensor(seq_lens), torch.tensor(extend_lens),
                           positions, score_from, scaling=dim ** -0.5, into=[g.clone() for g in got])
    torch.testing.assert_close(again[1], 2 * got[1])  # accumulates over layers
