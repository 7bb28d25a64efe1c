"""The TTFT breakdown of a memory turn (``usage.amem.timings``): the scheduler's phases on real CPU
pools, how the HTTP process places them on its clock, and a served turn, streamed and not."""

from __future__ import annotations

import json
import time

import pytest
import requests

from amem_sgl.cache.usage import add_timing, stamp, usage_of
from amem_sgl.chunks import build_kv_hints
from amem_sgl.memory import timings
from tests.pools import finish, start
from tests.test_chunk_splice import A, B, C, compose, make


def test_admission_records_match_queue_and_splice_on_real_pools():
    cache, pools = make(registered=(A, B, C), blend=True)
    prompt, spans = compose([C, A, B])
    before = time.perf_counter()
    req = start(cache, pools, prompt, build_kv_hints("alice", spans))
    after = time.perf_counter()
    assert req.prefix_len == spans[-1][1]  # spliced
    t = usage_of(req)["timings"]
    assert {"match_s", "splice_s", "queue_s", "recv_at"} <= set(t)
    assert 0 < t["splice_s"] < after - before and 0 < t["match_s"] <= t["queue_s"] + 1e-6
    # recv_at is the scheduler's receive stamp (made with the Req), queue_s runs from it to admission.
    assert before <= t["recv_at"] and t["recv_at"] + t["queue_s"] + t["splice_s"] <= after
    assert req.rid not in cache._match_s  # consumed at admission
    finish(cache, req)


def test_a_chunk_request_admitted_without_a_splice_gets_its_phases_only():
    cache, pools = make(registered=(A,), blend=True)
    prompt, spans = compose([B])  # B was never registered: nothing to splice, the preamble is a prefix hit
    req = start(cache, pools, prompt, build_kv_hints("alice", spans))
    assert 0 < req.prefix_len < spans[0][1]
    assert usage_of(req) is None
    cache.timing_record(req)  # what the forward hook does before the batch's forward
    cache.timing_record(req)  # once: a later chunk of a chunked prefill keeps the record
    usage = usage_of(req)
    assert set(usage) == {"namespace", "blend_policy", "timings", "computed_chunk_tokens"}
    assert usage["namespace"] == "alice"
    # B's tokens past the cached preamble are this request's to prefill (tests/test_sdk_reused.py)
    assert usage["computed_chunk_tokens"] == spans[0][1] - max(spans[0][0], req.prefix_len) > 0
    assert {"match_s", "queue_s", "recv_at"} == set(usage["timings"]) and usage["timings"]["queue_s"] >= 0
    add_timing(req, "extend_s", 0.5)  # the forward hook adds to it as to a spliced request's
    assert usage_of(req)["timings"]["extend_s"] == 0.5
    assert cache.stats.spliced_requests == 0
    finish(cache, req)
    assert req.rid not in cache._match_s and req.rid not in cache._parsed
    # A request without chunk spans gets no record at all.
    plain = start(cache, pools, prompt)
    cache.timing_record(plain)
    assert usage_of(plain) is None
    add_timing(plain, "extend_s", 1.0)  # no record: a no-op, not an error
    stamp(plain, "done_at", 1.0)
    assert usage_of(plain) is None
    finish(cache, plain)


def test_add_timing_accumulates_and_stamps_overwrite():
    class Req:
        customized_info = {"amem": [{"spliced_tokens": 3}]}

    req = Req()
    add_timing(req, "extend_s", 0.25)
    add_timing(req, "extend_s", 0.5)  # a chunked prefill: several extends
    stamp(req, "done_at", 7.0)
    stamp(req, "done_at", 9.0)
    assert usage_of(req)["timings"] == {"extend_s": 0.75, "done_at": 9.0}


def test_merge_places_scheduler_phases_on_the_http_clock():
    http = {"started_at": 100.0, "convert_s": 0.01, "recall_s": 0.02, "compose_s": 0.03, "sent_at": 100.07}
    sched = {"match_s": 0.001, "queue_s": 0.05, "splice_s": 0.02, "blend_s": 0.1, "extend_s": 0.2,
             "recv_at": 100.1, "done_at": 100.6}
    out = timings.merge(http, [{"spliced_tokens": 10, "timings": sched}])
    assert out["plan_s"] == pytest.approx(0.01)  # the hook's time beyond its three phases
    assert out["dispatch_s"] == pytest.approx(0.03)  # 100.07 -> 100.1
    # admitted at 100.1 + 0.05 + 0.02 = 100.17; forwards 0.3 end at 100.6: 0.13 s between
    assert out["schedule_s"] == pytest.approx(0.13)
    assert out["total_s"] == pytest.approx(0.6)
    assert list(out) == [p for p in timings.PHASES if p in out]  # the table's order
    assert "recv_at" not in out and "done_at" not in out and "sent_at" not in out
    # Everything but match_s (inside queue_s) adds up to the total.
    assert sum(v for k, v in out.items() if k not in ("total_s", "match_s")) == pytest.approx(out["total_s"], abs=1e-3)
    # No scheduler record (nothing spliced): the HTTP phases alone.
    assert timings.merge(http, None) == {"convert_s": 0.01, "recall_s": 0.02, "compose_s": 0.03, "plan_s": 0.01}


SERVED = ("convert_s", "recall_s", "compose_s", "plan_s", "dispatch_s", "queue_s", "splice_s", "schedule_s", "extend_s",
          "total_s")


@pytest.mark.slow
def test_a_served_memory_turn_reports_its_phases_streamed_and_not(amem_server):
    from amem_sgl.sdk import Amem

    Amem(amem_server.url).remember("timings-ns", ["Tom's brother Ian lives in Oslo.", "Tom works at a bakery in Lyon."])

    def body(nonce: str, level: str = "fast") -> dict:  # its own system prompt: spliced after it, not a prefix hit
        return {"model": "default", "user": "timings-ns", "max_tokens": 4, "temperature": 0, "amem_fidelity": level,
                "messages": [{"role": "system", "content": f"Answer briefly ({nonce})."},
                             {"role": "user", "content": "Where does Tom work?"}]}

    t0 = time.perf_counter()
    reply = requests.post(f"{amem_server.url}/v1/chat/completions", json=body("a"), timeout=300)
    wall = time.perf_counter() - t0
    assert reply.status_code == 200, reply.text
    amem = reply.json()["usage"]["amem"]
    assert amem["spliced_tokens"] > 0
    # Behind its own system prompt no chunk sits where its KV was computed: none in place.
    assert amem["in_place_tokens"] == 0, amem
    t = amem["timings"]
    assert set(SERVED) <= set(t), t
    assert all(v >= 0 for v in t.values()) and 0 < t["total_s"] < wall
    inside = [k for k in t if k not in ("total_s", "match_s", "ingress_s", "output_s")]  # what total_s spans
    assert sum(t[k] for k in inside) == pytest.approx(t["total_s"], abs=5e-3)
    if amem["recomputed_tokens"]:  # a blend pass: its own forward, or folded into the extend (CPU)
        assert t.get("blend_s", 0) > 0 or t["blend_fold_s"] > 0
    # Streamed: the usage chunk carries the same report.
    stream = {**body("b"), "stream": True, "stream_options": {"include_usage": True}}
    usage = None
    with requests.post(f"{amem_server.url}/v1/chat/completions", json=stream, stream=True, timeout=300) as reply:
        for line in reply.iter_lines():
            if line.startswith(b"data: {") and b'"usage"' in line:
                usage = json.loads(line[6:]).get("usage") or usage
    assert usage is not None and set(SERVED) | {"ingress_s", "output_s"} <= set(usage["amem"]["timings"]), usage
    assert usage["amem"]["memory"]["namespace"] == "timings-ns"
    # An exact turn splices nothing: its record has the phases it went through (no splice, no blend).
    reply = requests.post(f"{amem_server.url}/v1/chat/completions", json=body("c", "exact"), timeout=300)
    assert reply.status_code == 200, reply.text
    exact = reply.json()["usage"]["amem"]
    assert exact["spliced_tokens"] == 0 and exact["memory"]["fidelity"] == "exact"
    assert {"recall_s", "queue_s", "extend_s", "total_s"} <= set(exact["timings"]) and "splice_s" not in exact["timings"]


def test_the_cost_curves_breakdown_averages_each_arms_phases():
    from benchmarks.cost_curve import Turn
    from benchmarks.ttft_phases import breakdown, table

    def turn(arm, ttft, timings):
        return Turn(arm, 0, 100, 0, 0, 100, ttft, "", [], timings=timings)

    rows = [turn("text", 1.0, {}), turn("text", 3.0, {}),
            turn("query", 0.5, {"recall_s": 0.02, "total_s": 0.3, "ingress_s": 0.01, "output_s": 0.05}),
            turn("query", 0.7, {"recall_s": 0.04, "blend_s": 0.2, "total_s": 0.5, "ingress_s": 0.01, "output_s": 0.05})]
    out = breakdown(rows, ("text", "query"))
    assert out["text"] == {"turns": 2, "timed_turns": 0, "ttft_s": 2.0}
    q = out["query"]
    assert q["ttft_s"] == 0.6 and q["recall_s"] == pytest.approx(0.03) and q["total_s"] == pytest.approx(0.4)
    assert q["blend_s"] == pytest.approx(0.1)  # a phase a turn did not have counts as 0 for it
    assert q["out_s"] == pytest.approx(0.6 - 0.4 - 0.01 - 0.05)
    lines = table(out)
    assert lines[0] == "| phase (mean ms) | text | query |" and "| recall_s |  | 30.0 |" in lines
    assert lines[-1] == "| timed turns | 0/2 | 2/2 |"
