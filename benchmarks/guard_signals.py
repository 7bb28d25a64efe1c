"""How well could any signal the fidelity guard can see pick the memory turns that diverge?

Reads fidelity results (``benchmarks/results/*fidelity*.json``, no model) and, per blend arm, ranks
its questions by each candidate signal: the more a signal says "risky", the earlier a guard would
escalate that question. Reported per signal: AUROC for "this answer is not identical to the full
prefill's" (0.5: no better than chance; 1.0: every diverging answer ranked above every identical one),
and the share of questions a guard escalating in that order must escalate before the arm's identical
answers reach the run's numeric floor (an escalated question is served exactly: identical).

Signals:

* ``margin`` -- the reuse arm's first-token probability margin p1 - p2, low = risky (what
  ``fidelity: guarded`` uses; known before anything is sampled);
* ``unrecomputed`` -- spliced chunk tokens the blend pass did not recompute (known at admission);
* ``first_token_kl`` -- KL(full || reuse) of the first token: an *oracle* (it needs the full
  prefill the guard exists to avoid), the best any first-token signal could do.

    python -m benchmarks.guard_signals                       # every committed fidelity run
    python -m benchmarks.guard_signals benchmarks/results/X.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"

SIGNALS = {  # name -> risk score of a result row (higher = more likely to diverge), None if absent
    "margin": lambda r: None if r.get("reuse_margin") in (None, "", "None") else -float(r["reuse_margin"]),
    "unrecomputed": lambda r: int(r["spliced_tokens"]) - int(r["recomputed_chunk_tokens"])
    if r.get("spliced_tokens") not in (None, "") else None,
    "first_token_kl": lambda r: None if r.get("first_token_kl") in (None, "", "None") else float(r["first_token_kl"]),
}


def truth(value) -> bool:
    return value is True or value == "True"


def auroc(risk: list[float], identical: list[bool]) -> float:
    """P(a diverging answer's risk > an identical one's), ties half; NaN without both kinds."""
    bad = [s for s, same in zip(risk, identical) if not same]
    good = [s for s, same in zip(risk, identical) if same]
    if not bad or not good:
        return math.nan
    wins = sum((b > g) + 0.5 * (b == g) for b in bad for g in good)
    return wins / (len(bad) * len(good))


def escalation_needed(risk: list[float], identical: list[bool], floor: float) -> float:
    """Smallest share of questions a guard escalating in descending risk must escalate so that the
    identical share reaches ``floor`` (1.0 when only escalating all of them does)."""
    n = len(risk)
    if n == 0:
        return math.nan
    same = sum(identical)
    order = sorted(range(n), key=lambda i: -risk[i])
    for escalated in range(n + 1):
        if same / n >= floor:
            return escalated / n
        if escalated < n:
            same += not identical[order[escalated]]
    return 1.0


def analyse(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    rows = [r for r in data.get("rows") or [] if isinstance(r, dict) and "policy" in r and "qid" in r]
    floor_rows = [r for r in rows if r.get("floor_identical") not in (None, "", "None")]
    by_qid = {r["qid"]: truth(r["floor_identical"]) for r in floor_rows}
    floor = sum(by_qid.values()) / len(by_qid) if by_qid else math.nan
    out = []
    for policy in dict.fromkeys(r["policy"] for r in rows):
        mine = [r for r in rows if r["policy"] == policy]
        if policy == "exact" or policy.startswith("guarded") or not mine:
            continue
        report = {"file": path.name, "policy": policy, "n": len(mine), "floor": floor,
                  "identical": sum(truth(r["identical"]) for r in mine) / len(mine)}
        for name, score in SIGNALS.items():
            scored = [(score(r), truth(r["identical"])) for r in mine]
            scored = [(s, same) for s, same in scored if s is not None]
            if len(scored) < len(mine):
                report[name] = None
                continue
            risk, same = [s for s, _ in scored], [x for _, x in scored]
            report[name] = {"auroc": auroc(risk, same),
                            "escalated_to_floor": escalation_needed(risk, same, floor) if floor == floor else None}
        out.append(report)
    return out


def render(reports: list[dict]) -> str:
    lines = ["| run | arm | n | identical | floor | " + " | ".join(f"{s}: AUROC / escalated to floor" for s in SIGNALS) + " |",
             "|---" * (5 + len(SIGNALS)) + "|"]
    for r in reports:
        cells = []
        for name in SIGNALS:
            got = r[name]
            cells.append("—" if got is None else f"{got['auroc']:.2f} / "
                         + ("—" if got["escalated_to_floor"] is None else f"{got['escalated_to_floor']:.0%}"))
        lines.append(f"| {r['file'].removesuffix('.json')} | {r['policy']} | {r['n']} | {r['identical']:.3f} | "
                     f"{r['floor']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--save", action="store_true", help="also write benchmarks/results/<date>-guard-signals.md")
    args = parser.parse_args(argv)
    files = args.files or sorted(p for p in RESULTS.glob("*fidelity*.json") if "tradeoff" not in p.name)
    reports = [r for f in files for r in analyse(f) if any(r[name] is not None for name in SIGNALS)]
    text = render(reports)
    print(text)
    if args.save:
        import datetime as dt

        out = RESULTS / f"{dt.date.today().isoformat()}-guard-signals.md"
        command = "python -m benchmarks.guard_signals " + " ".join(argv if argv is not None else sys.argv[1:])
        out.write_text(f"# Guard signals: which diverging answers could a guard catch?\n\nCommand: `{command}`\n\n"
                       + (__doc__ or "").split("\n\n    python")[0] + "\n\n" + text + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
