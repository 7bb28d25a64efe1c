"""The blend pass: recompute selected spliced tokens inside SGLang's model forward.

When the cache hands a spliced prefix to a request's KV row it records a :class:`BlendPlan` (the
positions the policy picked). Right before the worker runs an extend batch, :func:`around_forward`
runs one extra forward for every blended request in it (one pass per batch, the shape of SGLang's
encoder-SWA replay): input = the picked tokens, positions = their true positions, output KV slots =
their slots in the row, sequence length = the end of the spliced region. Every layer writes the
recomputed tokens' fresh KV over the spliced copies before attending, and attention is causal by
position over the whole spliced sequence (amem_sgl.blend.attention), so a recomputed token sees the
chunks before it. The scheduler's own extend of the remaining tokens then reads the blended KV.

Deviation policies (``hkvd``) first run a probe pass over every spliced token of those requests:
layers below the check layer run in full (their fresh KV replaces the spliced copies), and at the
check layer the attention hook compares each token's fresh key with its spliced key and ends the
forward there (:class:`amem_sgl.blend.attention.ProbeDone`). The top-deviation tokens then join
the plan's fixed positions in the blend pass.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch

from amem_sgl import sglang_compat as sgl

logger = logging.getLogger(__name__)

# The blend runner of each TpModelWorker in this process (set by the cache factory).
RUNNERS: dict[int, "BlendRunner"] = {}


@dataclasses.dataclass(frozen=True)
class BlendPlan:
    end: int  # end of the spliced region (the request's prefix length)
    positions: tuple[int, ...]  # ascending positions to recompute, all < end
    segments: tuple[tuple[int, int], ...] = ()  # spliced chunks (start, length): the probe's tokens
    budget: int = 0  # tokens to add by key deviation at check_layer (0: no probe pass)
    check_layer: int = 1
    gaps: tuple[int, ...] = ()  # uncached non-chunk positions inside the region (always computed)

    def probe_positions(self) -> list[int]:
        """Every spliced chunk token and gap token, ascending: a probe computes the early layers of
        all of them (a gap has no KV at all until it is computed)."""
        return sorted({p for start, length in self.segments for p in range(start, start + length)} | set(self.gaps))

    def with_deviation(self, deviation: torch.Tensor) -> "BlendPlan":
        """The plan with the ``budget`` highest-deviation probe tokens added to its positions."""
        probe = self.probe_positions()
        fixed = set(self.positions) | set(self.gaps)
        score = deviation.float().clone()
        score[[i for i, p in enumerate(probe) if p in fixed]] = float("-inf")
        top = torch.topk(score, min(self.budget, len(probe) - len(fixed))).indices.tolist()
        chosen = sorted(fixed | {probe[i] for i in top})
        return dataclasses.replace(self, positions=tuple(chosen), budget=0)


class BlendRunner:
    def __init__(self, cache) -> None:
        self.cache = cache

    def run(self, worker, batch) -> None:
        if batch is None or not batch.forward_mode.is_extend() or batch.forward_mode.is_target_verify():
            return
        picked = [(i, self.cache.blend_plans.pop(req.rid)) for i, req in enumerate(batch.reqs)
                  if req.rid in self.cache.blend_plans]
        if not picked:
            return
        runner = worker.model_runner
        for layer in sorted({plan.check_layer for _, plan in picked if plan.budget > 0}):
            probing = [(i, plan) for i, plan in picked if plan.budget > 0 and plan.check_layer == layer]
            deviations = self._probe(runner, batch, probing, layer)
            updated = {i: plan.with_deviation(dev) for (i, plan), dev in zip(probing, deviations)}
            picked = [(i, updated.get(i, plan)) for i, plan in picked]
        picked = [(i, plan) for i, plan in picked if plan.positions]
        if not picked:
            return
        self._forward(runner, batch, [(i, plan.end, plan.positions) for i, plan in picked])
        self.cache.stats.recomputed_tokens += sum(len(set(plan.positions) - set(plan.gaps)) for _, plan in picked)
        self.cache.stats.gap_tokens += sum(len(plan.gaps) for _, plan in picked)
        self.cache.stats.blend_passes += 1

    def _forward(self, runner, batch, rows) -> None:
        replay = _blend_batch(batch, runner, rows)
        fb = sgl.ForwardBatch.init_new(replay, runner, capture_hidden_mode=sgl.CaptureHiddenMode.NULL,
                                       return_hidden_states_before_norm=False)
        positions = [p for _, _, row_positions in rows for p in row_positions]
        fb.positions = torch.tensor(positions, dtype=fb.positions.dtype, device=fb.positions.device)
        runner.forward(fb)

    def _probe(self, runner, batch, probing, layer: int) -> list[torch.Tensor]:
        """Run every spliced token of ``probing`` up to ``layer``; each plan's key deviations there."""
        from amem_sgl.blend.attention import ProbeDone, probe_at

        rows = [(i, plan.end, tuple(plan.probe_positions())) for i, plan in probing]
        with probe_at(layer) as probe:
            try:
                self._forward(runner, batch, rows)
            except ProbeDone:
                pass
        if probe.deviation is None:
            raise RuntimeError(f"amem: blend probe never reached layer {layer}")
        self.cache.stats.probed_tokens += sum(len(r[2]) - len(plan.gaps) for r, (_, plan) in zip(rows, probing))
        self.cache.stats.probe_passes += 1
        return list(torch.split(probe.deviation, [len(r[2]) for r in rows]))


def _blend_batch(batch, runner, picked):
    """A copy of ``batch`` that computes, for each (index, end, positions) in ``picked``, the tokens
    at ``positions`` of that request over its first ``end`` KV slots."""
    idx = [i for i, _, _ in picked]
    wanted = [positions for _, _, positions in picked]
    reqs = [batch.reqs[i] for i in idx]
    rows = batch.req_pool_indices[idx]
    req_to_token = runner.req_to_token_pool.req_to_token
    lens = [len(positions) for positions in wanted]
    ends = [end for _, end, _ in picked]
    replay = copy.copy(batch)
    replay.reqs = reqs
    replay.input_ids = torch.tensor([req.origin_input_ids[p] for req, positions in zip(reqs, wanted) for p in positions],
                                    dtype=torch.int64, device=runner.device)
    replay.prefill_input_ids_cpu = None
    replay.req_pool_indices = rows
    replay.req_pool_indices_cpu = batch.req_pool_indices_cpu[idx]
    replay.prefix_lens = [end - n for end, n in zip(ends, lens)]
    replay.extend_lens = lens
    replay.extend_num_tokens = sum(lens)
    replay.seq_lens = torch.tensor(ends, dtype=torch.int64, device=runner.device)
    replay.seq_lens_cpu = torch.tensor(ends, dtype=torch.int64)
    replay.seq_lens_sum = sum(ends)
    replay.orig_seq_lens = replay.seq_lens
    replay.out_cache_loc = torch.cat([req_to_token[rows[k], list(positions)]
                                      for k, positions in enumerate(wanted)]).long()
    replay.return_logprob = False
    replay.top_logprobs_nums = None
    replay.token_ids_logprobs = None
    replay.extend_logprob_start_lens = lens
    replay.extend_input_logprob_token_ids = None
    replay.is_prefill_only = True
    replay.spec_info = None
    replay.sampling_info = None
    replay.has_grammar = False
    replay.multimodal_inputs = [None] * len(reqs)
    if batch.global_num_tokens is not None:
        replay.global_num_tokens = [replay.extend_num_tokens]
        replay.global_num_tokens_for_logprob = [sum(max(n, 1) for n in lens)]
    return replay


def around_forward(original, worker, *args, **kwargs):
    """AROUND hook for ``TpModelWorker.forward_batch_generation``: blend, then the normal forward.

    A failing blend pass must not take the scheduler down: the requests then run on their spliced
    KV as it stands (answers may drift from a full prefill), the error is logged and counted."""
    runner = RUNNERS.get(id(worker))
    if runner is not None:
        try:
            runner.run(worker, kwargs["batch"] if "batch" in kwargs else (args[0] if args else None))
        except Exception:  # noqa: BLE001 -- serving goes on; the failure is visible in stats and log
            runner.cache.stats.blend_failures += 1
            logger.exception("amem: blend pass failed; serving these requests on their spliced KV")
    return original(worker, *args, **kwargs)
