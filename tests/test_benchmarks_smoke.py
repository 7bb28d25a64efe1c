"""The benchmarks run and write valid reports (their figures are judged in benchmarks/, not here)."""

from __future__ import annotations

import json

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
