"""Which spliced tokens a blend pass recomputes.

A spliced chunk's KV was computed behind the canonical preamble only, so it is blind to the chunks
placed before it. Recomputing some of its tokens at their true positions (attending, by position,
to everything before them) restores part of that cross-attention:

* ``none`` -- pure splice, nothing recomputed;
* ``sink`` -- the first ``sink_tokens`` tokens of every spliced chunk (EPIC-style);
* ``tail`` -- the last ``sink_tokens`` tokens of every spliced chunk;
* ``edges`` -- both: the first and the last ``sink_tokens`` tokens of every spliced chunk;
* ``all``  -- every spliced token: equal to a full prefill up to numerics (a correctness check of
  the blend pass, and the upper bound of the trade-off).
"""

from __future__ import annotations

import dataclasses

POLICIES = ("none", "sink", "tail", "edges", "all")


@dataclasses.dataclass(frozen=True)
class BlendPolicy:
    policy: str = "none"
    sink_tokens: int = 4

    def validate(self) -> "BlendPolicy":
        if self.policy not in POLICIES:
            raise ValueError(f"blend policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if type(self.sink_tokens) is not int or not 1 <= self.sink_tokens <= 256:
            raise ValueError(f"blend sink_tokens must be an integer in [1, 256], got {self.sink_tokens!r}")
        return self

    def select(self, segments: list[tuple[int, int]]) -> list[int]:
        """Positions to recompute, ascending; ``segments`` are the spliced chunks' (start, length)."""
        if self.policy == "none":
            return []
        k, picked = self.sink_tokens, []
        for start, length in segments:
            end = start + length
            if self.policy == "all":
                picked.extend(range(start, end))
                continue
            chosen = set()
            if self.policy in ("sink", "edges"):
                chosen.update(range(start, min(start + k, end)))
            if self.policy in ("tail", "edges"):
                chosen.update(range(max(end - k, start), end))
            picked.extend(sorted(chosen))
        return picked
