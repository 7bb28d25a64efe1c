"""SGLang plugin entry point (group ``sglang.srt.plugins``, name ``amem``).

SGLang calls :func:`load` in every one of its processes (HTTP server, scheduler, detokenizer)
before it builds anything. It registers the ``amem`` radix-cache backend with
``register_radix_cache_backend`` and adds the tree's stats to the scheduler's internal-state
readback. Nothing here imports the model or allocates memory.
"""

from __future__ import annotations

import logging

from amem_sgl import sglang_compat as sgl
from amem_sgl.cache import ChunkRadixCache

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
    cache = ChunkRadixCache(ctx.params)
    logger.info(
        "amem: ChunkRadixCache built (model=%s, page_size=%d, kv pool=%s tokens, radix cache %s)",
        ctx.model_config.model_path if ctx.model_config is not None else "?",
        cache.page_size,
        ctx.params.token_to_kv_pool_allocator.size if ctx.params.token_to_kv_pool_allocator else "?",
        "disabled" if cache.disable else "enabled",
    )
    return cache


def _publish_tree_state(scheduler, state: dict) -> None:
    tree = getattr(scheduler, "tree_cache", None)
    if isinstance(tree, ChunkRadixCache):
        state["amem"] = tree.describe()
    else:
        state["amem"] = {"tree_cache": type(tree).__name__, "active": False}


def load() -> None:
    """Register amem with SGLang; idempotent within a process."""
    global _loaded
    if _loaded:
        return
    if sgl.get_radix_cache_factory(BACKEND_NAME) is None:
        sgl.register_radix_cache_backend(BACKEND_NAME, build_chunk_radix_cache)
    sgl.add_internal_state_hook(_publish_tree_state)
    _loaded = True
