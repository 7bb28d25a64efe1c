"""The recompute / quality trade-off of every blend policy measured so far, in one picture.

Reads every fidelity run in ``--results`` (``*-fidelity-*.json``, written by ``benchmarks.fidelity``;
calibration-split runs are left out) and the latest numeric floor of each question set (main: the
floor a ``--floor`` run measured on its prompts; two-hop: the same, else ``*-numeric-floor.json``),
and plots, per set, policy and run, the share of answers identical to a full re-prefill against the
fraction of chunk compute spent (probe layers included), with each set's floor as a line. Writes
``<date>-<device>-fidelity-tradeoff.{png,md}``.

    python -m benchmarks.fidelity_tradeoff
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from benchmarks import numeric_floor
from benchmarks.fidelity import device_name

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def points(results: Path) -> list[dict]:
    """One point per (run, policy): the policy's overall row."""
    out, seen = [], set()
    for path in sorted(results.glob("*-fidelity-*.json")):
        data = json.loads(path.read_text())
        meta = data.get("meta", {})
        if meta.get("split", "test") != "test":
            continue
        dataset = meta.get("set", "twohop")
        for group, row in data.get("summary", {}).items():
            if not group.endswith("overall") or "recomputed_fraction" not in row:
                continue
            policy = group[: -len("overall")].strip() or data["meta"].get("policy", "none")
            point = (dataset, policy, row["n"], row["identical_answers"], row["recomputed_fraction"])
            if point in seen:  # the same policy measured again on the same questions
                continue
            seen.add(point)
            out.append({"set": dataset, "policy": policy, "n": row["n"], "identical": row["identical_answers"],
                        "first_token": row["first_token_agreement"], "recompute": row["recomputed_fraction"],
                        "run": path.name})
    return out


def default_label(config: Path = ROOT / "configs" / "default.yaml") -> str:
    """The served default's arm label in the harness's spelling: ``exact``, ``guarded:M`` or the
    ``fast`` blend policy (configs/default.yaml, the README's serve command)."""
    from amem_sgl.config import load_config_file

    blend = load_config_file(config).amem.blend
    if blend.fidelity == "exact":
        return "exact"
    if blend.fidelity == "guarded":
        return f"guarded:{blend.guard_margin:g}"
    return blend.to_policy().label


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: --results)")
    args = parser.parse_args(argv)
    out = args.out or args.results
    pts = points(args.results)
    bars = {d: numeric_floor.latest(args.results, d) for d in dict.fromkeys(p["set"] for p in pts)}
    if not pts:
        print(f"no fidelity runs in {args.results}", file=sys.stderr)
        return 1
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {}
    for dataset, n in sorted({(p["set"], p["n"]) for p in pts}):
        group = [p for p in pts if p["n"] == n and p["set"] == dataset]
        dots = ax.scatter([p["recompute"] * 100 for p in group], [p["identical"] for p in group],
                          label=f"{dataset} set, {n} questions", s=28, marker="o" if dataset == "main" else "^")
        colours.setdefault(dataset, dots.get_facecolor()[0])
        for p in group:
            ax.annotate(p["policy"], (p["recompute"] * 100, p["identical"]), fontsize=7,
                        xytext=(4, 2), textcoords="offset points")
    default = default_label()
    marked = [p for p in pts if p["policy"] == default]
    if marked:
        ax.scatter([p["recompute"] * 100 for p in marked], [p["identical"] for p in marked], s=160, marker="*",
                   facecolors="none", edgecolors="black", label=f"the default ({default})", zorder=3)
    for dataset, bar in bars.items():
        if bar is not None:
            ax.axhline(bar, ls="--", color=colours.get(dataset, "grey"),
                       label=f"{dataset} set: numeric floor (fp32 vs bf16) {bar:.3f}")
    ax.set_xscale("symlog", linthresh=1)
    ax.set(xlabel="chunk compute spent (% of a full re-prefill of the chunks)",
           ylabel="answers identical to a full re-prefill", ylim=(0, 1.05), xlim=(0, 130))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("blend policies, guard and exact: compute vs fidelity", fontsize=10)
    fig.tight_layout()
    stem = out / f"{dt.date.today().isoformat()}-{device_name()}-fidelity-tradeoff"
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(stem.with_suffix(".png"), dpi=110)
    plt.close(fig)
    lines = ["# Blend policies: recompute vs fidelity", "", "Command: `python -m benchmarks.fidelity_tradeoff`", "",
             f"![trade-off]({stem.with_suffix('.png').name})", "",
             "Numeric floor: " + ", ".join(f"{d} set {b}" for d, b in bars.items()), "",
             f"The default (configs/default.yaml): {default}", "",
             "| policy | set | questions | identical answers | first token | recompute | run |",
             "|---|---|---|---|---|---|---|"]
    for p in sorted(pts, key=lambda p: (p["set"], p["recompute"], p["policy"])):
        lines.append(f"| {p['policy']} | {p['set']} | {p['n']} | {p['identical']:.3f} | {p['first_token']:.3f} | "
                     f"{p['recompute'] * 100:.1f}% | {p['run']} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
