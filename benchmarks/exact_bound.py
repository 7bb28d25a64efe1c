"""How much can exact reuse save on a recall sequence? ``python -m benchmarks.exact_bound [COST_CURVE_JSON]``

Exact reuse (fidelity ``exact``) serves a chunk from cache only as part of an exact prefix: the
same chunks, in the same order, behind the same system prompt. A turn's chunks can be put in any
order, so the most any turn can reuse is the largest set of its chunks that an earlier prompt held
(in some order) -- an upper bound over every ordering rule. A greedy tree-aware rule (put first the
longest prefix of any earlier prompt whose chunks this turn recalled, then the rest) shows what one
rule reaches. Both are counted in chunk slots over the cost curve's per-query turns (its ``query``
arm: every turn recalls top-k on its own), from a committed cost curve run's ``rows``.

Writes ``benchmarks/results/<date>-exact-reuse-bound.md`` next to nothing else: it reads a result,
runs no model.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT = RESULTS / "2026-12-02-cpu-x86_64-2cores-cost-curve-remember-exact-f16.json"


def bounds(turns: list[list[str]]) -> dict:
    """Chunk slots reusable as exact prefixes: the upper bound and the greedy tree-aware rule's."""
    upper = greedy = 0
    paths: list[list[str]] = []
    for i, chunks in enumerate(turns):
        have = set(chunks)
        upper += max((len(have & set(t)) for t in turns[:i]), default=0)
        best: list[str] = []
        for path in paths:
            n = 0
            while n < len(path) and path[n] in have:
                n += 1
            if n > len(best):
                best = path[:n]
        greedy += len(best)
        paths.append(best + [c for c in chunks if c not in best])
    slots = sum(len(t) for t in turns)
    return {"turns": len(turns), "chunk_slots": slots, "distinct_chunks": len({c for t in turns for c in t}),
            "upper_bound_slots": upper, "greedy_tree_slots": greedy,
            # prefill can shrink at most by the reused chunk slots' share of the prompt's chunk tokens
            "max_prefill_ratio_if_prompts_were_all_chunks": round(slots / max(1, slots - upper), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--arm", default="query")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows = [r for r in json.loads(args.result.read_text())["rows"] if r["arm"] == args.arm]
    if not rows:
        parser.error(f"{args.result} has no rows of arm {args.arm!r}")
    b = bounds([r["chunks"] for r in sorted(rows, key=lambda r: r["turn"])])
    command = "python -m benchmarks.exact_bound " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join([
        "# Exact reuse on the cost curve's recall sequence: an upper bound", "",
        f"Command: `{command.strip()}`  ", f"Input: `{args.result.name}` (arm `{args.arm}`)", "",
        "| turns | chunk slots | distinct chunks | reusable slots, any order (upper bound) | greedy tree-aware order "
        "| most prefill saved, even if prompts were all chunk tokens |", "|---|---|---|---|---|---|",
        f"| {b['turns']} | {b['chunk_slots']} | {b['distinct_chunks']} | {b['upper_bound_slots']} | "
        f"{b['greedy_tree_slots']} | {b['max_prefill_ratio_if_prompts_were_all_chunks']}x |", ""])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{dt.date.today().isoformat()}-exact-reuse-bound.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
