"""The proxy cost benchmark runs end to end and writes a valid report (its figures are judged in
benchmarks/results, not here)."""

from __future__ import annotations

import json

import pytest

from benchmarks import proxy_cost
from tests.proxy_upstream import plain_upstream


@pytest.mark.slow
def test_proxy_cost_quick_run_writes_json_md_and_a_plot(tmp_path):
    assert proxy_cost.main(["--quick", "--upstream", plain_upstream().url, "--out", str(tmp_path)]) == 0
    (report,) = tmp_path.glob("*-proxy-cost-quick.json")
    data = json.loads(report.read_text())
    rows = data["rows"]
    assert [r["arm"] for r in rows] == [a for a in proxy_cost.ARMS for _ in range(4)]
    assert all(r["prompt_tokens"] > 0 and set(r["cost"]) == set(rows[0]["cost"]) for r in rows)
    assert all(r["chunks_used"] for r in rows if r["arm"] == "proxy")  # the proxy arm did go through the proxy
    assert set(data["summary"]["ratios"]) == set(rows[0]["cost"])
    assert report.with_suffix(".png").stat().st_size > 10_000  # a real PNG
    assert report.with_suffix(".md").read_text().startswith("# Proxy cost")
