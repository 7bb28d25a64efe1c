"""The fidelity guard: a memory turn whose first token is uncertain on reused KV is escalated.

Blending (spliced chunk KV with a few tokens recomputed) changes some answers relative to a full
prefill of the same prompt. Before anything is sampled for the client, a *guarded* turn sends one
probe through this server's own ``/generate``: the composed prompt with its chunk spans (spliced and
blended as usual), one greedy token, and the top-2 log-probabilities of that first token. When the
probability margin ``p1 - p2`` is below ``amem.blend.guard_margin`` (calibrated on the fidelity
harness's calibration split), the turn is *escalated*: it is served as an exact turn -- the same
token ids prefilled in full, under the namespace's exact salt, so its answer is the full prefill's
by construction (amem_sgl.chunks.hints ``exact``). A confident turn continues on the blended prefix
the probe left in the tree (its prompt is then a prefix hit: the probe's cost is one token's decode
and a scheduling round).

Measured before this existed (issue notes, transformers oracle on SmolLM2-135M): the first-token
margin is a weak signal on this model -- most divergence comes after the first token -- so a
threshold that catches most divergent answers escalates most turns. The fidelity harness reports how
often the guard fires and what it costs.
"""

from __future__ import annotations

import dataclasses
import math
import time

import requests


@dataclasses.dataclass(frozen=True)
class GuardDecision:
    escalated: bool
    margin: float | None  # p1 - p2 of the probe's first token (None: the probe gave no answer)
    probe_s: float
    reason: str
    meta: dict | None = dataclasses.field(default=None, repr=False, compare=False)  # the probe's meta_info

    def report(self) -> dict:
        return {"escalated": self.escalated, "margin": None if self.margin is None else round(self.margin, 4),
                "probe_s": round(self.probe_s, 4), "reason": self.reason}


def first_token_margin(meta_info: dict) -> float | None:
    """``p1 - p2`` of the first generated token from SGLang's ``output_top_logprobs`` (entries are
    ``[logprob, token_id, text]``); None when the response carries no top log-probabilities."""
    tops = meta_info.get("output_top_logprobs") or []
    if not tops or not tops[0]:
        return None
    probs = sorted((math.exp(float(entry[0])) for entry in tops[0] if entry and entry[0] is not None),
                   reverse=True)
    if not probs:
        return None
    return probs[0] - (probs[1] if len(probs) > 1 else 0.0)


class FidelityGuard:
    """Probes a memory turn's first token on reused KV; ``check`` says whether to escalate."""

    def __init__(self, base_url: str, margin: float, *, headers: dict | None = None, timeout_s: float = 120) -> None:
        if not 0.0 <= margin <= 1.0:
            raise ValueError(f"guard margin must be in [0, 1], got {margin!r}")
        self.base_url = base_url.rstrip("/")
        self.margin = margin
        self.headers = headers if headers is not None else {}
        self.timeout_s = timeout_s
        self.probes = 0
        self.escalations = 0

    def check(self, input_ids: list[int], kv_hints: dict, margin: float | None = None, *,
              extra: dict | None = None) -> GuardDecision:
        """One probe (blocking: call it off the event loop); ``margin`` overrides the threshold for
        this turn; ``extra`` adds /generate fields (the fidelity harness's cache salt). A probe that
        fails escalates: the exact turn is always a full prefill's answer, the blended one only a
        likely one."""
        threshold = self.margin if margin is None else margin
        t0 = time.perf_counter()
        body = {"input_ids": list(input_ids), "kv_hints": kv_hints, "return_logprob": True,
                "top_logprobs_num": 2, "logprob_start_len": max(len(input_ids) - 1, 0),
                "sampling_params": {"max_new_tokens": 1, "temperature": 0}, **(extra or {})}
        self.probes += 1
        meta = None
        try:
            reply = requests.post(f"{self.base_url}/generate", json=body, headers=self.headers,
                                  timeout=self.timeout_s)
            meta = reply.json().get("meta_info", {}) if reply.status_code == 200 else None
            found = first_token_margin(meta) if meta is not None else None
            reason = "probe answered" if reply.status_code == 200 else f"probe HTTP {reply.status_code}"
        except (requests.RequestException, ValueError) as err:
            found, reason = None, f"probe failed: {type(err).__name__}"
        escalated = found is None or found < threshold or threshold >= 1.0  # 1.0: always (a margin can round to 1)
        if escalated:
            self.escalations += 1
            if found is not None:
                reason = f"first-token margin {found:.3f} < {threshold:g}"
        return GuardDecision(escalated, found, time.perf_counter() - t0, reason, meta)
