"""The blend pass: recompute selected spliced tokens inside SGLang's model forward.

When the cache hands a spliced prefix to a request's KV row it records a :class:`BlendPlan` (the
positions the policy picked). Right before the worker runs an extend batch, :func:`around_forward`
asks the cache for the plans of the batch's requests (``take_blend_plans``) and runs one extra
forward for all of them (the shape of SGLang's encoder-SWA replay): input = the picked tokens,
positions = their true positions, output KV slots = their slots in the row, sequence length = the
end of the spliced region. That forward runs with one :class:`BlendContext` handed to the attention
seam (``AmemAttnBackend.serving``), which, in every layer, writes the
recomputed tokens' fresh KV over the spliced copies, then attends causally by position over the
whole spliced sequence. The scheduler's own extend of the remaining tokens then reads the blended KV.

Deviation policies (``hkvd``) first run a probe pass over every spliced token of those requests:
the model's layer range is cut to ``check_layer + 1`` layers for that forward, layers below the
check layer run in full (their fresh KV replaces the spliced copies), and at the check layer the
seam records each token's key deviation in the context and stores nothing. No exception crosses
the model's code. The top-deviation tokens then join the plan's fixed positions in the blend pass.
Staged value-deviation (``cacheblend``) and query-driven (``query``) probes: amem_sgl.blend.probes.

APE policies (``ape:T:S``, amem_sgl.blend.ape) recompute nothing: the request's own extend is served
by the seam with its chunk spans (folded, or as :class:`ApeServe`), and its decode steps too
(:class:`ApeDecode`: the stock decode attention plus APE's correction), as APE's code does for
every generated token.

On CPU (torch attention path, amem's linear extend) the blend pass is folded into the batch's own
extend forward instead of running as an extra one (amem_sgl.blend.fold): the recomputed tokens go in
front of each request's extend tokens, and the seam serves both parts as the two forwards would.

Extra forwards run eagerly: the prefill CUDA-graph runner is set aside for them (decode and the
scheduler's own batches keep SGLang's graphs and the stock attention backend, except a decode batch
with APE requests, which runs eagerly).
"""

from __future__ import annotations

import contextlib
import copy
import logging

import torch

from amem_sgl import sglang_compat as sgl
from amem_sgl.blend.backend import FoldError, amem_backend_of, default_kernel
from amem_sgl.blend.context import BlendContext, BlendPlan
from amem_sgl.blend.fold import can_fold, fold_batch
from amem_sgl.blend.probes import run_probes
from amem_sgl.cache.usage import add_timing, clock, stamp, usage_of

logger = logging.getLogger(__name__)

__all__ = ["BlendPlan", "BlendRunner", "around_forward"]


class BlendRunner:
    def __init__(self, cache, kernel: str | None = None) -> None:
        self.cache = cache
        self.kernel = kernel  # None: default_kernel(the model runner's device)

    def run(self, worker, batch, *, fold: bool = False, capture_hidden_mode=None) -> "Fold | ApeServe | None":
        """The probe and blend passes of ``batch``'s plans, before its own forward. With ``fold``,
        where :func:`~amem_sgl.blend.fold.can_fold` allows, the blend pass is not run but returned:
        the caller runs the batch's forward as :meth:`Fold.forward` (one forward for both). A batch
        with APE plans (amem_sgl.blend.ape) that is not folded returns an :class:`ApeServe`: its own
        forward runs through the seam too."""
        if batch is None or not batch.forward_mode.is_extend() or batch.forward_mode.is_target_verify():
            return None
        picked = self.cache.take_blend_plans(batch.reqs)
        if not picked:
            return None
        runner = worker.model_runner
        probe_reqs, started = [batch.reqs[i] for i, plan in picked if plan.budget > 0], clock()
        picked = run_probes(self, runner, batch, picked)  # amem_sgl.blend.probes: key, value (staged), query
        probed = clock()
        for req in probe_reqs:
            add_timing(req, "blend_probe_s", probed - started)
        ape = {i: plan.ape_rows() for i, plan in picked if plan.ape is not None}  # amem_sgl.blend.ape
        picked = [(i, plan) for i, plan in picked if plan.positions]
        if not picked and not ape:
            return None
        rows, ctx = [(i, plan.end, plan.positions) for i, plan in picked], self._context(runner)
        self.cache.stats.recomputed_tokens += sum(len(set(plan.positions) - set(plan.gaps)) for _, plan in picked)
        self.cache.stats.gap_tokens += sum(len(plan.gaps) for _, plan in picked)
        self.cache.stats.blend_passes += 1 if picked else 0
        if fold and can_fold(amem_backend_of(runner), ctx.kernel, batch, capture_hidden_mode):
            folded, ctx.fold = fold_batch(batch, runner, rows, ape)
            ctx.ape = ctx.fold.ape
            for i, _ in picked:
                add_timing(batch.reqs[i], "blend_fold_s", clock() - probed)
            _mark_ape(batch, ape)
            return Fold(self, runner, batch, rows, folded, ctx, ape)
        if picked:
            self._forward(runner, batch, rows, ctx)
        for i, _ in picked:
            add_timing(batch.reqs[i], "blend_s", clock() - probed)
        serve = self._ape_serve(runner, batch, ape)
        _mark_ape(batch, ape if serve is not None else {})
        return serve

    def decode(self, worker, batch) -> "ApeDecode | None":
        """A decode batch with requests whose extend attended by APE (``Req.amem_ape``): its
        forward served eagerly with the same rule (APE applies it to every generated token)."""
        reqs = getattr(batch, "reqs", None) or ()
        if batch is None or not batch.forward_mode.is_decode() or batch.spec_info is not None:
            return None
        parts = [getattr(req, APE_ATTR, None) for req in reqs]
        return ApeDecode(worker.model_runner, parts) if any(p is not None for p in parts) else None

    def _ape_serve(self, runner, batch, ape: dict) -> "ApeServe | None":
        """The batch's own extend served by the seam with APE's rule for ``ape``'s requests (a batch
        the blend pass could not fold into: logprobs asked for, the CUDA kernel). Only a plain EXTEND
        batch (no mixed decode rows, speculative or DP-attention batches); otherwise its requests
        attend plainly, which the log says."""
        if not ape:
            return None
        if (batch.forward_mode != sgl.ForwardMode.EXTEND or batch.spec_info is not None
                or batch.global_num_tokens is not None):
            logger.warning("amem: APE not applied to %d request(s) of a %s batch", len(ape), batch.forward_mode)
            return None
        ctx = self._context(runner)
        ctx.ape = [ape.get(i) for i in range(len(batch.reqs))]
        return ApeServe(runner, ctx)

    def _context(self, runner, probe_layer: int | None = None) -> BlendContext:
        return BlendContext(kernel=self.kernel or default_kernel(runner.device), probe_layer=probe_layer)

    def _forward(self, runner, batch, rows, ctx: BlendContext) -> None:
        replay = _blend_batch(batch, runner, rows)
        fb = sgl.ForwardBatch.init_new(replay, runner, capture_hidden_mode=sgl.CaptureHiddenMode.NULL,
                                       return_hidden_states_before_norm=False)
        positions = [p for _, _, row_positions in rows for p in row_positions]
        fb.positions = torch.tensor(positions, dtype=fb.positions.dtype, device=fb.positions.device)
        with amem_backend_of(runner).serving(ctx), _eager(runner), _layer_range(runner.model, ctx.layers_run()):
            runner.forward(fb)


class Fold:
    """A batch's blend pass folded into its own extend (amem_sgl.blend.fold): ``forward`` runs the
    batch's forward on the folded copy, its attention served by the seam."""

    def __init__(self, blender: BlendRunner, runner, batch, rows, folded, ctx: BlendContext, ape=None) -> None:
        self.blender, self.runner, self.batch, self.rows, self.folded, self.ctx = blender, runner, batch, rows, folded, ctx
        self.ape = ape or {}  # {request index: APE setting} (amem_sgl.blend.ape)

    def forward(self, original, worker, args, kwargs):
        """``original`` (the worker's forward) on the folded batch. Should the seam find the fold
        unusable before it stores anything (FoldError), the blend pass runs on its own and then
        the batch's forward, as without folding."""
        args, kwargs = _with_batch(args, kwargs, self.folded)
        try:
            with amem_backend_of(self.runner).serving(self.ctx):
                return original(worker, *args, **kwargs)
        except FoldError:
            logger.exception("amem: folded blend pass unusable; running it as a separate pass")
            self.blender.cache.stats.blend_failures += 1
        if self.rows:
            self.blender._forward(self.runner, self.batch, self.rows, self.blender._context(self.runner))
        args, kwargs = _with_batch(args, kwargs, self.batch)
        serve = self.blender._ape_serve(self.runner, self.batch, self.ape)
        return serve.forward(original, worker, args, kwargs) if serve else original(worker, *args, **kwargs)


class ApeServe:
    """A batch's own forward run inside the seam (``serving(ctx)``, eagerly) so that the requests in
    ``ctx.ape`` attend to their spliced chunks by APE's rule; the seam stores the extend's KV and
    attends by position as the stock extend does for the others."""

    def __init__(self, runner, ctx: BlendContext) -> None:
        self.runner, self.ctx = runner, ctx

    def forward(self, original, worker, args, kwargs):
        with amem_backend_of(self.runner).serving(self.ctx), _eager(self.runner):
            return original(worker, *args, **kwargs)


APE_ATTR = "amem_ape"  # on a Req whose extend attended by APE: its setting, for its decode steps


def _mark_ape(batch, ape: dict) -> None:
    for i, part in ape.items():
        setattr(batch.reqs[i], APE_ATTR, part)


class ApeDecode:
    """A decode batch's forward with APE's rule for some requests (``AmemAttnBackend.decoding``),
    eagerly: SGLang's decode graph (CUDA, or the CPU graph) is set aside for it."""

    def __init__(self, runner, parts: list) -> None:
        self.runner, self.parts = runner, parts

    def forward(self, original, worker, args, kwargs):
        graphs = getattr(self.runner, "decode_cuda_graph_runner", None)
        if graphs is not None:
            self.runner.decode_cuda_graph_runner = None
        try:
            with amem_backend_of(self.runner).decoding(self.parts):
                return original(worker, *args, **kwargs)
        finally:
            if graphs is not None:
                self.runner.decode_cuda_graph_runner = graphs


def _with_batch(args, kwargs, batch):
    if "batch" in kwargs:
        return args, {**kwargs, "batch": batch}
    return (batch, *args[1:]), kwargs


@contextlib.contextmanager
def _eager(runner):
    """Run the model eagerly: set the prefill CUDA-graph runner aside (SGLang checks it for None)."""
    graphs = getattr(runner, "prefill_cuda_graph_runner", None)
    if graphs is not None:
        runner.prefill_cuda_graph_runner = None
    try:
        yield
    finally:
        if graphs is not None:
            runner.prefill_cuda_graph_runner = graphs


@contextlib.contextmanager
def _layer_range(model, layers: int | None):
    """Run only the first ``layers`` decoder layers (the model's own pipeline layer range, which its
    forward loops over); without a range to cut, every layer runs and the seam skips attention and
    stores nothing past the probe layer."""
    inner = getattr(model, "model", None)
    if layers is None or inner is None or not isinstance(getattr(inner, "end_layer", None), int):
        yield
        return
    end = inner.end_layer
    inner.end_layer = min(end, inner.start_layer + layers)
    try:
        yield
    finally:
        inner.end_layer = end


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
    KV as it stands (answers may drift from a full prefill), the error is logged and counted.
    A spliced request's usage record gets the batch's extend time and the stamp of its end."""
    backend = amem_backend_of(worker.model_runner)
    blender = backend.blender if backend is not None else None
    if blender is None:
        return original(worker, *args, **kwargs)
    batch = kwargs["batch"] if "batch" in kwargs else (args[0] if args else None)
    fold = None
    try:
        fold = blender.run(worker, batch, fold=True, capture_hidden_mode=kwargs.get("capture_hidden_mode"))
    except Exception:  # noqa: BLE001 -- serving goes on; the failure is visible in stats and log
        blender.cache.stats.blend_failures += 1
        logger.exception("amem: blend pass failed; serving these requests on their spliced KV")
    extend = batch is not None and batch.forward_mode.is_extend()
    for req in getattr(batch, "reqs", None) or () if extend else ():
        blender.cache.timing_record(req)  # chunk requests admitted without a splice: their phases
    timed = [req for req in getattr(batch, "reqs", None) or () if usage_of(req) is not None] if extend else []
    started = clock() if timed else 0.0
    if fold is None and not extend:
        try:
            fold = blender.decode(worker, batch)  # APE's rule on decode steps too
        except Exception:  # noqa: BLE001 -- as a failing blend pass: served plainly, counted
            blender.cache.stats.blend_failures += 1
            logger.exception("amem: APE decode setup failed; decoding these requests plainly")
    result = fold.forward(original, worker, args, kwargs) if fold is not None else original(worker, *args, **kwargs)
    if timed:
        done = clock()
        for req in timed:
            add_timing(req, "extend_s", done - started)
            stamp(req, "done_at", done)
    return result
