"""Answer-level fidelity metrics, shared by the fidelity harness and the cost curve.

* :func:`answer_of` -- the normalised extracted answer (benchmarks.fidelity_data.extract_answer);
* :func:`first_token_kl` -- KL(full || reuse) of the first output token's distribution, from the
  server's logprobs: the full arm returns its top-K first-token logprobs, the reuse arm the logprobs
  of exactly those K token ids (SGLang's ``token_ids_logprob``). The KL is taken over the partition
  {each of the K tokens, everything else}: a lower bound of the full-vocabulary KL (coarse-graining
  never increases KL), exact when the K tokens hold all the mass;
* :func:`summarize_rows` -- per group: identical greedy answers, answer agreement, accuracy of both
  arms and its difference, first-token agreement and mean KL, recompute fraction (probe layers
  counted), prefill-token ratio and TTFT ratio, and the numeric floor on the same prompts.

    from benchmarks.fidelity_metrics import first_token_kl, logprob_request, answer_of
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

from benchmarks.fidelity_data import extract_answer

TOP_K = 20


def answer_of(text: str) -> str:
    return extract_answer(text)


def logprob_request(token_ids: Sequence[int] | None = None, top_k: int = TOP_K) -> dict:
    """The extra /generate fields for first-token logprobs: the top ``top_k`` (full arm) or the
    given ``token_ids`` (reuse arm)."""
    body = {"return_logprob": True, "logprob_start_len": -1, "top_logprobs_num": 0 if token_ids else top_k}
    if token_ids:
        body["token_ids_logprob"] = list(token_ids)
    return body


def first_top_logprobs(meta_info: dict) -> dict[int, float]:
    """{token id: logprob} of the first output position's top logprobs (full arm)."""
    rows = meta_info.get("output_top_logprobs") or []
    return {int(t): float(lp) for lp, t, *_ in (rows[0] or [])} if rows else {}


def first_token_id_logprobs(meta_info: dict) -> dict[int, float]:
    """{token id: logprob} of the first output position's requested token ids (reuse arm)."""
    rows = meta_info.get("output_token_ids_logprobs") or []
    return {int(t): float(lp) for lp, t, *_ in (rows[0] or [])} if rows else {}


def first_token_kl(full: dict[int, float], reuse: dict[int, float]) -> float | None:
    """KL(full || reuse) over {each token of ``full``, the rest}; None when either side is missing."""
    if not full or not reuse or set(full) - set(reuse):
        return None
    kl, p_mass, q_mass = 0.0, 0.0, 0.0
    for token, lp in full.items():
        p, q_lp = math.exp(lp), reuse[token]
        kl += p * (lp - q_lp)
        p_mass, q_mass = p_mass + p, q_mass + math.exp(q_lp)
    p_rest, q_rest = max(1.0 - p_mass, 0.0), max(1.0 - q_mass, 1e-12)
    if p_rest > 1e-12:
        kl += p_rest * math.log(p_rest / q_rest)
    return max(kl, 0.0)


def _mean(values: Iterable) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize_rows(group: list[dict]) -> dict:
    """The figures of one group of rows (dicts with the harness's Row fields)."""
    n = len(group)
    chunk = max(sum(r["chunk_tokens"] for r in group), 1)
    reuse_tokens = sum(r["reuse_computed_tokens"] for r in group)
    full_tokens = sum(r["full_computed_tokens"] for r in group)
    reuse_acc = sum(r["reuse_correct"] for r in group) / n
    full_acc = sum(r["full_correct"] for r in group) / n
    floor = [r["floor_identical"] for r in group if r.get("floor_identical") is not None]
    floor_agree = [r["floor_answer_agree"] for r in group if r.get("floor_answer_agree") is not None]
    return {
        "n": n,
        "identical_answers": sum(r["identical"] for r in group) / n,
        "answer_agreement": sum(r["answer_agree"] for r in group) / n,
        "reuse_accuracy": reuse_acc,
        "full_accuracy": full_acc,
        "accuracy_delta": reuse_acc - full_acc,
        "correctness_agreement": sum(r["reuse_correct"] == r["full_correct"] for r in group) / n,
        "first_token_agreement": sum(r["first_token_agree"] for r in group) / n,
        "first_token_kl": _mean(r.get("first_token_kl") for r in group),
        "recomputed_fraction": sum(r["recompute_cost_tokens"] for r in group) / chunk,
        "recomputed_token_fraction": sum(r["recomputed_chunk_tokens"] for r in group) / chunk,
        "mean_prompt_tokens": sum(r["prompt_tokens"] for r in group) / n,
        "mean_chunk_tokens": sum(r["chunk_tokens"] for r in group) / n,
        "reuse_computed_tokens": reuse_tokens,
        "full_computed_tokens": full_tokens,
        "prefill_ratio_full_over_reuse": full_tokens / max(reuse_tokens, 1),
        "ttft_ratio_full_over_reuse": sum(r["full_ttft_s"] or 0 for r in group)
        / max(sum(r["reuse_ttft_s"] or 0 for r in group), 1e-9),
        "numeric_floor": sum(floor) / len(floor) if floor else None,
        "numeric_floor_answer_agreement": sum(floor_agree) / len(floor_agree) if floor_agree else None,
        "escalation_rate": _mean(float(r["escalated"]) for r in group if r.get("escalated") is not None),
        "first_token_margin": _mean(r.get("reuse_margin") for r in group),
        "spliced_fraction": sum(r.get("spliced_tokens", 0) for r in group) / chunk,
        "text_f1_vs_full": _mean(r.get("text_f1") for r in group),
    }


def target_gaps(summary: dict) -> dict:
    """How far a policy's overall figures are from the product targets (positive = met by that much)."""
    floor = summary.get("numeric_floor")
    return {
        "identical_minus_floor": None if floor is None else summary["identical_answers"] - floor,
        "agreement_minus_0.99": summary["answer_agreement"] - 0.99,
        "accuracy_within_0.01": abs(summary["accuracy_delta"]) <= 0.01,
    }
