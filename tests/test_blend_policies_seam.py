"""The CacheBlend and query-driven probes on a real SGLang model worker (the random-init 4-layer GQA
Llama of tests/test_blend_seam.py, fp32, its torch_native backend wrapped by amem's seam).

What each policy selects is checked against a selection computed here, independently, from a full
prefill and a pure splice of the same prompt:

* ``cacheblend:R@2``: layers 0-1 of every spliced token (B in place, A recomputed) end up equal to
  the full prefill's (they are recomputed for all); the fresh value a probe sees at layer j is then
  the full prefill's, so the
  candidates kept after layer 1 are the top ``2b`` by (V_full - V_spliced)^2 at layer 1, and the
  tokens recomputed the top ``b`` of those at layer 2; the candidates' layer-2 KV is fresh;
* ``query:R``: the question's attention to each context position, summed over heads, question
  tokens and every layer, taken from the q the model computes in a plain extend of the question
  over the spliced context (hooks on its attention modules) and the keys in the pool, recomputed
  here with an explicit per-head softmax; the tokens recomputed are the top ``b`` by that mass;
* the Triton branch of the seam (TRITON_INTERPRET=1 on CPU tensors) picks the same tokens and writes
  the same KV as the CPU torch path for both probes.
"""

from __future__ import annotations

import pytest
import torch

from amem_sgl import sglang_compat as sgl
from amem_sgl.blend.policy import BlendPolicy
from amem_sgl.blend.runner import BlendRunner
from tests.test_blend_seam import (A, B, LAYERS, PRE, Q, cache, extend, max_diff, release, row_kv,  # noqa: F401
                                   spliced, worker)

pytestmark = pytest.mark.slow

END = len(PRE) + len(B) + len(A)  # the spliced region of PRE + B + A + Q
# B sits where and behind what it was registered (in place: its KV is the prefill's, never
# recomputed), so the probes and the selection cover A's positions.
CHUNK = list(range(len(PRE) + len(B), END))


def _recorded_blend_rows(monkeypatch):
    """Positions of every forward the blend runner runs, with its context (probe or blend pass)."""
    seen = []
    original = BlendRunner._forward

    def record(self, runner, batch, rows, ctx):
        seen.append((ctx, [list(r[2]) for r in rows]))
        return original(self, runner, batch, rows, ctx)

    monkeypatch.setattr(BlendRunner, "_forward", record)
    return seen


def _full_and_pure(worker, cache, hook_q=False):
    """KV of a full prefill of PRE+B+A+Q, and of the pure splice (policy none) with, when asked,
    the q rows each layer computed for the question in the plain extend over the spliced context."""
    req_full, _ = extend(worker, cache, PRE + B + A + Q, blend=None)
    full = row_kv(worker, req_full, END + len(Q))
    release(cache, req_full)
    cache.evict(sgl.EvictParams(num_tokens=10_000))
    qs, hooks = {}, []
    if hook_q:
        for i, layer in enumerate(worker.model_runner.model.model.layers):
            hooks.append(layer.self_attn.attn.register_forward_pre_hook(
                lambda mod, args, i=i: qs.__setitem__(i, args[0].detach().clone())))
    try:
        req, _, _ = spliced(worker, cache, BlendPolicy("none"), blend=None)
    finally:
        for h in hooks:
            h.remove()
    pure = row_kv(worker, req, END + len(Q))
    release(cache, req)
    cache.evict(sgl.EvictParams(num_tokens=10_000))
    return full, pure, qs


def _top(scores_by_pos: dict[int, float], k: int) -> list[int]:
    return sorted(sorted(scores_by_pos, key=lambda p: -scores_by_pos[p])[:k])


def test_cacheblend_recomputes_layers_0_1_for_all_and_filters_by_value_deviation(worker, cache, monkeypatch):
    policy = BlendPolicy.parse("cacheblend:0.2@2")
    budget = round(0.2 * len(CHUNK))
    full, pure, _ = _full_and_pure(worker, cache)
    dev = lambda layer: {p: float(((full[layer][1][p] - pure[layer][1][p]) ** 2).sum()) for p in CHUNK}  # noqa: E731
    stage1 = _top(dev(1), 2 * budget)
    want = _top({p: dev(2)[p] for p in stage1}, budget)

    seen = _recorded_blend_rows(monkeypatch)
    before = cache.stats.probe_passes
    req, _, _ = spliced(worker, cache, policy)
    probes, blend = seen[:-1], seen[-1]
    assert [(c.probe_layer, c.signal, c.store_probe) for c, _ in probes] == [(1, "value", True), (2, "value", True)]
    assert probes[0][1] == [CHUNK] and probes[1][1] == [stage1]  # stage 2 runs only the candidates
    assert blend[0].probe_layer is None and blend[1] == [want]
    assert cache.stats.probe_passes - before == 2
    got = row_kv(worker, req, END)
    for layer in (0, 1):  # every spliced token's KV recomputed there: the full prefill's
        assert max_diff([got[layer]], [tuple(t[:END] for t in full[layer])]) < 1e-5
    others = [p for p in CHUNK if p not in stage1]
    assert max_diff([tuple(t[stage1] for t in got[2])], [tuple(t[stage1] for t in full[2])]) < 1e-5
    assert torch.equal(got[2][1][others], pure[2][1][others])  # dropped at layer 1: layer 2 untouched
    usage = req.customized_info["amem"][0]
    assert usage["recomputed_tokens"] == budget and usage["probed_tokens"] == len(CHUNK)
    assert usage["probe_layers"] == pytest.approx((2 * len(CHUNK) + 3 * 2 * budget) / len(CHUNK), abs=1e-3)
    release(cache, req)


def _mass(qs, kv, heads, kv_heads, scale):
    """Sum over layers, heads and question rows of softmax(q.k * scale) per key position (explicit
    per-head loop over the pool's keys after the question's extend)."""
    total = torch.zeros(END + len(Q))
    for layer, q in qs.items():
        q = q.view(q.shape[0], heads, -1)
        keys = kv[layer][0]
        for h in range(heads):
            k = keys[:, h // (heads // kv_heads)]
            for t in range(len(Q)):
                pos = END + t
                logits = (k[: pos + 1] @ q[t, h]) * scale
                total[: pos + 1] += torch.softmax(logits, dim=0)
    return total


def test_query_recomputes_the_context_tokens_its_question_attends_to_most(worker, cache, monkeypatch):
    policy = BlendPolicy.parse("query:0.25")
    budget = round(0.25 * len(CHUNK))
    _, pure, qs = _full_and_pure(worker, cache, hook_q=True)
    assert sorted(qs) == list(range(LAYERS)) and all(q.shape[0] == len(Q) for q in qs.values())
    attn = worker.model_runner.model.model.layers[0].self_attn.attn
    mass = _mass(qs, pure, attn.tp_q_head_num, attn.tp_k_head_num, attn.scaling)
    want = _top({p: float(mass[p]) for p in CHUNK}, budget)

    seen = _recorded_blend_rows(monkeypatch)
    req, _, _ = spliced(worker, cache, policy)
    (probe, rows), blend = seen[0], seen[-1]
    assert len(seen) == 2 and probe.query_layers == LAYERS and probe.score_from == [END]
    assert rows == [list(range(END, END + len(Q)))]  # the question, at its true positions
    torch.testing.assert_close(probe.attention_mass[0][:END], mass[:END], rtol=1e-4, atol=1e-5)
    assert blend[1] == [want]
    usage = req.customized_info["amem"][0]
    assert usage["recomputed_tokens"] == budget and usage["probed_tokens"] == len(Q)
    assert usage["probe_layers"] == LAYERS
    release(cache, req)


@pytest.mark.parametrize("policy", ["cacheblend:0.1@3", "query:0.2@2", "edges+query:2:0.1"])
def test_triton_branch_picks_and_writes_like_the_torch_path(worker, cache, policy, monkeypatch):
    """(cacheblend's candidates, 6 then 4 then 2, stay within A: B sits where it was computed, so its
    deviations are ~0 and their order is numerical noise.)"""
    import os

    assert os.environ.get("TRITON_INTERPRET") == "1"
    seen = _recorded_blend_rows(monkeypatch)
    req_t, logits_t, prompt = spliced(worker, cache, BlendPolicy.parse(policy), blend="torch")
    torch_kv, torch_rows = row_kv(worker, req_t, len(prompt)), [rows for _, rows in seen]
    release(cache, req_t)
    cache.evict(sgl.EvictParams(num_tokens=10_000))
    seen.clear()
    req_k, logits_k, _ = spliced(worker, cache, BlendPolicy.parse(policy), blend="triton")
    assert all(ctx.kernel == "triton" for ctx, _ in seen)
    assert [rows for _, rows in seen] == torch_rows
    assert max_diff(row_kv(worker, req_k, len(prompt)), torch_kv) < 1e-5
    torch.testing.assert_close(logits_k, logits_t, rtol=1e-5, atol=1e-5)
    release(cache, req_k)
