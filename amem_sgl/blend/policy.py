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
* ``cacheblend:R[@L]`` -- CacheBlend as its reference code ranks tokens, with the paper's gradual
  filtering: a first probe runs every spliced token through layers 0 and 1 at its new position and
  stores their fresh KV (layers 0-1 recomputed for every token), ranking by VALUE deviation at layer
  1 (fresh vs spliced value); each further check layer 2..L runs only the candidates kept so far,
  stores their fresh KV there and ranks them by value deviation again. The candidates shrink
  linearly to the budget: ``R*(L-j+1)`` of the spliced tokens are kept after check layer j, so
  ``R`` are recomputed through every layer. ``L`` defaults to 2 (check layers 1 and 2); ``@1`` is
  the reference code's single check at layer 1. The question (the request's tail) is always
  computed: the scheduler's own extend;
* ``query:R[@L]`` -- query-driven selection (ProphetKV, A^3): a probe runs the question (the
  request's non-chunk tail, plus any gap tokens) at its true positions over the spliced context
  through layers ``0..L`` (default: every layer), and the seam sums, at each of those layers, the
  question's softmax attention to every context position over its heads and question tokens; the
  top ``R`` spliced tokens by that mass (summed over layers: their layer average) are recomputed
  through every layer over the mixed cache. The probe's cost is the question's tokens through
  ``L+1`` layers (the extend computes them again afterwards);
* ``edges+cacheblend:K:R[@L]`` / ``edges+query:K:R[@L]`` -- the boundary tokens always, plus the
  top R by the selector;
* ``ape:T:S`` -- APE (arXiv 2502.05431): nothing recomputed; the request's own extend (the question)
  attends to the spliced chunks' keys with temperature ``T`` (logits divided by T inside the chunk
  block) and scaling factor ``S`` on the chunk block's weight (amem_sgl.blend.ape); ``T = S = 1`` is
  plain attention. ``edges+ape:K:T:S``: the boundary tokens recomputed, then the same rule;
* ``all`` -- every spliced token: equal to a full prefill up to numerics (a correctness check of the
  blend pass, and the upper bound of the trade-off).

A new policy is one class: subclass :class:`Strategy`, set ``name`` (and ``takes_tokens`` /
``uses_deviation``), implement :meth:`Strategy.fixed`, decorate it with :func:`register`. Its
spelling (``name``, ``name:K``, ``name:R[@L]``, ``name:K:R[@L]``, ``name[:K]:T:S``), its validation in config files
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
    scales_attention: ClassVar[bool] = False  # spelled with ``:T:S`` (temperature, scale): APE on the extend
    signal: ClassVar[str] = "key"  # what the probe ranks by: "key" | "value" (staged) | "query"
    default_layer: ClassVar[int] = 1  # check_layer when the spelling has no ``@L``

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
        if cls.scales_attention:
            parts += [f"{policy.temperature:g}", f"{policy.scale:g}"]
        text = ":".join(parts)
        return text + (f"@{policy.check_layer}" if cls.uses_deviation and policy.check_layer != cls.default_layer
                       else "")

    @classmethod
    def parse_args(cls, args: list[str], layer: str) -> dict:
        """Keyword arguments of :class:`BlendPolicy` from the text after ``name:`` (split on ``:``)
        and after ``@``. Raises ValueError for a spelling this policy does not take."""
        want = int(cls.takes_tokens) + int(cls.uses_deviation) + 2 * int(cls.scales_attention)
        if len(args) > want or (layer and not cls.uses_deviation) or (cls.scales_attention and len(args) != want):
            raise ValueError(f"blend policy {cls.name!r} is spelled {cls.spelling()}")
        kwargs: dict = {}
        if args and cls.takes_tokens:
            kwargs["sink_tokens"] = int(args.pop(0))
        if args and cls.uses_deviation:
            kwargs["ratio"] = float(args.pop(0))
        if cls.scales_attention:
            kwargs["temperature"], kwargs["scale"] = float(args.pop(0)), float(args.pop(0))
        if layer:
            kwargs["check_layer"] = int(layer)
        elif cls.uses_deviation:
            kwargs["check_layer"] = cls.default_layer
        return kwargs

    @classmethod
    def keeps(cls, budget: int, check_layer: int, free: int) -> tuple[int, ...]:
        """Candidates kept after each check layer (1..check_layer for a staged probe; the last is the
        budget); empty for a single-layer probe. ``free``: spliced tokens not already fixed."""
        return ()

    @classmethod
    def probe_cost(cls, total: int, budget: int, check_layer: int, extended: int, free: int) -> tuple[int, float]:
        """(tokens probed, layers each runs on average): the probe's compute, ``check_layer`` already
        capped at the model's last layer. A key probe runs the spliced tokens through the layers
        below the check layer plus the check layer's projections."""
        return (total, check_layer + 1) if budget else (0, 0)

    @classmethod
    def spelling(cls) -> str:
        return (cls.name + (":K" if cls.takes_tokens else "") + (":R[@L]" if cls.uses_deviation else "")
                + (":T:S" if cls.scales_attention else ""))


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


class _ValueStaged(Strategy):
    """CacheBlend's selector (see the module docstring); subclasses add the fixed tokens."""

    uses_deviation, signal, default_layer = True, "value", 2

    @classmethod
    def keeps(cls, budget, check_layer, free):
        return tuple(min(free, budget * (check_layer - j)) for j in range(check_layer))

    @classmethod
    def probe_cost(cls, total, budget, check_layer, extended, free):
        if not budget:
            return 0, 0
        keeps = cls.keeps(budget, check_layer, free)
        # every spliced token through layers 0-1, then stage j's candidates through layers 0..j+1
        token_layers = 2 * total + sum(keep * (j + 3) for j, keep in enumerate(keeps[:-1]))
        return total, round(token_layers / total, 4)


@register
class CacheBlend(_ValueStaged):
    name = "cacheblend"


@register
class EdgesCacheBlend(_ValueStaged):
    name, takes_tokens = "edges+cacheblend", True
    fixed = Edges.fixed


class _QueryDriven(Strategy):
    """Query-driven selection (see the module docstring); check_layer: the last layer the question
    attends through (64: every layer of the model, capped by the splice plan)."""

    uses_deviation, signal, default_layer = True, "query", 64

    @classmethod
    def probe_cost(cls, total, budget, check_layer, extended, free):
        return (extended, check_layer + 1) if budget else (0, 0)


@register
class Query(_QueryDriven):
    name = "query"


@register
class EdgesQuery(_QueryDriven):
    name, takes_tokens = "edges+query", True
    fixed = Edges.fixed


@register
class Ape(Strategy):
    name, scales_attention = "ape", True


@register
class EdgesApe(Strategy):
    name, takes_tokens, scales_attention = "edges+ape", True, True
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
    check_layer: int = 1  # deviation policies: the (last) check layer of the probe (>= 1); see each strategy
    temperature: float = 1.0  # APE policies: T, chunk-block logits divided by it (> 0)
    scale: float = 1.0  # APE policies: S, the chunk block's weight multiplied by it (> 0)

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
        for field in ("temperature", "scale"):
            value = getattr(self, field)
            if type(value) not in (int, float) or not 0.0 < value <= 10.0:
                raise ValueError(f"blend {field} must be a number in (0, 10], got {value!r}")
        return self

    @property
    def scales_attention(self) -> bool:
        """APE: the request's extend attends to its spliced chunks with (temperature, scale)."""
        return self.strategy.scales_attention

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
        ``sink+hkvd:K:R[@L]``, ``edges+hkvd:K:R[@L]``, ``cacheblend:R[@L]``, ``query:R[@L]``,
        ``ape:T:S``, ``edges+ape:K:T:S`` -- or any registered strategy's spelling."""
        if not isinstance(text, str):
            raise ValueError(f"blend policy must be text like {spellings()}, got {text!r}")
        body, _, layer = text.strip().partition("@")
        name, *args = body.split(":")
        strategy = cls(name).strategy
        try:
            return cls(name, **strategy.parse_args(args, layer)).validate()
        except ValueError as err:
            raise ValueError(f"bad blend policy {text!r}: {err}") from None

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

    def plan_check_layer(self, num_layers: int) -> int:
        """The check layer a plan uses on a model of ``num_layers`` layers (at most its last)."""
        return max(min(self.check_layer, num_layers - 1), 0)

    def plan_fields(self, segments: list[tuple[int, int]], num_layers: int) -> dict:
        """The probe's extra :class:`~amem_sgl.blend.context.BlendPlan` fields (signal, keeps)."""
        budget = self.deviation_budget(segments) if num_layers > 1 else 0
        free = sum(length for _, length in segments) - len(self.select(segments))
        fields = {"signal": self.strategy.signal,
                  "keeps": self.strategy.keeps(budget, self.plan_check_layer(num_layers), free) if budget else ()}
        if self.scales_attention:  # APE: the extend's (temperature, scale); amem_sgl.blend.ape
            fields["ape"] = (float(self.temperature), float(self.scale))
        return fields

    def probe_cost(self, segments: list[tuple[int, int]], num_layers: int, extended: int = 0) -> tuple[int, float]:
        """(tokens probed, layers each on average) of this policy's probe pass(es); ``extended``:
        the tokens after the spliced region (the question a query probe runs)."""
        budget = self.deviation_budget(segments) if num_layers > 1 else 0
        total = sum(length for _, length in segments)
        return self.strategy.probe_cost(total, budget, self.plan_check_layer(num_layers), extended,
                                        total - len(self.select(segments)))

    def compute_fraction(self, segments: list[tuple[int, int]], num_layers: int, extended: int = 0) -> float:
        """Recompute cost as a fraction of prefilling the spliced tokens through every layer."""
        total = sum(length for _, length in segments)
        if total == 0:
            return 0.0
        probed, layers = self.probe_cost(segments, num_layers, extended)
        return (self.recomputed_tokens(segments) * num_layers + probed * layers) / (total * num_layers)


POLICIES = policies()  # the built-in names (kept for callers that list them)
