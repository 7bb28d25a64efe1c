"""The cost curve's plot (benchmarks.cost_curve): cumulative prefilled tokens and TTFT per arm."""

from __future__ import annotations

import json
from pathlib import Path


def replot(json_path: Path) -> Path:
    """Draw a saved run's plot again (``<run>.json`` -> ``<run>.png``)."""
    from benchmarks.cost_curve import Turn

    data = json.loads(Path(json_path).read_text())
    rows = [Turn(**r) for r in data["rows"]]
    once = data["summary"]["one_time_prefill_tokens"]
    path = Path(json_path).with_suffix(".png")
    s = data["summary"]
    plot({"rows": rows, "one_time_prefill_used": once["used"]}, path,
         f"{data['meta']['model']} on {data['meta']['device']}: {s['chunks']} chunks, {s['turns']} turns, "
         f"top-{data['meta'].get('k', 4)}")
    return path


def plot(result: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = {"text": "text memory, plain SGLang", "query": "amem per query", "session": "amem session"}
    for arm, label in labels.items():
        rs = [r for r in result["rows"] if r.arm == arm]
        turns = [r.turn + 1 for r in rs]
        prefill, ttft, a, b = [], [], 0, 0.0
        for r in rs:
            a += r.prefilled_tokens
            b += r.ttft_s
            prefill.append(a)
            ttft.append(b)
        line = axes[0].plot(turns, prefill, marker="o", ms=3, label=label)[0]
        axes[1].plot(turns, ttft, marker="o", ms=3, label=label)
        if arm == "query" and result["one_time_prefill_used"]:  # the break-even picture
            axes[0].plot(turns, [p + result["one_time_prefill_used"] for p in prefill], ls="--",
                         color=line.get_color(), label=f"{label} + prefill of the chunks used")
    axes[0].set(xlabel="turn", ylabel="cumulative prefilled tokens", title="prefill")
    axes[1].set(xlabel="turn", ylabel="cumulative TTFT (s)", title="time to first token")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
