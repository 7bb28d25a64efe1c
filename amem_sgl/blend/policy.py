"""Which spliced tokens a blend pass recomputes: small strategy classes in one registry.

A spliced chunk's KV was computed behind the canonical preamble only, so it is blind to the chunks
placed before it. Recomputing some of its tokens at their true positions (attending, by position,
to everything before them) restores part of that cross-attention. Registered strategies:

* ``none`` -- pure splice, nothing recomputed;
* ``sink:K`` -- the first K tokens of every spliced chunk (EPIC-style);
* ``tail:K`` -- the last K tokens of every spliced chunk;
* ``edges:K`` -- both: the first and the last K tokens of every spliced chunk;
* ``hkvd:R[@L]`` -- CacheBlend's high-KV-deviation tokens: a probe pass runs every spliced token
  through layers ``0..L-1`` at its new position, then at layer ``L`` compares each token's fresh key
  with its spliced key (sum of squared differences) and recomputes the top ``R`` of all spliced
  tokens of the request through every layer. The budget is shared by the request's chunks, so a
  chunk that deviates more gets more of it (a per-chunk adaptive budget);
* ``sink+hkvd:K:R[@L]`` / ``edges+hkvd:K:R[@L]`` -- the boundary tokens always, plus the top R by
  deviation;
* ``all`` -- every spliced token: equal to a full prefill up to numerics (a correctness check of the
  blend pass, and the upper bound of the trade-off).

A new policy is one class: subclass :class:`Strategy`, set ``name`` (and ``takes_tokens`` /
``uses_deviation``), implement :meth:`Strategy.fixed`, decorate it with :func:`register`. Its
spelling (``name``, ``name:K``, ``name:R[@L]``, ``name:K:R[@L]``), its validation in config files
(``amem.blend``) and per-request payloads (``amem.chunks`` ``blend``), its deviation budget and its
reported cost then follow from the registry.

:class:`BlendPolicy` stays the value passed around (config, payloads, clients): a frozen record of
the policy name and its parameters; every behaviour is looked up in the registry.

The probe pass is compute too: ``check_layer + 1`` layers of every spliced token (the probe's
layers plus the check layer's key projection) are counted in :meth:`BlendPolicy.compute_fraction`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Iterable

REGISTRY: dict[str, type["Strategy"]] = {}


def register(cls: type["Strategy"]) -> type["Strategy"]:
    """Class decorator: make ``cls`` the strategy of ``cls.name``."""
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"blend strategy name {cls.name!r} is empty or already registered")
    REGISTRY[cls.name] = cls
    return cls


class Strategy:
    """How one named policy picks tokens. Stateless; parameters come from the :class:`BlendPolicy`."""

    name: ClassVar[str] = ""
    takes_tokens: ClassVar[bool] = False  # spelled with ``:K`` (BlendPolicy.sink_tokens)
    uses_deviation: ClassVar[bool] = False  # spelled with ``:R[@L]`` (ratio, check_layer): a probe pass

    @classmethod
    def fixed(cls, start: int, end: int, k: int) -> Iterable[int]:
        """Positions of the spliced chunk [start, end) recomputed regardless of deviation."""
        return ()

    @classmethod
    def label(cls, policy: "BlendPolicy") -> str:
        parts = [cls.name]
        if cls.takes_tokens:
            parts.append(str(policy.sink_tokens))
        if cls.uses_deviation:
            parts.append(f"{policy.ratio:g}")
        text = ":".join(parts)
        return text + (f"@{policy.check_layer}" if cls.uses_deviation and policy.check_layer != 1 else "")

    @classmethod
    def parse_args(cls, args: list[str], layer: str) -> dict:
        """Keyword arguments of :class:`BlendPolicy` from the text after ``name:`` (split on ``:``)
        and after ``@``. Raises ValueError for a spelling this policy does not take."""
        want = int(cls.takes_tokens) + int(cls.uses_deviation)
        if len(args) > want or (layer and not cls.uses_deviation):
            raise ValueError(f"blend policy {cls.name!r} is spelled {cls.spelling()}")
        kwargs: dict = {}
        if args and cls.takes_tokens:
            kwargs["sink_tokens"] = int(args.pop(0))
        if args and cls.uses_deviation:
            kwargs["ratio"] = float(args.pop(0))
        if layer:
            kwargs["check_layer"] = int(layer)
        return kwargs

    @classmethod
    def spelling(cls) -> str:
        return cls.name + (":K" if cls.takes_tokens else "") + (":R[@L]" if cls.uses_deviation else "")


@register
class NoBlend(Strategy):
    name = "none"


@register
class Sink(Strategy):
    name, takes_tokens = "sink", True

    @classmethod
    def fixed(cls, start, end, k):
        return range(start, min(start + k, end))


@register
class Tail(Strategy):
    name, takes_tokens = "tail", True

    @classmethod
    def fixed(cls, start, end, k):
        return range(max(end - k, start), end)


@register
class Edges(Strategy):
    name, takes_tokens = "edges", True

    @classmethod
    def fixed(cls, start, end, k):
        return sorted({*Sink.fixed(start, end, k), *Tail.fixed(start, end, k)})


@register
class Hkvd(Strategy):
    name, uses_deviation = "hkvd", True


@register
class SinkHkvd(Strategy):
    name, takes_tokens, uses_deviation = "sink+hkvd", True, True
    fixed = Sink.fixed


@register
class EdgesHkvd(Strategy):
    name, takes_tokens, uses_deviation = "edges+hkvd", True, True
    fixed = Edges.fixed


@register
class All(Strategy):
    name = "all"

    @classmethod
    def fixed(cls, start, end, k):
        return range(start, end)


def policies() -> tuple[str, ...]:
    """The registered policy names, in registration order."""
    return tuple(REGISTRY)


def spellings() -> str:
    """Every registered policy's spelling, for help texts and error messages."""
    return ", ".join(cls.spelling() for cls in REGISTRY.values())


@dataclasses.dataclass(frozen=True)
class BlendPolicy:
    policy: str = "none"
    sink_tokens: int = 4  # K of the boundary policies
    ratio: float = 0.15  # deviation policies: fraction of the request's spliced tokens picked by deviation
    check_layer: int = 1  # deviation policies: layer whose key deviation ranks the tokens (>= 1)

    @property
    def strategy(self) -> type[Strategy]:
        try:
            return REGISTRY[self.policy]
        except (KeyError, TypeError):
            raise ValueError(f"blend policy must be one of {', '.join(REGISTRY)}, got {self.policy!r}") from None

    def validate(self) -> "BlendPolicy":
        self.strategy  # noqa: B018 -- raises for an unregistered name
        if type(self.sink_tokens) is not int or not 1 <= self.sink_tokens <= 256:
            raise ValueError(f"blend sink_tokens must be an integer in [1, 256], got {self.sink_tokens!r}")
        if type(self.ratio) not in (int, float) or not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"blend ratio must be a number in [0, 1], got {self.ratio!r}")
        if type(self.check_layer) is not int or not 1 <= self.check_layer <= 64:
            raise ValueError(f"blend check_layer must be an integer in [1, 64], got {self.check_layer!r}")
        return self

    @property
    def uses_deviation(self) -> bool:
        return self.strategy.uses_deviation

    @property
    def label(self) -> str:
        """Short name used in reports: ``sink:16``, ``hkvd:0.15``, ``sink+hkvd:4:0.1``."""
        return self.strategy.label(self)

    @classmethod
    def parse(cls, text: str) -> "BlendPolicy":
        """``none``, ``all``, ``sink:K``, ``tail:K``, ``edges:K``, ``hkvd:R[@L]``,
        ``sink+hkvd:K:R[@L]``, ``edges+hkvd:K:R[@L]`` -- or any registered strategy's spelling."""
        if not isinstance(text, str):
            raise ValueError(f"blend policy must be text like {spellings()}, got {text!r}")
        body, _, layer = text.strip().partition("@")
        name, *args = body.split(":")
        strategy = cls(name).strategy
        try:
            kwargs = strategy.parse_args(args, layer)
        except ValueError as err:
            raise ValueError(f"bad blend policy {text!r}: {err}") from None
        return cls(name, **kwargs).validate()

    def select(self, segments: list[tuple[int, int]]) -> list[int]:
        """Positions recomputed regardless of deviation, ascending; ``segments`` are the spliced
        chunks' (start, length)."""
        fixed, k = self.strategy.fixed, self.sink_tokens
        return [p for start, length in segments for p in sorted(set(fixed(start, start + length, k)))]

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


POLICIES = policies()  # the built-in names (kept for callers that list them)
