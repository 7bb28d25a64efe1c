"""amem's counters in SGLang's Prometheus metrics (``--enable-metrics``, served at ``/metrics``).

SGLang runs prometheus_client in multiprocess mode (its launcher sets the shared directory before
the scheduler starts), so counters created in the scheduler process show up at the HTTP server's
``/metrics`` next to SGLang's own ``sglang:*`` series.
"""

from __future__ import annotations

# usage key in the per-request report -> (metric name, help)
COUNTERS = {
    "spliced_tokens": ("amem:spliced_tokens", "Prompt tokens whose KV was spliced from chunk nodes."),
    "recomputed_tokens": ("amem:recomputed_tokens", "Spliced tokens recomputed by a blend pass."),
    "probed_tokens": ("amem:probed_tokens", "Spliced tokens run through a deviation probe (early layers)."),
    "extended_tokens": ("amem:extended_tokens", "Prompt tokens after the spliced region, prefilled normally."),
}


class AmemMetrics:
    def __init__(self, model_name: str) -> None:
        from prometheus_client import Counter

        self.labels = {"model_name": model_name}
        self.counters = {key: Counter(name, doc, labelnames=list(self.labels)) for key, (name, doc) in COUNTERS.items()}
        self.requests = Counter("amem:spliced_requests", "Requests served with spliced chunk KV.",
                                labelnames=[*self.labels, "blend_policy"])

    def record(self, usage: dict) -> None:
        for key, counter in self.counters.items():
            counter.labels(**self.labels).inc(int(usage.get(key, 0)))
        self.requests.labels(**self.labels, blend_policy=str(usage.get("blend_policy", "none"))).inc()


def merge_usage(reports: list) -> dict | None:
    """One usage record from the per-request reports of a (possibly n>1) OpenAI response: token
    counts summed over them (what the server did, as the /metrics counters count it)."""
    reports = [r for rep in reports if rep for r in (rep if isinstance(rep, list) else [rep]) if isinstance(r, dict)]
    if not reports:
        return None
    # n > 1: one sub-request spliced (the prefix request); the copies' records say "none".
    policies = [r.get("blend_policy") for r in reports]
    policy = next((p for p in policies if p not in (None, "none")), policies[0])
    merged: dict = {"namespace": reports[0].get("namespace"), "blend_policy": policy}
    for key in ("spliced_tokens", "recomputed_tokens", "probed_tokens", "extended_tokens", "loaded_tokens",
                "gap_tokens", "in_place_tokens"):
        merged[key] = sum(int(r.get(key, 0)) for r in reports)
    known = [int(r["computed_chunk_tokens"]) for r in reports if "computed_chunk_tokens" in r]
    if known:  # absent: the server did not say (reused_kv then stays False)
        merged["computed_chunk_tokens"] = sum(known)
    return merged
