"""Faults: kill -9 of the server during a 200-chunk remember (then a restart on the same folders),
kill -9 of the residency service under load, and a full disk tier during remember."""

import pytest

from benchmarks.reliability import faults

pytestmark = pytest.mark.slow


def test_killed_residency_service_under_load_every_request_is_answered(harness):
    report = harness.residency_kill(clients=8, per_client=3, after_s=3.0)
    load = report["load"]
    assert load["errors"] == 0 and load["violations"] == 0, (load["error_samples"], load["violation_samples"])
    assert report["restarted_pid"] and report["restarted_pid"] != report["killed_pid"]
    assert report["server_alive"] and report["leak_lines"] == []


def test_full_disk_tier_during_remember_refuses_or_evicts_never_corrupts(harness):
    report = harness.disk_full(chunks=20)
    # Every call answered: 200, or a clear error with a message.
    assert report["acknowledged"] + 5 * len(report["errors"]) == 20
    assert all(400 <= e["status"] < 600 and e["body"] for e in report["errors"]), report["errors"]
    assert report["within_budget"], report  # the budget was really the limit ...
    assert report["acked_with_file"] < report["acknowledged"], report  # ... and was hit: not every chunk has a file
    assert report["bad_files"] == [] and report["quarantined"] == 0
    assert report["lost"] == report["text_changed"] == 0 and report["index_misses"] == 0
    assert report["kv_served"] == report["acknowledged"], report["kv_missing"]


def test_kill_9_during_a_200_chunk_remember_then_restart_serves_every_acknowledged_chunk(tmp_path):
    from tests.server import readme_serve_command

    report = faults.kill_during_remember(tmp_path, serve_command=readme_serve_command(), chunks=200,
                                         kill_at=100)
    assert 100 <= report["acknowledged"] < 200, report  # killed mid-way
    assert report["lost"] == 0 and report["text_changed"] == 0 and report["half_written"] == 0, report
    assert report["index_misses"] == 0, report
    # Served from the disk tier (after a restart nothing else holds them): the KV of the stored text.
    assert report["kv_served"] == report["acknowledged"] and report["kv_loaded_tokens"] > 0, report["kv_missing"]
    assert report["bad_files"] == [] and report["quarantined"] == 0 and report["acked_without_file"] == 0
    assert report["leak_lines"] == [] and report["idle"]["num_used_tokens"] == 0
