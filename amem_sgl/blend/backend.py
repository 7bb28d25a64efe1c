"""The attention seam: amem's attention backend, wrapping the stock one SGLang's model runner builds.

:func:`wrap_attention_factories` re-registers, with SGLang's ``register_attention_backend``, the
factories of the stock backends amem serves (``torch_native`` on CPU; ``triton``, ``flashinfer``,
``fa3`` on CUDA) under their own names: each builds the stock backend and wraps it in
:class:`AmemAttnBackend`. The name stays the stock one on purpose: SGLang 0.5.23 tests the string
``"torch_native"`` in ``utils/common.py`` (``support_triton``), ``mem_cache/allocation.py`` (the
Triton dispatch of ``get_last_loc``), ``arg_groups/attention_hook.py`` (CUDA graphs off) and
``validation_hook.py``; a new name would turn those CPU decisions the wrong way.

The wrapper delegates everything (attributes, metadata, decode, CUDA graphs) to the stock backend,
except:

* a forward run inside ``serving(ctx)`` with a :class:`~amem_sgl.blend.context.BlendContext` (a
  blend or probe pass, run eagerly by amem_sgl.blend.runner): it stores the tokens' KV and attends by position
  itself -- the linear-cost torch path (amem_sgl.blend.attention.extend_attention) on CPU, the
  Triton ``kernels.blend_attention`` kernel on CUDA -- and at a probe's check layer records the key
  (or value) deviation, stores nothing (or, for a staged CacheBlend probe, the fresh KV) and returns
  zeros; a query probe also sums the question's attention per key position at every layer
  (amem_sgl.blend.attention.attention_mass: plain torch, the same on CPU and CUDA; the probe's
  attention output itself takes the device's path above);
* a batch's own extend run inside ``serving(ctx)`` (folded with a blend pass, or on its own for an
  APE policy): the same, and the rows of sequences with an APE setting (``ctx.ape``) then get APE's
  correction for their spliced chunks added (amem_sgl.blend.ape);
* a decode forward run inside ``decoding(parts)``: the stock decode attention, then APE's
  correction for the requests that have an APE setting (their spliced chunks);
* on CPU, torch_native's extend attention is the linear-cost one (set on this backend instance, no
  class-wide hook): cached prefixes are not re-attended as a square.

The blend runner (what runs blend passes before an extend batch) hangs off the backend instance
(``blender``), set by the cache factory: no module-global registry keyed by worker ids.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch

from amem_sgl import sglang_compat as sgl
from amem_sgl.blend.ape import apply_ape
from amem_sgl.blend.attention import (ExtendPlan, attention_mass, extend_attention, linear_sdpa_forward_extend,
                                      plan_extend)
from amem_sgl.blend.context import BlendContext, key_deviation

logger = logging.getLogger(__name__)

# Stock backends amem wraps (MHA, KV pool [slots, kv_heads, head_dim]); others stay stock.
WRAPPED_BACKENDS = ("torch_native", "triton", "flashinfer", "fa3")


class FoldError(RuntimeError):
    """A folded blend pass could not run as planned; raised before it stored anything."""


class AmemAttnBackend:
    """A stock attention backend plus amem's blend/probe passes; see the module docstring."""

    _OWN = ("inner", "blender", "linear_extend", "active", "decode_ape")

    def __init__(self, inner, *, linear_extend: bool = True) -> None:
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "blender", None)  # amem_sgl.blend.runner.BlendRunner, set by the cache
        object.__setattr__(self, "active", None)  # the BlendContext of the extra forward running now
        object.__setattr__(self, "decode_ape", None)  # per request of the decode batch running now: APE or None
        linear = linear_extend and isinstance(inner, sgl.TorchNativeAttnBackend)
        object.__setattr__(self, "linear_extend", linear)
        if linear:
            inner._run_sdpa_forward_extend = functools.partial(linear_sdpa_forward_extend,
                                                               inner._run_sdpa_forward_extend)

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "inner"), name)

    def __setattr__(self, name, value) -> None:
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    @contextlib.contextmanager
    def serving(self, ctx: BlendContext):
        """Serve every attention call of the forward run inside this block as ``ctx``'s pass.

        The context lives on this backend instance for the block (SGLang's eager runner copies the
        ForwardBatch into its static buffers, so an attribute on the batch would not reach here)."""
        if self.active is not None:
            raise RuntimeError("amem: a blend pass is already running on this attention backend")
        self.active = ctx
        try:
            yield ctx
        finally:
            self.active = None

    @contextlib.contextmanager
    def decoding(self, parts: list):
        """Serve the decode forward run inside this block with APE's rule for the requests whose
        entry of ``parts`` (one per request of the batch) is set: the stock decode attention, then
        APE's correction added (amem_sgl.blend.ape)."""
        self.decode_ape = parts
        try:
            yield
        finally:
            self.decode_ape = None

    def _decode(self, q, k, v, layer, forward_batch, save_kv_cache, kwargs):
        out = self.inner.forward(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        parts = self.decode_ape
        if forward_batch.positions is None or len(parts) != int(forward_batch.seq_lens.shape[0]):
            return out
        pool, heads = self.inner.token_to_kv_pool, layer.tp_q_head_num
        seq_lens = forward_batch.seq_lens
        apply_ape(q.reshape(-1, heads, layer.qk_head_dim), out.view(-1, heads, layer.v_head_dim),
                  pool.get_key_buffer(layer.layer_id), pool.get_value_buffer(layer.layer_id),
                  self.inner.req_to_token_pool.req_to_token, forward_batch.req_pool_indices, seq_lens,
                  seq_lens - 1, torch.ones_like(seq_lens), forward_batch.positions, parts,
                  scaling=layer.scaling, onto_plain=True)
        return out

    def init_forward_metadata(self, forward_batch) -> None:
        ctx = self.active
        if ctx is None:
            self.inner.init_forward_metadata(forward_batch)
            return
        # A blend pass needs no metadata: the seam serves every layer. A folded one needs its rows'
        # true positions (SGLang computed contiguous extend positions); the model reads them next.
        fold = ctx.fold
        if fold is not None and forward_batch.positions is not None:
            if fold.positions.shape != forward_batch.positions.shape:
                raise FoldError(f"amem: folded blend pass of {fold.positions.shape[0]} rows, batch of "
                                   f"{forward_batch.positions.shape[0]}")
            forward_batch.positions = fold.positions.to(forward_batch.positions.device,
                                                        forward_batch.positions.dtype)
            fold.positions_set = True

    def forward(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        ctx = self.active
        if ctx is None:
            if self.decode_ape is not None and forward_batch.forward_mode.is_decode():
                return self._decode(q, k, v, layer, forward_batch, save_kv_cache, kwargs)
            return self.inner.forward(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        return self.blend_forward(ctx, q, k, v, layer, forward_batch, save_kv_cache)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        ctx = self.active
        if ctx is None:
            return self.inner.forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        return self.blend_forward(ctx, q, k, v, layer, forward_batch, save_kv_cache)

    def blend_forward(self, ctx: BlendContext, q, k, v, layer, forward_batch, save_kv_cache: bool = True):
        """One layer of a blend or probe pass (see BlendContext)."""
        if ctx.fold is not None and not ctx.fold.positions_set:  # before anything is stored
            raise FoldError("amem: folded blend pass reached attention without its positions "
                            "(init_forward_metadata was skipped)")
        pool = self.inner.token_to_kv_pool
        layer_id = layer.layer_id
        heads, head_dim = layer.tp_q_head_num, layer.v_head_dim
        out_rows = q.new_zeros(q.shape[0], heads * head_dim)
        if ctx.probe_layer is not None and layer_id >= ctx.probe_layer:
            if layer_id == ctx.probe_layer:
                slots = forward_batch.out_cache_loc
                fresh, buffer = (v, pool.get_value_buffer) if ctx.signal == "value" else (k, pool.get_key_buffer)
                ctx.deviation = key_deviation(fresh, buffer(layer_id)[slots])
                if ctx.store_probe and save_kv_cache:
                    pool.set_kv_buffer(layer, slots, k, v)
            return out_rows  # the probe's output is discarded; nothing (else) stored at or above the layer
        ctx.layers_attended.append(layer_id)
        if save_kv_cache:
            pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
        k_buffer, v_buffer = pool.get_key_buffer(layer_id), pool.get_value_buffer(layer_id)
        query = q.view(-1, heads, layer.qk_head_dim)
        if ctx.score_from is not None:
            ctx.attention_mass = attention_mass(
                query, k_buffer, self.inner.req_to_token_pool.req_to_token, forward_batch.req_pool_indices,
                forward_batch.seq_lens, forward_batch.extend_seq_lens, forward_batch.positions, ctx.score_from,
                scaling=layer.scaling, into=ctx.attention_mass)
        fold = ctx.fold  # folded: each request's recomputed tokens and its extend are separate sequences
        rows = ((fold.req_pool_indices, fold.seq_lens, fold.prefix_lens, fold.extend_lens) if fold is not None else
                (forward_batch.req_pool_indices, forward_batch.seq_lens, forward_batch.extend_prefix_lens,
                 forward_batch.extend_seq_lens))
        req_to_token = self.inner.req_to_token_pool.req_to_token
        if ctx.kernel == "triton":
            from kernels.blend_attention import blend_attention

            slots = ctx.row_slots(req_to_token, forward_batch.req_pool_indices, forward_batch.seq_lens)
            # The pass's rows, positions and slots are those of every layer: checked (host reads) once.
            first = ctx.triton_checked is None
            out = blend_attention(query, k_buffer, v_buffer, forward_batch.positions.to(torch.int64),
                                  forward_batch.extend_seq_lens, slots, forward_batch.seq_lens,
                                  scale=layer.scaling, backend="triton", check=first,
                                  max_q_len=ctx.triton_checked)
            if first:
                ctx.triton_checked = int(forward_batch.extend_seq_lens.max())
            out_rows = out.reshape(q.shape[0], heads * head_dim)
        else:
            extend_attention(query, out_rows.view(-1, heads, head_dim), k_buffer, v_buffer, req_to_token, *rows,
                             scaling=layer.scaling, enable_gqa=heads != layer.tp_k_head_num,
                             positions=forward_batch.positions,
                             plan=self._extend_plan(ctx, forward_batch, req_to_token, rows, query))
        if ctx.ape is not None:  # APE's rule for those sequences' rows (plain torch, CPU and CUDA)
            apply_ape(query, out_rows.view(-1, heads, head_dim), k_buffer, v_buffer, req_to_token, *rows,
                      forward_batch.positions, ctx.ape, scaling=layer.scaling, onto_plain=True)
        return out_rows

    @staticmethod
    def _extend_plan(ctx: BlendContext, forward_batch, req_to_token, rows, query) -> ExtendPlan:
        """The pass's attention plan (masks, row slots): the same at every layer, so made once."""
        positions = forward_batch.positions
        key = (id(forward_batch), None if positions is None else positions.data_ptr())
        if ctx.extend_plan is None or ctx.extend_plan[0] != key:
            ctx.extend_plan = key, plan_extend(req_to_token, *rows, positions, query.device)
        return ctx.extend_plan[1]


def default_kernel(device) -> str:
    """The blend pass's attention on this device: Triton on CUDA, the torch path elsewhere."""
    return "triton" if torch.device(device).type == "cuda" else "torch"


def wrap_attention_factories(*, linear_extend: bool) -> list[str]:
    """Register, under each stock name in WRAPPED_BACKENDS, a factory that wraps the stock one.
    Idempotent; returns the names wrapped."""
    wrapped = []
    for name in WRAPPED_BACKENDS:
        stock = sgl.ATTENTION_BACKENDS.get(name)
        if stock is None:
            continue
        if getattr(stock, "_amem_stock", None) is None:
            def factory(runner, _stock=stock):
                return AmemAttnBackend(_stock(runner), linear_extend=linear_extend)

            factory._amem_stock = stock
            sgl.register_attention_backend(name)(factory)
        wrapped.append(name)
    return wrapped


def amem_backend_of(model_runner) -> AmemAttnBackend | None:
    backend = getattr(model_runner, "attn_backend", None)
    return backend if isinstance(backend, AmemAttnBackend) else None
