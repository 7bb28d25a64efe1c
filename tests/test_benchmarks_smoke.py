"""The benchmarks run and write valid reports (their figures are judged in benchmarks/, not here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import fidelity
from benchmarks.kernels import bench_rope_rerotate


@pytest.mark.slow
def test_fidelity_quick_run_writes_a_valid_report(amem_server, tmp_path):
    argv = ["--url", amem_server.url, "--quick", "--out", str(tmp_path), "--policies", "none", "all"]
    assert fidelity.main(argv) == 0
    (report,) = tmp_path.glob("*fidelity-none-all-quick.json")
    data = json.loads(report.read_text())
    none, everything = data["summary"]["none overall"], data["summary"]["all overall"]
    assert none["n"] == everything["n"] == 6 and len(data["rows"]) == 12
    assert {"none band=short", "none band=long", "all hops=2"} <= set(data["summary"])
    assert none["recomputed_fraction"] == 0.0 and everything["recomputed_fraction"] == 1.0
    # Pure reuse computes fewer prompt tokens than the isolated full prefill on every question...
    assert all(r["reuse_computed_tokens"] < r["full_computed_tokens"] for r in data["rows"] if r["policy"] == "none")
    # ...and recomputing every spliced token in the blend pass gives the full prefill's answers.
    assert everything["identical_answers"] >= 5 / 6
    assert (tmp_path / report.name.replace(".json", ".md")).read_text().startswith("# Fidelity")


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
    listed = {line.split("|")[1].strip() for line in md.read_text().splitlines()[8:]}
    assert expected and expected <= listed, (expected, listed)
