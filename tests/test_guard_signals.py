"""benchmarks.guard_signals on fidelity rows built here (its arithmetic, not a model)."""

from __future__ import annotations

import json
import math
import random

from benchmarks.guard_signals import analyse, auroc, escalation_needed


def test_auroc_is_one_for_a_perfect_ranking_a_half_for_ties_and_nan_without_both_kinds():
    assert auroc([0.9, 0.8, 0.1, 0.2], [False, False, True, True]) == 1.0
    assert auroc([0.1, 0.2, 0.9, 0.8], [False, False, True, True]) == 0.0
    assert auroc([0.5] * 4, [False, True, False, True]) == 0.5
    assert math.isnan(auroc([0.1, 0.2], [True, True]))


def test_auroc_matches_a_brute_force_count_on_random_scores():
    rng = random.Random()
    risk = [rng.random() for _ in range(40)]
    same = [rng.random() < 0.5 for _ in range(40)]
    same[0], same[1] = True, False
    pairs = [(b, g) for b, sb in zip(risk, same) if not sb for g, sg in zip(risk, same) if sg]
    assert math.isclose(auroc(risk, same), sum(b > g for b, g in pairs) / len(pairs))


def test_escalation_follows_the_risk_order_until_the_floor():
    # 2 of 4 identical; the riskiest is a diverging one, then an identical one, then the other diverging.
    risk, same = [0.9, 0.5, 0.4, 0.1], [False, True, False, True]
    assert escalation_needed(risk, same, 0.5) == 0.0
    assert escalation_needed(risk, same, 0.75) == 0.25
    assert escalation_needed(risk, same, 1.0) == 0.75  # the identical one in between costs an escalation
    assert escalation_needed([0.1, 0.9], [False, True], 1.0) == 1.0


def test_analyse_reads_a_fidelity_result_and_skips_exact_and_guarded_arms(tmp_path):
    rows = []
    for i in range(6):
        same = i % 2 == 0
        for policy in ("edges:8", "exact", "guarded:0.2"):
            rows.append({"policy": policy, "qid": f"q{i}", "identical": same, "floor_identical": True,
                         "reuse_margin": 0.9 if same else 0.1, "first_token_kl": "None",
                         "spliced_tokens": "100", "recomputed_chunk_tokens": str(10 * i)})
    path = tmp_path / "run-fidelity.json"
    path.write_text(json.dumps({"rows": rows}))
    (report,) = analyse(path)
    assert report["policy"] == "edges:8" and report["n"] == 6 and report["identical"] == 0.5
    assert report["floor"] == 1.0
    assert report["margin"] == {"auroc": 1.0, "escalated_to_floor": 0.5}  # low margin = every diverging one
    assert report["first_token_kl"] is None  # absent in these rows
    assert report["unrecomputed"]["auroc"] < 0.5  # here the less recomputed, the more often identical
