"""Which spliced tokens a blend pass recomputes.

A spliced chunk's KV was computed behind the canonical preamble only, so it is blind to the chunks
placed before it. Recomputing some of its tokens at their true positions (attending, by position,
to everything before them) restores part of that cross-attention:

* ``none`` -- pure splice, nothing recomputed;
* ``sink`` -- the first ``sink_tokens`` tokens of every spliced chunk (EPIC-style);
* ``tail`` -- the last ``sink_tokens`` tokens of every spliced chunk;
* ``edges`` -- both: the first and the last ``sink_tokens`` tokens of every spliced chunk;
* ``hkvd`` -- CacheBlend's high-KV-deviation tokens: a probe pass runs every spliced token through
  layers ``0..check_layer-1`` at its new position, then at ``check_layer`` compares each token's
  fresh key with its spliced key (sum of squared differences) and recomputes the top ``ratio`` of
  all spliced tokens of the request through every layer. The budget is shared by the request's
  chunks, so a chunk that deviates more gets more of it (a per-chunk adaptive budget);
* ``sink+hkvd`` / ``edges+hkvd`` -- the boundary tokens always, plus the top ``ratio`` by deviation;
* ``all``  -- every spliced token: equal to a full prefill up to numerics (a correctness check of
  the blend pass, and the upper bound of the trade-off).

The probe pass is compute too: ``check_layer + 1`` layers of every spliced token (the probe's
layers plus the check layer's key projection) are counted in :meth:`BlendPolicy.compute_fraction`.
"""

from __future__ import annotations

import dataclasses

POLICIES = ("none", "sink", "tail", "edges", "hkvd", "sink+hkvd", "edges+hkvd", "all")


@dataclasses.dataclass(frozen=True)
class BlendPolicy:
    policy: str = "none"
    sink_tokens: int = 4
    ratio: float = 0.15  # hkvd: fraction of the request's spliced tokens picked by deviation
    check_layer: int = 1  # hkvd: layer whose key deviation ranks the tokens (>= 1)

    def validate(self) -> "BlendPolicy":
        if self.policy not in POLICIES:
            raise ValueError(f"blend policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if type(self.sink_tokens) is not int or not 1 <= self.sink_tokens <= 256:
            raise ValueError(f"blend sink_tokens must be an integer in [1, 256], got {self.sink_tokens!r}")
        if type(self.ratio) not in (int, float) or not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"blend ratio must be a number in [0, 1], got {self.ratio!r}")
        if type(self.check_layer) is not int or not 1 <= self.check_layer <= 64:
            raise ValueError(f"blend check_layer must be an integer in [1, 64], got {self.check_layer!r}")
        return self

    @property
    def uses_deviation(self) -> bool:
        return self.policy.endswith("hkvd")

    @property
    def label(self) -> str:
        """Short name used in reports: ``sink:16``, ``hkvd:0.15``, ``sink+hkvd:4:0.1``."""
        if self.policy in ("none", "all"):
            return self.policy
        if self.policy == "hkvd":
            return f"hkvd:{self.ratio:g}" + (f"@{self.check_layer}" if self.check_layer != 1 else "")
        if self.uses_deviation:
            return (f"{self.policy}:{self.sink_tokens}:{self.ratio:g}"
                    + (f"@{self.check_layer}" if self.check_layer != 1 else ""))
        return f"{self.policy}:{self.sink_tokens}"

    @classmethod
    def parse(cls, text: str) -> "BlendPolicy":
        """``none``, ``all``, ``sink:K``, ``tail:K``, ``edges:K``, ``hkvd:R[@L]``,
        ``sink+hkvd:K:R[@L]``, ``edges+hkvd:K:R[@L]``."""
        text, _, layer = text.partition("@")
        name, *args = text.split(":")
        kwargs: dict = {"policy": name}
        if layer:
            kwargs["check_layer"] = int(layer)
        if name == "hkvd" and args:
            kwargs["ratio"] = float(args[0])
        elif args:
            kwargs["sink_tokens"] = int(args[0])
            if len(args) > 1:
                kwargs["ratio"] = float(args[1])
        return cls(**kwargs).validate()

    def select(self, segments: list[tuple[int, int]]) -> list[int]:
        """Positions recomputed regardless of deviation, ascending; ``segments`` are the spliced
        chunks' (start, length)."""
        if self.policy in ("none", "hkvd"):
            return []
        k, picked = self.sink_tokens, []
        for start, length in segments:
            end = start + length
            if self.policy == "all":
                picked.extend(range(start, end))
                continue
            chosen = set()
            if self.policy in ("sink", "edges", "sink+hkvd", "edges+hkvd"):
                chosen.update(range(start, min(start + k, end)))
            if self.policy in ("tail", "edges", "edges+hkvd"):
                chosen.update(range(max(end - k, start), end))
            picked.extend(sorted(chosen))
        return picked

    def deviation_budget(self, segments: list[tuple[int, int]]) -> int:
        """How many more tokens the probe pass picks by key deviation (beyond :meth:`select`)."""
        if not self.uses_deviation:
            return 0
        total = sum(length for _, length in segments)
        return min(round(self.ratio * total), total - len(self.select(segments)))

    def recomputed_tokens(self, segments: list[tuple[int, int]]) -> int:
        return len(self.select(segments)) + self.deviation_budget(segments)

    def compute_fraction(self, segments: list[tuple[int, int]], num_layers: int) -> float:
        """Recompute cost as a fraction of prefilling the spliced tokens through every layer."""
        total = sum(length for _, length in segments)
        if total == 0:
            return 0.0
        probe = total * min(self.check_layer + 1, num_layers) if self.uses_deviation else 0
        return (self.recomputed_tokens(segments) * num_layers + probe) / (total * num_layers)
