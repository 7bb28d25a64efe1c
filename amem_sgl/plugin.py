"""SGLang plugin entry point (group ``sglang.srt.plugins``, name ``amem``).

SGLang calls :func:`load` in every one of its processes (HTTP server, scheduler, detokenizer)
before it builds anything. It registers the ``amem`` radix-cache backend with
``register_radix_cache_backend`` and adds the tree's stats to the scheduler's internal-state
readback. Nothing here imports the model or allocates memory.
"""

from __future__ import annotations

import logging
import os

from amem_sgl import cpu_linear, sglang_compat as sgl
from amem_sgl.cache import ChunkRadixCache
from amem_sgl.cache.chunk_radix_cache import USAGE_KEY, ChunkSupport
from amem_sgl.blend.backend import amem_backend_of
from amem_sgl.cache.splice import find_rope, self_check
from amem_sgl.config import CONFIG_ENV, AmemConfig

logger = logging.getLogger(__name__)

BACKEND_NAME = "amem"
_loaded = False


def build_chunk_radix_cache(ctx: sgl.TreeCacheBuildContext) -> ChunkRadixCache:
    """Radix-cache factory for ``--radix-cache-backend amem``."""
    unsupported = [
        flag
        for flag, on in (
            ("a hybrid sliding-window model", ctx.is_hybrid_swa),
            ("a hybrid state-space model", ctx.is_hybrid_ssm),
            ("--enable-hierarchical-cache (amem tiers KV itself)", ctx.enable_hierarchical_cache),
        )
        if on
    ]
    if unsupported:
        raise ValueError(
            "--radix-cache-backend amem supports full-attention transformer models only; "
            f"not supported here: {', '.join(unsupported)}"
        )
    cache = ChunkRadixCache(ctx.params, chunks=chunk_support(ctx, AmemConfig.from_env()))
    address = os.environ.get("AMEM_SGL_RESIDENCY_ADDR")
    if address and cache.chunk_reuse_enabled:
        from amem_sgl.residency.client import ResidencyClient

        config = AmemConfig.from_env().residency
        cache.residency = ResidencyClient(address, os.environ["AMEM_SGL_RESIDENCY_SHM"], timeout_s=config.timeout_s)
        logger.info("amem: residency service at %s (chunk KV written through to CPU/disk tiers)", address)
    if getattr(ctx.server_args, "enable_metrics", False):
        from amem_sgl.metrics import AmemMetrics

        cache.metrics = AmemMetrics(_model_id(ctx))
    if cache.chunks.blend_available and cache.chunk_reuse_enabled:
        from amem_sgl.blend.runner import BlendRunner

        # The blend runner hangs off this worker's attention seam (one per model runner).
        amem_backend_of(getattr(ctx.tp_worker, "model_runner", None)).blender = BlendRunner(cache)
    logger.info(
        "amem: ChunkRadixCache built (model=%s, page_size=%d, kv pool=%s tokens, radix cache %s)",
        ctx.model_config.model_path if ctx.model_config is not None else "?",
        cache.page_size,
        ctx.params.token_to_kv_pool_allocator.size if ctx.params.token_to_kv_pool_allocator else "?",
        "disabled" if cache.disable else "enabled",
    )
    return cache


def chunk_support(ctx: sgl.TreeCacheBuildContext, config: AmemConfig) -> ChunkSupport:
    """Chunk reuse for this server: on when configured, the KV pool is a plain MHA pool, and the
    loaded model's RoPE re-rotation passes the startup self-check; otherwise off, with the reason."""
    allocator = ctx.params.token_to_kv_pool_allocator
    kv_pool = allocator.get_kvcache() if allocator is not None else None
    model_runner = getattr(ctx.tp_worker, "model_runner", None)
    model_id = _model_id(ctx)
    max_tokens = config.chunks.max_chunk_tokens
    if not config.chunks.enabled:
        return ChunkSupport(kv_pool, None, model_id, False, "disabled by amem.chunks.enabled", max_tokens)
    tp_size = int(getattr(ctx, "tp_size", 1) or 1)
    if tp_size > 1:
        # Each rank's pool holds its own heads and its own tree; splice and restore decisions must
        # then agree across ranks, which is not built or tested yet: serve without chunk reuse.
        reason = (f"chunk reuse supports tensor parallelism 1 only (this server runs --tp-size {tp_size}); "
                  "requests with amem.chunks are served as ordinary prefills")
        logger.error("amem: %s", reason)
        return ChunkSupport(kv_pool, None, model_id, False, reason, max_tokens, tp_size=tp_size)
    if type(kv_pool) is not sgl.MHATokenToKVPool or model_runner is None:
        reason = f"KV pool {type(kv_pool).__name__} / model runner {type(model_runner).__name__} unsupported"
        logger.warning("amem: chunk reuse disabled: %s", reason)
        return ChunkSupport(kv_pool, None, model_id, False, reason, max_tokens)
    blend_default = config.blend.to_policy()
    # Blend and probe passes run in amem's attention seam (torch path on CPU, Triton on CUDA).
    blend_available = amem_backend_of(model_runner) is not None
    rope = find_rope(model_runner.model)
    check = self_check(rope, kv_pool.dtype, kv_pool.head_num)
    if not check.passed:
        reason = (f"RoPE re-rotation self-check FAILED for {model_id}: max relative error "
                  f"{check.max_relative_error:.3g} > {check.tolerance:.3g} ({check.detail})")
        logger.error("amem: %s; chunk reuse disabled", reason)
        return ChunkSupport(kv_pool, rope, model_id, False, reason, max_tokens)
    logger.info("amem: blend %s (default policy %s)", "available" if blend_available else
                "unavailable: the model runner's attention backend is not wrapped by amem's seam "
                "(amem_sgl.blend.backend.WRAPPED_BACKENDS)", blend_default.label)
    reason = (f"RoPE re-rotation self-check passed: max relative error {check.max_relative_error:.3g} "
              f"<= {check.tolerance:.3g} ({check.detail})")
    logger.info("amem: %s; chunk reuse enabled", reason)
    return ChunkSupport(kv_pool, rope, model_id, True, reason, max_tokens, blend_default, blend_available,
                        tp_rank=int(getattr(ctx, "tp_rank", 0) or 0), tp_size=tp_size)


def _model_id(ctx: sgl.TreeCacheBuildContext) -> str:
    served = getattr(ctx.server_args, "served_model_name", None)
    if served:
        return str(served)
    return str(ctx.model_config.model_path) if ctx.model_config is not None else "unknown-model"


def _publish_tree_state(scheduler, state: dict) -> None:
    tree = getattr(scheduler, "tree_cache", None)
    if isinstance(tree, ChunkRadixCache):
        state["amem"] = tree.describe()
    else:
        state["amem"] = {"tree_cache": type(tree).__name__, "active": False}
    state["amem"]["cpu_linear"] = cpu_linear.describe()


def _request_level_usage(original, streamer, key: str) -> bool:
    return key == USAGE_KEY or original(streamer, key)


def _response_usage(original, *args, **kwargs):
    """AROUND hook for the OpenAI routes' usage: adds ``usage.amem`` (spliced / recomputed / probed /
    extended tokens, namespace, policy) when the request used chunk KV.

    A memory turn with n > 1 is SGLang's parallel sampling: a prefix request (its response never
    reaches the route) and n copies with rids of their own. Its ``usage.amem`` sums the records of
    all of them as the HTTP process kept them under the turn (amem_sgl.memory.timings): what the
    server did for the turn (the /metrics counters), the prompt counted once as ``prompt_tokens``."""
    from amem_sgl.metrics import merge_usage

    from amem_sgl.memory import timings
    from amem_sgl.memory.openai_routes import memory_usage, turn_timings

    usage = original(*args, **kwargs)
    responses = kwargs.get("responses", args[0] if args else [])
    n = kwargs.get("n_choices", args[1] if len(args) > 1 else 1) or 1
    records = [responses[i]["meta_info"].get(USAGE_KEY) for i in range(0, len(responses), n)]
    rid = timings.turn_rid(responses[0]["meta_info"].get("id")) if responses else None
    recalled = memory_usage(rid)
    if recalled is not None:
        kept = timings.records_for(rid)
        records = kept if kept is not None else [r for rec in records if rec for r in rec]
        merged = {**(merge_usage([records]) or {"spliced_tokens": 0, "recomputed_tokens": 0}),
                  "memory": recalled, "timings": turn_timings(rid, records)}
    else:
        merged = merge_usage(records)
    if merged is not None:
        usage.amem = merged
    return usage


def load() -> None:
    """Register amem with SGLang; idempotent within a process."""
    global _loaded
    if _loaded:
        return
    if sgl.get_radix_cache_factory(BACKEND_NAME) is None:
        sgl.register_radix_cache_backend(BACKEND_NAME, build_chunk_radix_cache)
    sgl.add_internal_state_hook(_publish_tree_state)
    sgl.add_around_hook(sgl.REQUEST_LEVEL_INFO_TARGET, _request_level_usage)
    # Behaviour changes only in servers amem's launcher started (it sets CONFIG_ENV): a plain
    # `python -m sglang.launch_server` in the same environment stays stock SGLang.
    if os.environ.get(CONFIG_ENV):
        from amem_sgl.blend.backend import wrap_attention_factories
        from amem_sgl.blend.runner import around_forward

        # amem's attention seam: the stock backends' factories, wrapped (amem_sgl.blend.backend).
        wrap_attention_factories(linear_extend=AmemConfig.from_env().attention.linear_extend)
        sgl.add_around_hook(sgl.WORKER_FORWARD_TARGET, around_forward)
        if AmemConfig.from_env().model.packed_linear:
            cpu_linear.install()  # CPU bf16 linears on pre-packed weights (same values as F.linear)
    if os.environ.get(CONFIG_ENV):
        sgl.allow_usage_extension_fields()
        sgl.add_around_hook(sgl.RESPONSE_USAGE_TARGET, _response_usage)
        from amem_sgl.memory.openai_routes import around_chat_conversion, around_completion_conversion

        sgl.add_around_hook(sgl.CHAT_CONVERSION_TARGET, around_chat_conversion)
        sgl.add_around_hook(sgl.COMPLETION_CONVERSION_TARGET, around_completion_conversion)
    _loaded = True
