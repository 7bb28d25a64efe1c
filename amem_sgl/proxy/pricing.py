"""Input price tables (USD per million input tokens) and the cost estimate the proxy reports.

Anthropic bills cache reads at ``read`` x the base input price and cache writes at ``write_5m`` or
``write_1h`` x; OpenAI bills cached input at ``cached`` x (no write premium). A table is a JSON object
of this shape (``--prices FILE`` replaces the built-in one); a model not in the table is priced as
the API's ``default`` entry. ``min_cacheable`` (default 1024) is the shortest prompt a provider
caches at all, and OpenAI counts cached tokens in ``cache_increment`` steps.
"""

from __future__ import annotations

import json
from pathlib import Path

PRICES: dict = {
    "anthropic": {
        "default": "claude-sonnet-4-5",
        "models": {
            "claude-sonnet-4-5": {"input": 3.00, "read": 0.1, "write_5m": 1.25, "write_1h": 2.0},
            "claude-opus-4-1": {"input": 15.00, "read": 0.1, "write_5m": 1.25, "write_1h": 2.0},
            "claude-haiku-4-5": {"input": 1.00, "read": 0.1, "write_5m": 1.25, "write_1h": 2.0, "min_cacheable": 2048},
        },
    },
    "openai": {
        "default": "gpt-4.1",
        "models": {
            "gpt-4o": {"input": 2.50, "cached": 0.5, "cache_increment": 128},
            "gpt-4.1": {"input": 2.00, "cached": 0.25, "cache_increment": 128},
            "gpt-5": {"input": 1.25, "cached": 0.1, "cache_increment": 128},
        },
    },
}


def load_prices(path: str | Path | None) -> dict:
    """The built-in table, or the one in ``path`` (checked for the fields the estimate reads)."""
    if path is None:
        return PRICES
    table = json.loads(Path(path).read_text())
    for api, need in (("anthropic", ("input", "read", "write_5m", "write_1h")), ("openai", ("input", "cached"))):
        section = table.get(api)
        if not section or section.get("default") not in section.get("models", {}):
            raise ValueError(f"{path}: '{api}' needs 'models' and a 'default' that names one of them")
        for name, row in section["models"].items():
            missing = [k for k in need if not isinstance(row.get(k), (int, float))]
            if missing:
                raise ValueError(f"{path}: {api} model {name!r} lacks {', '.join(missing)}")
    return table


def price_row(table: dict, api: str, model: str | None) -> tuple[str, dict]:
    section = table[api]
    name = model if model in section["models"] else section["default"]
    return name, section["models"][name]


def input_cost(table: dict, api: str, model: str | None, *, total: int, read: int = 0, written: int = 0,
               ttl: str = "5m") -> float:
    """USD for ``total`` input tokens of which ``read`` came from the cache and ``written`` went into it
    (Anthropic only; OpenAI has no write premium)."""
    _, row = price_row(table, api, model)
    least = row.get("min_cacheable", 1024)
    read = max(0, min(read, total)) if read >= least else 0
    if api == "openai":
        read -= read % row.get("cache_increment", 1)
        units = (total - read) + read * row["cached"]
    else:
        written = max(0, min(written, total - read)) if read + written >= least else 0
        units = (total - read - written) + read * row["read"] + written * row[f"write_{ttl}"]
    return units * row["input"] / 1e6


def estimate(table: dict, api: str, model: str | None, *, total: int, read: int, written: int, ttl: str,
             injected: int, namespace_tokens: int) -> dict:
    """The ``amem.cost`` block: this request as billed (``proxy_usd``), the same request with no
    cache at all (``no_cache_usd``) and with the namespace's whole memory re-sent instead of the
    recalled part, uncached (``full_memory_usd``: what a client without the proxy pays)."""
    name, _ = price_row(table, api, model)
    full_total = max(total - injected, 0) + namespace_tokens
    return {"table": api, "model": name,
            "proxy_usd": input_cost(table, api, model, total=total, read=read, written=written, ttl=ttl),
            "no_cache_usd": input_cost(table, api, model, total=total),
            "full_memory_usd": input_cost(table, api, model, total=full_total)}
