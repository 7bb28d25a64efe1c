"""The benchmarks run and write valid reports (their figures are judged in benchmarks/, not here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import fidelity
from benchmarks.kernels import bench_rope_rerotate


@pytest.mark.slow
def test_fidelity_quick_run_writes_a_valid_report_and_plot(amem_server, tmp_path):
    from benchmarks import fidelity_tradeoff

    argv = ["--url", amem_server.url, "--quick", "--out", str(tmp_path), "--policies", "none", "all", "exact",
            "guarded:1", "guarded:0/none", "ctx:none"]
    assert fidelity.main(argv) == 0
    (report,) = tmp_path.glob("*fidelity-main-none-all-exact-guarded1-guarded0none-ctxnone-quick.json")
    data = json.loads(report.read_text())
    assert data["meta"]["set"] == "main" and data["meta"]["split"] == "test"
    none, everything = data["summary"]["none overall"], data["summary"]["all overall"]
    assert none["n"] == everything["n"] == 3 and len(data["rows"]) == 18
    # exact splices nothing: it prefills every prompt token, as the full arm does.
    assert all(r["reuse_computed_tokens"] == r["full_computed_tokens"] for r in data["rows"] if r["policy"] == "exact")
    # The guard at margin 1 escalates every question (no margin reaches 1 with two candidates), at 0 none.
    by_arm = {a: [r for r in data["rows"] if r["policy"] == a] for a in ("guarded:1", "guarded:0/none")}
    assert [r["escalated"] for r in by_arm["guarded:1"]] == [True] * 3
    # ... and an escalated question, like every exact one, answers as the isolated full prefill does.
    assert all(r["identical"] for r in data["rows"] if r["policy"] in ("exact", "guarded:1")), data["rows"]
    assert [r["escalated"] for r in by_arm["guarded:0/none"]] == [False] * 3
    assert all(0.0 <= r["reuse_margin"] <= 1.0 for rows in by_arm.values() for r in rows)
    # The guard replayed over the blend arms' margins: every threshold, escalations growing with it.
    assert none["spliced_fraction"] > 0.99  # every chunk of the pure-splice arm was spliced
    assert data["summary"]["exact overall"]["spliced_fraction"] == 0.0
    # Context-aware chunk KV: the chunks captured by the first use (another order, a fresh namespace) are
    # all spliced by the compared prompt, on the shared server's full pool too (tests/test_ctx_capture.py).
    ctx = [r for r in data["rows"] if r["policy"] == "ctx:none"]
    assert [r["spliced_tokens"] for r in ctx] == [r["chunk_tokens"] for r in ctx], ctx
    assert set(data["guard_sweep"]) == {"none", "all", "ctx:none"}
    rates = [x["escalation_rate"] for x in data["guard_sweep"]["none"]["sweep"]]
    assert rates == sorted(rates) and len(rates) == 21
    assert {"none band=short", "none band=medium", "none band=long"} <= set(data["summary"])
    for key in ("identical_answers", "answer_agreement", "reuse_accuracy", "full_accuracy", "accuracy_delta",
                "first_token_kl", "recomputed_fraction", "prefill_ratio_full_over_reuse", "ttft_ratio_full_over_reuse"):
        assert key in none, key
    # "all" recomputes every spliced chunk token except the first chunk's, spliced in place (its KV
    # is already the prefill's): the recompute fraction is the rest of the chunk tokens, exactly.
    whole = [r for r in data["rows"] if r["policy"] == "all"]
    assert all(r["in_place_tokens"] > 0 and r["recomputed_chunk_tokens"] + r["in_place_tokens"] == r["chunk_tokens"]
               for r in whole), whole
    in_place = sum(r["in_place_tokens"] for r in whole) / sum(r["chunk_tokens"] for r in whole)
    assert none["recomputed_fraction"] == 0.0 and everything["recomputed_fraction"] == pytest.approx(1.0 - in_place)
    # The KL comes from the server's logprobs on every row (a number, not a missing value).
    assert all(isinstance(r["first_token_kl"], float) and r["first_token_kl"] >= 0 for r in data["rows"])
    # Pure reuse computes fewer prompt tokens than the isolated full prefill on every question.
    assert all(r["reuse_computed_tokens"] < r["full_computed_tokens"] for r in data["rows"] if r["policy"] == "none")
    assert set(data["targets"]) == {"none", "all", "exact", "guarded:1", "guarded:0/none", "ctx:none"}
    assert (tmp_path / report.name.replace(".json", ".md")).read_text().startswith("# Fidelity (main set")
    # The trade-off plot draws the run.
    assert fidelity_tradeoff.main(["--results", str(tmp_path)]) == 0
    (png,) = tmp_path.glob("*-fidelity-tradeoff.png")
    assert png.stat().st_size > 10_000


def test_main_set_is_balanced_shuffled_and_disjoint_from_calibration():
    from benchmarks.fidelity_data import KINDS, make_lookups, split_people

    test, calib = make_lookups(60), make_lookups(60, split="calibration")
    assert {q.band for q in test} == {"short", "medium", "long"} and {q.kind for q in test} == set(KINDS)
    asked = lambda items: {name for q in items for name in split_people("test") + split_people("calibration")
                           if name in q.question}  # noqa: E731
    assert asked(test) and not asked(test) & asked(calib)
    assert all(sum(q.gold in c for c in q.chunks) >= 1 for q in test)
    # The answer's chunk is not always in the same place.
    positions = {next(i for i, c in enumerate(q.chunks) if q.gold in c) for q in test}
    assert len(positions) >= 3, positions
    assert make_lookups(60) == test  # deterministic


def test_long_answer_set_asks_the_cost_curve_questions_over_its_chunks():
    from benchmarks.fidelity import load_items
    from benchmarks.fidelity_data import make_long_answers

    items = load_items("long", 24, 0)
    assert items == make_long_answers(24) and len({q.qid for q in items}) == 24
    assert {q.band for q in items} == {"facts", "passage"} and all(len(q.chunks) == 4 for q in items)
    for q in items:
        name = q.question.split("which city is ")[1][: -len(" connected to?")]
        stating = [c for c in q.chunks if f"{name} is connected to {q.gold}" in c or f": {name} from {q.gold}" in c]
        assert len(stating) == 1, q  # one chunk states the asked fact...
        topic = q.question.split("my ")[1].split(" notes")[0]
        assert all(topic in c.split(":")[0] for c in q.chunks)  # ...among chunks of the question's topic
    # The answer's chunk is not always in the same place.
    assert len({next(i for i, c in enumerate(q.chunks) if q.gold in c) for q in items}) >= 3
    with pytest.raises(ValueError, match="calibration"):
        load_items("long", 3, 0, "calibration")


def test_first_token_kl_is_zero_for_equal_and_positive_for_different_distributions():
    import math

    from benchmarks.fidelity_metrics import first_token_kl

    full = {1: math.log(0.7), 2: math.log(0.2)}
    assert first_token_kl(full, dict(full)) == 0.0
    shifted = {1: math.log(0.2), 2: math.log(0.7)}
    expected = 0.7 * math.log(0.7 / 0.2) + 0.2 * math.log(0.2 / 0.7)  # the rest (0.1 vs 0.1) adds 0
    assert abs(first_token_kl(full, shifted) - expected) < 1e-9
    assert first_token_kl(full, {1: 0.0}) is None  # a token of the full arm missing on the reuse side


def test_kernel_bench_runs_and_checks_its_output(tmp_path, capsys):
    rows = bench_rope_rerotate.run([1024], bench_rope_rerotate.torch.device("cpu"), sets=2)
    (row,) = rows
    assert row["rel_error_vs_fp64"] < 1e-2 and row["rerotate_GBps"] > 0 and row["contiguous_copy_GBps"] > 0


@pytest.mark.slow
def test_cost_curve_quick_run_writes_valid_json_a_plot_and_latest(amem_server, tmp_path):
    from benchmarks import cost_curve

    assert cost_curve.main(["--quick", "--url", amem_server.url, "--out", str(tmp_path)]) == 0
    latest = json.loads((tmp_path / "latest-quick.json").read_text())
    for key in ("device", "model", "prefill_ratio_per_query", "prefill_ratio_session", "ttft_ratio_per_query",
                "ttft_ratio_session", "break_even_queries", "answer_agreement", "numeric_floor_agreement",
                "recompute_fraction"):
        assert key in latest
    (report,) = tmp_path.glob("*cost-curve-*-quick.json")
    rows = json.loads(report.read_text())["rows"]
    assert {r["arm"] for r in rows} == {"text", "query", "session"} and len(rows) == 18
    assert all(r["prompt_tokens"] > 0 and r["ttft_s"] > 0 for r in rows)
    assert (tmp_path / latest["plot"]).stat().st_size > 10_000  # a real PNG


def test_blend_attention_bench_runs_and_checks_its_output():
    from benchmarks.kernels import bench_blend_attention

    rows = bench_blend_attention.run([256], bench_blend_attention.torch.device("cpu"))
    assert len(rows) == 2 and all(r["rel_error_vs_reference"] < 1e-2 and r["kernel_ms"] > 0 for r in rows)


def test_fidelity_tradeoff_plots_every_policy_of_the_committed_runs(tmp_path):
    import shutil

    from benchmarks import fidelity_tradeoff

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    runs = sorted(results.glob("*-fidelity-*.json"))[:2] + sorted(results.glob("*-numeric-floor.json"))[-1:]
    assert len(runs) == 3, "the committed fidelity and numeric-floor results are missing"
    for path in runs:
        shutil.copy(path, tmp_path)
    assert fidelity_tradeoff.main(["--results", str(tmp_path / "none")]) == 1  # nothing to plot: says so
    assert fidelity_tradeoff.main(["--results", str(tmp_path)]) == 0
    (png,) = tmp_path.glob("*-fidelity-tradeoff.png")
    (md,) = tmp_path.glob("*-fidelity-tradeoff.md")
    assert png.stat().st_size > 10_000
    expected = {group[: -len("overall")].strip() for path in runs[:2]
                for group in json.loads(path.read_text())["summary"] if group.endswith("overall")}
    listed = {line.split("|")[1].strip() for line in md.read_text().splitlines() if line.startswith("| ")}
    assert expected and expected <= listed, (expected, listed)


def test_cpu_micro_quick_run_writes_its_report(tmp_path):
    from benchmarks import cpu_micro

    assert cpu_micro.main(["--quick", "--out", str(tmp_path)]) == 0
    (report,) = tmp_path.glob("*-cpu-micro-quick.json")
    data = json.loads(report.read_text())
    assert data["embed"]["cosine"] > 0.999 and data["keys"]["stretches"] == 3
    assert all(data[k]["ratio"] > 0 for k in ("embed", "keys", "splice")) and data["splice"]["splice_ms"] > 0
    assert data["embed"]["direct_identical"]  # the one-text path gives encode's vector bit for bit
    groups = data["keys"]["groups"]  # the folded pass's recomputed rows, split into key groups
    assert len(groups["groups"]) > 1 and sum(n for n, _ in groups["groups"]) == groups["recomputed_rows"]
    linear = data["linear"]
    if linear["supported"]:  # the packed linears give F.linear's values at every row count measured
        assert set(linear["rows"]) == {str(m) for m in cpu_micro.LINEAR_ROWS}
        assert all(row["bit_identical"] for row in linear["rows"].values()), linear["rows"]
        assert data["embed"]["packed_active"] and data["embed"]["packed_identical"]  # the embedder's too
        assert linear["lm_head"]["bit_identical"] and linear["lm_head"]["ratio"] > 0  # and the LM head's
    assert (tmp_path / report.name.replace(".json", ".md")).exists()


@pytest.mark.slow
def test_packed_linear_quick_run_serves_identical_outputs(tmp_path):
    """Two real servers, packed linears on and off, the same greedy requests alternated: the same
    output token ids (the benchmark exits 1 otherwise), and its report written."""
    from benchmarks import packed_linear

    assert packed_linear.main(["--quick", "--out", str(tmp_path)]) == 0
    (report,) = tmp_path.glob("*-packed-linear-quick.json")
    data = json.loads(report.read_text())
    assert data["identical_outputs"] and len(data["on"]["outputs"]) == len(data["off"]["outputs"]) == 2
    assert all(len(ids) == 16 for ids in data["on"]["outputs"])
