"""Blend policies: which tokens each recomputes, the deviation budget, and the reported cost."""

from __future__ import annotations

import pytest
import torch

from amem_sgl.blend.policy import BlendPolicy
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
])
def test_parse_and_label_round_trip(text, policy):
    assert BlendPolicy.parse(text) == policy
    assert BlendPolicy.parse(policy.label) == policy


@pytest.mark.parametrize("text", ["hkvd:1.5", "sink:0", "hkvd:0.1@0", "magic", "sink+hkvd:4:-1"])
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
