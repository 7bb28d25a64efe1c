"""benchmarks.exact_bound: the exact-reuse bound over a recall sequence (pure counting, no model)."""

import json

from benchmarks.exact_bound import bounds, main


def test_bounds_count_reusable_prefix_slots():
    turns = [["a", "b", "c"], ["c", "b", "d"], ["a", "d", "e"], ["x", "y", "z"]]
    b = bounds(turns)
    # any order: turn 2 shares {b, c} with turn 1; turn 3 shares {a} with 1 or {d} with 2; turn 4 nothing
    assert b["upper_bound_slots"] == 3
    # greedy: turn 2 finds no earlier prompt starting with one of its chunks except none ("a" first) -> 0;
    # turn 3 starts with turn 1's "a" -> 1
    assert b["greedy_tree_slots"] == 1
    assert b["chunk_slots"] == 12 and b["distinct_chunks"] == 8
    assert b["max_prefill_ratio_if_prompts_were_all_chunks"] == round(12 / 9, 3)


def test_main_reads_a_cost_curve_result(tmp_path):
    rows = [{"arm": "query", "turn": t, "chunks": c} for t, c in enumerate([["a", "b"], ["b", "a"], ["a", "c"]])]
    rows += [{"arm": "text", "turn": 0, "chunks": ["q"]}]
    src = tmp_path / "cc.json"
    src.write_text(json.dumps({"rows": rows}))
    assert main([str(src), "--out", str(tmp_path)]) == 0
    (md,) = tmp_path.glob("*-exact-reuse-bound.md")
    assert "| 3 | 6 | 3 | 3 | 3 |" in md.read_text()
