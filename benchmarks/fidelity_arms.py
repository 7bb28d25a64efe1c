"""The reuse arms of the fidelity harness: a blend policy, ``exact``, or ``guarded:M``.

Every arm serves the same composed prompt as the full prefill it is compared with, under its own
cache salt (so it shares no blended prefix with another arm):

* a blend policy (``none``, ``edges:8``, ...) -- the chunk spans spliced and blended by that policy
  (the server's ``fast`` fidelity); the first token's top-2 logprobs are asked for too, so the run
  records each answer's first-token margin (what the guard would see);
* ``exact`` -- the same spans declared ``exact`` (amem_sgl.memory.fidelity.exact_hints): nothing
  spliced or blended; on a question seen for the first time that is a full prefill (savings come from
  a session's working set, measured by the cost curve);
* ``ctx:POLICY`` -- context-aware chunk KV (FusionRAG's "kept from its first real use"): the item's
  chunks are first used once, in another order (reversed), by a request with ``capture`` in a fresh
  namespace -- each chunk computed in place behind the others and kept as its chunk node -- then the
  compared prompt splices those nodes and blends them with POLICY. The first use is a one-time chunk
  prefill (like registering), not counted per question. The report's ``spliced_fraction`` checks
  that the compared prompt spliced the captured nodes (before the fix in ChunkRadixCache.alloc a
  capture on a full pool kept nothing: benchmarks/results/void/);
* ``guarded:M[/POLICY]`` -- the server's fidelity guard (amem_sgl.memory.guard.FidelityGuard, the code
  a guarded memory turn runs): a one-token probe on the spliced + blended KV (POLICY, default the
  server's); a first-token margin below M escalates the question to ``exact``, otherwise it is
  generated on the blended prefix the probe left in the tree. Its cost counts the probe.

:func:`guard_sweep` replays the guard over a run's own rows (a blend arm's margins and identical
answers, the ``exact`` arm's for escalated questions): escalation rate, identical answers and
prefill per threshold -- the calibration the issue asks for, fitted on the calibration split.
"""

from __future__ import annotations

import dataclasses
import uuid

from amem_sgl.blend.policy import BlendPolicy
from amem_sgl.chunks.client import ChunkClient, Generation, amem_usage
from amem_sgl.chunks.hints import build_kv_hints
from amem_sgl.memory.fidelity import exact_hints
from amem_sgl.memory.guard import FidelityGuard, first_token_margin
from benchmarks.fidelity_metrics import logprob_request


@dataclasses.dataclass
class ArmResult:
    gen: Generation  # the generation whose answer is compared
    computed_tokens: int  # prompt tokens prefilled (recomputed included), probe included
    recomputed: int  # spliced chunk tokens recomputed by blend passes (probe included)
    cost_tokens: float  # recomputed + probe layers, full-depth token equivalents (+ chunks when exact)
    ttft_s: float | None  # to the first token of the answer (the probe's time included)
    margin: float | None = None  # p1 - p2 of the first token on reused KV
    escalated: bool | None = None  # guarded arms: the guard sent it to exact
    gap_tokens: int = 0


def blend_cost(gen: Generation, num_layers: int) -> tuple[int, float]:
    """(recomputed tokens, their cost with probe layers) as the server reported them."""
    recomputed = int(gen.amem.get("recomputed_tokens", 0))
    return recomputed, recomputed + gen.amem.get("probed_tokens", 0) * gen.amem.get("probe_layers", 0) / num_layers


class Arm:
    label = ""

    def run(self, client: ChunkClient, prompt, namespace: str, full_top: dict, max_new_tokens: int,
            num_layers: int, **item) -> ArmResult:
        """``item``: ``chunks`` (the item's chunk token ids) and ``question`` (its text)."""
        raise NotImplementedError


class BlendArm(Arm):
    def __init__(self, policy: BlendPolicy) -> None:
        self.policy, self.label = policy, policy.label

    def run(self, client, prompt, namespace, full_top, max_new_tokens, num_layers, **item):
        extra = {**logprob_request(list(full_top) or None), "top_logprobs_num": 2}
        gen = client.generate(prompt, namespace, max_new_tokens=max_new_tokens, blend=self.policy, ttft=True,
                              cache_salt=f"{self.label}-{uuid.uuid4().hex}", extra=extra)
        recomputed, cost = blend_cost(gen, num_layers)
        return ArmResult(gen, gen.computed_prompt_tokens + recomputed, recomputed, cost, gen.ttft_s,
                         first_token_margin(gen.meta_info), gap_tokens=int(gen.amem.get("gap_tokens", 0)))


class ExactArm(Arm):
    label = "exact"

    def run(self, client, prompt, namespace, full_top, max_new_tokens, num_layers, salt: str | None = None, **item):
        hints = exact_hints(namespace, build_kv_hints(namespace, prompt.spans))
        gen = client.generate(prompt, max_new_tokens=max_new_tokens, ttft=True,
                              cache_salt=salt or f"exact-{uuid.uuid4().hex}",
                              extra={**logprob_request(list(full_top) or None), "kv_hints": hints})
        chunk_tokens = sum(e - s for s, e in prompt.spans)
        # Exact reuses only exact prefixes: whatever the prompt's chunks cost is prefill.
        return ArmResult(gen, gen.computed_prompt_tokens, 0, min(chunk_tokens, gen.computed_prompt_tokens), gen.ttft_s)


class ContextArm(BlendArm):
    def __init__(self, policy: BlendPolicy) -> None:
        super().__init__(policy)
        self.label = f"ctx:{policy.label}"

    def run(self, client, prompt, namespace, full_top, max_new_tokens, num_layers, **item):
        own = f"{namespace}-ctx-{uuid.uuid4().hex[:12]}"
        first = client.layout.compose(list(reversed(item["chunks"])), item["question"])
        client.generate(first, max_new_tokens=1, cache_salt=f"ctx-first-{uuid.uuid4().hex}",
                        extra={"kv_hints": build_kv_hints(own, first.spans, capture=True)})
        return super().run(client, prompt, own, full_top, max_new_tokens, num_layers)


class GuardedArm(Arm):
    def __init__(self, url: str, margin: float, policy: BlendPolicy | None = None) -> None:
        self.guard = FidelityGuard(url, margin)
        self.policy = policy
        self.label = f"guarded:{margin:g}" + (f"/{policy.label}" if policy is not None else "")

    def run(self, client, prompt, namespace, full_top, max_new_tokens, num_layers, **item):
        salt = f"{self.label}-{uuid.uuid4().hex}"
        hints = build_kv_hints(namespace, prompt.spans, blend=self.policy)
        decision = self.guard.check(prompt.input_ids, hints, extra={"cache_salt": salt})
        meta = decision.meta or {}  # the probe's meta_info (empty when it failed)
        probe = amem_usage(meta)
        probe_computed = meta.get("prompt_tokens", 0) - meta.get("cached_tokens", 0)
        p_recomputed = int(probe.get("recomputed_tokens", 0))
        p_cost = p_recomputed + probe.get("probed_tokens", 0) * probe.get("probe_layers", 0) / num_layers
        if decision.escalated:
            res = ExactArm().run(client, prompt, namespace, full_top, max_new_tokens, num_layers, salt=salt)
        else:
            gen = client.generate(prompt, namespace, max_new_tokens=max_new_tokens, blend=self.policy, ttft=True,
                                  cache_salt=salt, extra=logprob_request(list(full_top) or None))
            recomputed, cost = blend_cost(gen, num_layers)
            res = ArmResult(gen, gen.computed_prompt_tokens + recomputed, recomputed, cost, gen.ttft_s)
        return ArmResult(res.gen, res.computed_tokens + probe_computed + p_recomputed, res.recomputed + p_recomputed,
                         res.cost_tokens + p_cost, None if res.ttft_s is None else res.ttft_s + decision.probe_s,
                         decision.margin, decision.escalated, int(probe.get("gap_tokens", 0)))


def parse_arm(text: str, url: str) -> Arm:
    """``exact``, ``guarded:M[/POLICY]``, ``ctx:POLICY`` or a blend policy's spelling."""
    if text == "exact":
        return ExactArm()
    if text.startswith("ctx:"):
        return ContextArm(BlendPolicy.parse(text[len("ctx:"):]))
    if text.startswith("guarded:"):
        spec = text[len("guarded:"):]
        margin, _, policy = spec.partition("/")
        try:
            value = float(margin)
        except ValueError:
            raise ValueError(f"guarded arm is spelled guarded:M[/POLICY], got {text!r}") from None
        return GuardedArm(url, value, BlendPolicy.parse(policy) if policy else None)
    return BlendArm(BlendPolicy.parse(text))


THRESHOLDS = [round(0.05 * i, 2) for i in range(21)]


def guard_sweep(rows: list[dict], floor: float | None) -> dict:
    """Per blend arm with margins, the guard replayed over this run's rows at each threshold: a row
    whose margin is below it takes the ``exact`` arm's row of the same question. Returns
    {arm: {"sweep": [...], "chosen": threshold or None}} -- chosen: the smallest threshold whose
    identical answers reach ``floor`` (None without a floor or when none does)."""
    exact = {r["qid"]: r for r in rows if r["policy"] == "exact"}
    out = {}
    for arm in dict.fromkeys(r["policy"] for r in rows if r.get("reuse_margin") is not None and r.get("escalated") is None):
        arm_rows = [r for r in rows if r["policy"] == arm and r["qid"] in exact and r.get("reuse_margin") is not None]
        if not arm_rows:
            continue
        sweep = []
        for t in THRESHOLDS:
            picked = [exact[r["qid"]] if r["reuse_margin"] < t else r for r in arm_rows]
            escalated = sum(r["reuse_margin"] < t for r in arm_rows)
            # A guarded turn pays the probe (≈ the blend arm's own prefill) and, escalated, the exact one.
            computed = sum(r["reuse_computed_tokens"] + (exact[r["qid"]]["reuse_computed_tokens"] if r["reuse_margin"] < t else 0)
                           for r in arm_rows)
            full = sum(r["full_computed_tokens"] for r in arm_rows)
            sweep.append({"threshold": t, "escalation_rate": escalated / len(arm_rows),
                          "identical_answers": sum(r["identical"] for r in picked) / len(arm_rows),
                          "answer_agreement": sum(r["answer_agree"] for r in picked) / len(arm_rows),
                          "prefill_ratio_full_over_guarded": full / max(computed, 1)})
        chosen = next((s["threshold"] for s in sweep if floor is not None and s["identical_answers"] >= floor), None)
        out[arm] = {"n": len(arm_rows), "sweep": sweep, "chosen": chosen}
    return out
