"""The probe passes of a blend: how each ranking signal picks the tokens a blend pass recomputes.

Run by amem_sgl.blend.runner.BlendRunner before its blend pass, for the plans of a batch with a
probe budget (``BlendPlan.budget > 0``), one extra forward per step for all plans of the step:

* ``key`` (hkvd): every spliced token (and gap) through the layers below the check layer (their
  fresh KV stored), the key deviation at the check layer; the top ``budget`` join the plan;
* ``value`` (cacheblend): staged. Stage 1 runs every spliced token (and gap) through layers 0-1,
  stores their fresh KV at both and ranks by value deviation at layer 1, keeping ``keeps[0]``
  candidates; stage j (check layer j) runs only the candidates kept so far through layers 0..j,
  stores their fresh KV at layer j too and keeps the top ``keeps[j-1]`` by value deviation there.
  The last stage keeps ``budget``. Layers 0..j-1 of a stage recompute what the stage before stored
  (the same values: every token's KV below the check layer is already fresh), which the cost counts;
* ``query``: the question (the positions after the spliced region that this batch extends, plus the
  gaps, which have no KV yet) runs over the spliced context through layers ``0..check_layer``,
  storing its KV in its own slots (the scheduler's extend computes them again right after); the seam
  sums its attention per key position over heads, question tokens and layers; the top ``budget``
  spliced tokens by that mass join the plan.
"""

from __future__ import annotations

from amem_sgl.blend.context import BlendContext, BlendPlan, top_positions

__all__ = ["run_probes"]


def run_probes(blender, runner, batch, picked: list[tuple[int, BlendPlan]]) -> list[tuple[int, BlendPlan]]:
    """``picked`` (index in the batch, plan) with every probing plan's selection made."""
    done: dict[int, BlendPlan] = {}
    probing = [(i, plan) for i, plan in picked if plan.budget > 0]
    for layer in sorted({plan.check_layer for _, plan in probing if plan.signal == "key"}):
        group = [(i, plan) for i, plan in probing if plan.signal == "key" and plan.check_layer == layer]
        ctx = blender._context(runner, probe_layer=layer)
        rows = [(i, plan.end, tuple(plan.probe_positions())) for i, plan in group]
        _run(blender, runner, batch, rows, ctx, [len(plan.gaps) for _, plan in group])
        for (i, plan), dev in zip(group, _split(ctx.deviation, rows, layer)):
            done[i] = plan.with_deviation(dev)
    staged = [(i, plan) for i, plan in probing if plan.signal == "value"]
    if staged:
        done.update(_value_staged(blender, runner, batch, staged))
    for layer in sorted({plan.check_layer for _, plan in probing if plan.signal == "query"}):
        group = [(i, plan) for i, plan in probing if plan.signal == "query" and plan.check_layer == layer]
        done.update(_query(blender, runner, batch, group, layer))
    return [(i, done.get(i, plan)) for i, plan in picked]


def _value_staged(blender, runner, batch, staged) -> dict[int, BlendPlan]:
    rows_of = {i: plan.probe_positions() for i, plan in staged}  # stage 1: every spliced token and gap
    kept = {i: plan.candidates() for i, plan in staged}
    for stage in range(max(len(plan.keeps) for _, plan in staged)):
        group = [(i, plan) for i, plan in staged if stage < len(plan.keeps)]
        layer = stage + 1
        ctx = blender._context(runner, probe_layer=layer)
        ctx.signal, ctx.store_probe = "value", True
        rows = [(i, plan.end, tuple(rows_of[i])) for i, plan in group]
        _run(blender, runner, batch, rows, ctx, [len(plan.gaps) if stage == 0 else 0 for _, plan in group])
        for (i, plan), dev in zip(group, _split(ctx.deviation, rows, layer)):
            kept[i] = top_positions(rows_of[i], dev, kept[i], plan.keeps[stage])
            rows_of[i] = kept[i]
    return {i: plan.with_picked(kept[i]) for i, plan in staged}


def _query(blender, runner, batch, group, layer: int) -> dict[int, BlendPlan]:
    ctx = blender._context(runner)
    ctx.query_layers, ctx.score_from = layer + 1, [plan.end for _, plan in group]
    # the question's tokens this batch extends (a chunked prefill extends only part of the tail)
    ends = [min(int(batch.seq_lens_cpu[i]), len(batch.reqs[i].origin_input_ids)) for i, _ in group]
    rows = [(i, end, tuple(sorted(set(plan.gaps) | set(range(plan.end, end)))))
            for (i, plan), end in zip(group, ends)]
    _run(blender, runner, batch, rows, ctx, [len(plan.gaps) for _, plan in group])
    if ctx.attention_mass is None or len(ctx.attention_mass) != len(group):
        raise RuntimeError(f"amem: query probe recorded no attention mass (layers 0..{layer})")
    out = {}
    for (i, plan), mass in zip(group, ctx.attention_mass):
        probe = plan.probe_positions()
        out[i] = plan.with_picked(top_positions(probe, mass[probe], plan.candidates(), plan.budget))
    return out


def _run(blender, runner, batch, rows, ctx: BlendContext, gaps: list[int]) -> None:
    """One probe forward; counts its tokens (gap tokens, always computed anyway, left out)."""
    blender._forward(runner, batch, rows, ctx)
    stats = blender.cache.stats
    stats.probed_tokens += sum(len(row[2]) - gap for row, gap in zip(rows, gaps))
    stats.probe_passes += 1


def _split(deviation, rows, layer: int):
    if deviation is None:
        raise RuntimeError(f"amem: blend probe never reached layer {layer}")
    return deviation.split([len(row[2]) for row in rows])
