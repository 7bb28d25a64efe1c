"""The blend pass: recompute selected spliced tokens inside SGLang's model forward.

When the cache hands a spliced prefix to a request's KV row it records a :class:`BlendPlan` (the
positions the policy picked). Right before the worker runs an extend batch, :func:`around_forward`
runs one extra forward for every blended request in it (one pass per batch, the shape of SGLang's
encoder-SWA replay): input = the picked tokens, positions = their true positions, output KV slots =
their slots in the row, sequence length = the end of the spliced region. Every layer writes the
recomputed tokens' fresh KV over the spliced copies before attending, and attention is causal by
position over the whole spliced sequence (amem_sgl.blend.attention), so a recomputed token sees the
chunks before it. The scheduler's own extend of the remaining tokens then reads the blended KV.
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


class BlendRunner:
    def __init__(self, cache) -> None:
        self.cache = cache

    def run(self, worker, batch) -> None:
        if batch is None or not batch.forward_mode.is_extend() or batch.forward_mode.is_target_verify():
            return
        picked = [(i, self.cache.pending_blends.pop(req.rid)) for i, req in enumerate(batch.reqs)
                  if req.rid in self.cache.pending_blends]
        if not picked:
            return
        runner = worker.model_runner
        replay = _blend_batch(batch, runner, picked)
        fb = sgl.ForwardBatch.init_new(replay, runner, capture_hidden_mode=sgl.CaptureHiddenMode.NULL,
                                       return_hidden_states_before_norm=False)
        positions = [p for _, plan in picked for p in plan.positions]
        fb.positions = torch.tensor(positions, dtype=fb.positions.dtype, device=fb.positions.device)
        runner.forward(fb)
        self.cache.stats.recomputed_tokens += len(positions)
        self.cache.stats.blend_passes += 1


def _blend_batch(batch, runner, picked):
    idx = [i for i, _ in picked]
    plans = [plan for _, plan in picked]
    reqs = [batch.reqs[i] for i in idx]
    rows = batch.req_pool_indices[idx]
    req_to_token = runner.req_to_token_pool.req_to_token
    lens = [len(plan.positions) for plan in plans]
    ends = [plan.end for plan in plans]
    replay = copy.copy(batch)
    replay.reqs = reqs
    replay.input_ids = torch.tensor([req.origin_input_ids[p] for req, plan in zip(reqs, plans) for p in plan.positions],
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
    replay.out_cache_loc = torch.cat([req_to_token[rows[k], list(plan.positions)]
                                      for k, plan in enumerate(plans)]).long()
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
    """AROUND hook for ``TpModelWorker.forward_batch_generation``: blend, then the normal forward."""
    runner = RUNNERS.get(id(worker))
    if runner is not None:
        runner.run(worker, kwargs["batch"] if "batch" in kwargs else (args[0] if args else None))
    return original(worker, *args, **kwargs)
