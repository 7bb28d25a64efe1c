"""Where a memory turn's time to first token goes, per benchmark arm: the mean of each phase of
``usage.amem.timings`` (amem_sgl.memory.timings) over an arm's turns, beside the TTFT the client
measured. ``out_s`` is the client's TTFT minus what the server measured (``ingress_s + total_s +
output_s``): the HTTP way in before the middleware and the SSE way out."""

from __future__ import annotations

from amem_sgl.memory.timings import PHASES


def breakdown(rows, arms: tuple[str, ...]) -> dict[str, dict]:
    """{arm: {"turns", "timed_turns", "ttft_s", <phase>: mean seconds, "out_s"}}; ``rows`` carry
    ``arm``, ``ttft_s`` and ``timings`` (empty where the server reported none: plain SGLang)."""
    out = {}
    for arm in arms:
        rs = [r for r in rows if r.arm == arm]
        timed = [r for r in rs if r.timings]
        entry = {"turns": len(rs), "timed_turns": len(timed),
                 "ttft_s": round(sum(r.ttft_s for r in rs) / max(len(rs), 1), 4)}
        for phase in PHASES:
            values = [r.timings[phase] for r in timed if phase in r.timings]
            if values:
                entry[phase] = round(sum(values) / len(timed), 4)
        if "total_s" in entry:
            seen = lambda t: sum(t.get(k, 0.0) for k in ("ingress_s", "total_s", "output_s"))  # noqa: E731
            entry["out_s"] = round(sum(r.ttft_s - seen(r.timings) for r in timed) / len(timed), 4)
        out[arm] = entry
    return out


def table(by_arm: dict[str, dict]) -> list[str]:
    """The breakdown as a markdown table: one row per phase, one column per arm (ms)."""
    arms = list(by_arm)
    phases = [p for p in (*PHASES, "out_s") if any(p in by_arm[a] for a in arms)]
    lines = ["| phase (mean ms) | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for phase in ("ttft_s", *phases):
        cells = [f"{1000 * by_arm[a][phase]:.1f}" if phase in by_arm[a] else "" for a in arms]
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    lines.append("| timed turns | " + " | ".join(f"{by_arm[a]['timed_turns']}/{by_arm[a]['turns']}" for a in arms) + " |")
    return lines
