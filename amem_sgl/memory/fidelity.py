"""The fidelity knob of memory turns: ``exact | guarded | fast`` (``amem.blend.fidelity``).

* ``fast`` -- the composed prompt's chunk spans are spliced and blended with the server's policy.
* ``guarded`` -- the same, after a probe of the first token on the blended KV; an uncertain turn is
  escalated to ``exact`` before anything is sampled (amem_sgl.memory.guard).
* ``exact`` -- the same prompt prefilled exactly under the namespace's exact salt (kv_hints
  ``exact``): chunk KV is reused only where it is an exact prefix of this prompt, so the answer is a
  full prefill's by construction.

A request picks its level with the ``X-Amem-Fidelity`` header or the body field ``amem_fidelity``
(the OpenAI SDK's ``extra_body``), which the OpenAI memory middleware moves into that header.
"""

from __future__ import annotations

import collections
import threading

from amem_sgl.chunks.hints import build_kv_hints, parse_kv_hints
from amem_sgl.config import FIDELITY_LEVELS, AmemConfig
from amem_sgl.memory.guard import FidelityGuard, GuardDecision

FIDELITY_HEADER = "x-amem-fidelity"
FIDELITY_FIELD = "amem_fidelity"
# The guard's margin for one request (benchmarks sweep and calibrate it without a restart).
MARGIN_HEADER = "x-amem-guard-margin"


def parse_fidelity(value: object) -> str:
    if value not in FIDELITY_LEVELS:
        raise ValueError(f"amem fidelity must be one of {', '.join(FIDELITY_LEVELS)}, got {value!r}")
    return str(value)


def parse_margin(value: object) -> float:
    try:
        margin = float(value)
    except (TypeError, ValueError):
        margin = float("nan")
    if not 0.0 <= margin <= 1.0:
        raise ValueError(f"amem guard margin must be a number in [0, 1], got {value!r}")
    return margin


def requested_fidelity(header: str | None, session) -> str | None:
    """A turn's level: its own ``X-Amem-Fidelity``, else its session's (``session``: the memory
    layer's Session or None), else None -- the server's ``amem.blend.fidelity``."""
    if header is not None:
        return header
    return getattr(session, "fidelity", None)


def exact_hints(namespace: str, kv_hints: dict | None) -> dict:
    """The exact form of a memory turn's kv_hints: same namespace and spans (captured where they
    are computed), nothing spliced or blended, under the namespace's exact salt. A plan without hints
    (the memory layer's exact mode) gets the exact salt alone, so its prefixes -- memory text -- stay
    the namespace's own instead of joining the plain tree every client shares."""
    request = parse_kv_hints(kv_hints) if kv_hints is not None else None
    if request is None:
        return build_kv_hints(namespace, [], exact=True)
    return build_kv_hints(request.namespace, [(s.start, s.end) for s in request.spans],
                          capture=request.capture, exact=True)


class FidelityControl:
    """Applies the knob to a memory plan; keeps each request's guard decision for its usage report."""

    def __init__(self, config: AmemConfig, base_url: str, headers: dict) -> None:
        self.default = config.blend.fidelity
        self.guard = FidelityGuard(base_url, config.blend.guard_margin, headers=headers)
        self._decisions: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._metrics = None

    def level(self, requested: str | None) -> str:
        return parse_fidelity(requested) if requested is not None else self.default

    def apply(self, rid: str, namespace: str, input_ids: list[int], kv_hints: dict | None, requested: str | None,
              margin: str | None = None) -> dict:
        """The kv_hints to send for this turn (blocking when guarded: call it off the event loop)."""
        level = self.level(requested)
        decision: GuardDecision | None = None
        if level == "guarded" and kv_hints is not None:
            decision = self.guard.check(input_ids, kv_hints, None if margin is None else parse_margin(margin))
            self._count(decision)
        escalated = decision is not None and decision.escalated
        report = {"fidelity": level, "escalated": escalated}
        if decision is not None:
            report["guard"] = decision.report()
        with self._lock:
            self._decisions[rid] = report
            while len(self._decisions) > 4096:
                self._decisions.popitem(last=False)
        return exact_hints(namespace, kv_hints) if level == "exact" or escalated or kv_hints is None else kv_hints

    def report(self, rid: str | None) -> dict | None:
        with self._lock:
            return dict(self._decisions[rid]) if rid in self._decisions else None

    def _count(self, decision: GuardDecision) -> None:
        """``amem:guard_probes_total`` / ``amem:guard_escalations_total`` at /metrics (this is the
        HTTP process; SGLang's multiprocess Prometheus registry collects it with the scheduler's)."""
        if self._metrics is None:
            try:
                from prometheus_client import Counter

                self._metrics = (Counter("amem:guard_probes", "Memory turns probed by the fidelity guard."),
                                 Counter("amem:guard_escalations", "Memory turns the guard escalated to exact."))
            except Exception:  # noqa: BLE001 -- metrics are optional (no prometheus_client, duplicate)
                self._metrics = ()
        if self._metrics:
            self._metrics[0].inc()
            if decision.escalated:
                self._metrics[1].inc()

