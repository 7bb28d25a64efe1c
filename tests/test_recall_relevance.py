"""Recall scores feed the residency value policy's relevance term (the service side -- a relevant
chunk outliving a recent irrelevant one -- is tests/test_residency_policy.py and the service tests)."""

from __future__ import annotations

from amem_sgl.config import AmemConfig, MemoryConfig
from amem_sgl.memory.layer import MemoryLayer


class RecordingResidency:
    """Stands in for the residency client's one call under test (the service is tested on its own)."""

    def __init__(self) -> None:
        self.reports: list[dict] = []

    def relevance(self, scores: dict) -> None:
        self.reports.append(dict(scores))


def test_every_recall_reports_its_scores_to_the_value_policy(tmp_path):
    config = AmemConfig(memory=MemoryConfig(dir=str(tmp_path)))
    residency = RecordingResidency()
    layer = MemoryLayer(config, base_url="http://127.0.0.1:9", model_id="m", tokenizer_path="unused",
                        residency=residency)
    layer.store.add("alice", [("a" * 64, "Alice's sister Maria lives in Denver.", [1, 2], {}),
                              ("b" * 64, "The office coffee machine is broken.", [3, 4], {})])
    hits = layer.recall("alice", "Where does Alice's sister live?", 2)
    assert hits and residency.reports, (hits, residency.reports)
    scores = residency.reports[-1]
    assert set(scores) == {c.chunk_id for c, _ in hits}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert scores["a" * 64] > scores.get("b" * 64, 0.0)  # the relevant chunk is reported as more relevant
