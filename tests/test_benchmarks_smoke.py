"""The benchmarks run and write valid reports (their figures are judged in benchmarks/, not here)."""

from __future__ import annotations

import json

import pytest

from benchmarks import fidelity
from benchmarks.kernels import bench_rope_rerotate


@pytest.mark.slow
def test_fidelity_quick_run_writes_a_valid_report(amem_server, tmp_path):
    assert fidelity.main(["--url", amem_server.url, "--quick", "--out", str(tmp_path)]) == 0
    (report,) = tmp_path.glob("*fidelity-splice-quick.json")
    data = json.loads(report.read_text())
    overall = data["summary"]["overall"]
    assert overall["n"] == 6 and len(data["rows"]) == 6
    assert {"band=short", "band=medium", "band=long", "hops=1", "hops=2"} <= set(data["summary"])
    # Reuse computed fewer prompt tokens than the isolated full prefill on every question.
    assert all(r["reuse_computed_tokens"] < r["full_computed_tokens"] for r in data["rows"])
    assert all(0.0 <= overall[k] <= 1.0 for k in ("first_token_agreement", "identical_answers"))
    assert (tmp_path / report.name.replace(".json", ".md")).read_text().startswith("# Fidelity")


def test_kernel_bench_runs_and_checks_its_output(tmp_path, capsys):
    rows = bench_rope_rerotate.run([1024], bench_rope_rerotate.torch.device("cpu"), sets=2)
    (row,) = rows
    assert row["rel_error_vs_fp64"] < 1e-2 and row["rerotate_GBps"] > 0 and row["contiguous_copy_GBps"] > 0
