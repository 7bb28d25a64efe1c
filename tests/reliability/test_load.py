"""Load: 32 concurrent clients over 8 namespaces (memory turns with splice + blend, streaming,
completions, native splices, cross-namespace probes, plain chat, remember + forget, search,
sessions). CI runs 2 requests per client; the report (python -m benchmarks.reliability) 100."""

import pytest

pytestmark = pytest.mark.slow

CLIENTS, PER_CLIENT = 32, 2


def test_32_clients_over_8_namespaces_no_error_no_cross_namespace_hit_no_leak_slots_back(harness):
    report = harness.load(CLIENTS, PER_CLIENT)
    assert report["requests"] == CLIENTS * PER_CLIENT
    assert report["errors"] == 0, report["error_samples"]
    # No namespace's answer named another's secret, no chunk of another namespace was reported or
    # spliced, and a cross probe (another namespace's chunk tokens declared here) got no KV.
    assert report["violations"] == 0 and report["cross_namespace"] == 0, report["violation_samples"]
    assert len(report["kinds"]) >= 8, report["kinds"]  # the mix really mixed
    assert report["leak_lines"] == [] and report["alive"] and report["answers"]
    idle = report["idle"]
    assert idle["num_used_tokens"] == 0 and idle["num_running_reqs"] == idle["num_waiting_reqs"] == 0, idle
    assert idle["protected_tokens"] == 0 and idle["pending_splices"] == 0, idle
    memory = report["memory"]
    assert memory["intact"] == 8, memory["missing"]  # remember + forget left exactly the secrets' chunks
