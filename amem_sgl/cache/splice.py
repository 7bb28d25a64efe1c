"""Moving chunk KV to new positions: the model's RoPE, its startup self-check, and the copy.

K is stored after RoPE, so a chunk's keys computed at canonical positions [c, c+n) and spliced at
[p, p+n) are rotated by delta = p - c (kernels.rope_rerotate); V is copied as is.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from kernels.rope_rerotate import Rotation, check_rerotate_indices, rope_rerotate

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """The loaded model's rotary embedding, as re-rotation needs it."""

    module: torch.nn.Module  # the model's RotaryEmbedding (for the self-check)
    table: torch.Tensor  # fp32 [max_pos, rotary_dim] cat(cos, sin), from the model's own formula
    rotary_dim: int
    head_size: int
    is_neox: bool


def find_rope(model: torch.nn.Module) -> RopeSpec | None:
    """The first rotary embedding in ``model`` (all layers of a Llama-family model share one)."""
    for module in model.modules():
        if hasattr(module, "cos_sin_cache") and hasattr(module, "_compute_cos_sin_cache"):
            if getattr(module, "position_start", 0) != 0:
                return None
            table = module._compute_cos_sin_cache().to(torch.float32)
            table = table.to(module.cos_sin_cache.device).contiguous()
            return RopeSpec(module, table, int(module.rotary_dim), int(module.head_size),
                            bool(module.is_neox_style))
    return None


# Largest relative error accepted between a re-rotated key and the model's own key at the new
# position. bf16 keys carry 8 significant bits (2^-8 = 0.004 relative), and both sides are rounded.
SELF_CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@dataclasses.dataclass(frozen=True)
class SelfCheck:
    passed: bool
    max_relative_error: float
    tolerance: float
    detail: str


def self_check(rope: RopeSpec | None, dtype: torch.dtype, num_heads: int, seed: int = 0) -> SelfCheck:
    """Keys rotated by the model at positions p, re-rotated by delta, against the model at p+delta."""
    if rope is None:
        return SelfCheck(False, float("inf"), 0.0, "no rotary embedding found in the model")
    device = rope.table.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = 64
    raw = torch.randn(n, num_heads * rope.head_size, generator=gen).to(device=device, dtype=dtype)
    max_pos = rope.table.shape[0]
    old = torch.randint(0, max_pos // 2, (n,), generator=gen).to(device)
    new = torch.randint(0, max_pos // 2, (n,), generator=gen).to(device)
    with torch.no_grad():
        _, k_old = rope.module.forward_native(old, torch.zeros_like(raw), raw.clone())
        _, k_new = rope.module.forward_native(new, torch.zeros_like(raw), raw.clone())
    idx = torch.arange(n, device=device)
    moved = rope_rerotate(k_old.reshape(n, num_heads, rope.head_size).clone(), idx, idx, new - old, rope.table,
                          rotary_dim=rope.rotary_dim, is_neox=rope.is_neox)
    want = k_new.reshape(n, num_heads, rope.head_size).float()
    error = ((moved.float() - want).abs().max() / want.abs().max()).item()
    tolerance = SELF_CHECK_TOLERANCE.get(dtype, 1e-4)
    return SelfCheck(error <= tolerance, error, tolerance,
                     f"{type(rope.module).__name__} rotary_dim={rope.rotary_dim} neox={rope.is_neox} "
                     f"dtype={dtype}")


def pool_layers(kv_pool) -> range:
    """The layer ids whose KV ``kv_pool`` holds."""
    return range(kv_pool.start_layer, kv_pool.start_layer + kv_pool.layer_num)


def copy_kv(kv_pool, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
    """Copy every layer's KV from ``src_slots`` to ``dst_slots`` as is (same positions)."""
    for layer in pool_layers(kv_pool):
        k, v = kv_pool.get_key_buffer(layer), kv_pool.get_value_buffer(layer)
        k[dst_slots] = k[src_slots]
        v[dst_slots] = v[src_slots]


def splice_kv(kv_pool, src_slots: torch.Tensor, dst_slots: torch.Tensor, delta: torch.Tensor,
              rope: RopeSpec) -> None:
    """Copy every layer's KV from ``src_slots`` to ``dst_slots``, keys rotated by ``delta``. The
    index values are checked once for all layers (every layer's K buffer has the pool's slot count):
    per layer they cost a sort and a device->host read each (30 of them for SmolLM2).

    On CPU the rotation's cos/sin rows are gathered once for all layers (:class:`Rotation`), and
    each layer is one gather, the rotation, one ``index_copy_`` for K and one for V: the same
    values as ``rope_rerotate``'s torch path layer by layer, 2.5x faster (30 layers, 750 tokens,
    one thread). On CUDA each layer is one launch of the Triton kernel."""
    layers = pool_layers(kv_pool)
    if not len(layers) or src_slots.numel() == 0:
        return
    k = kv_pool.get_key_buffer(layers[0])
    check_rerotate_indices(src_slots, dst_slots, delta, src_num_slots=k.shape[0],
                           table_positions=rope.table.shape[0], in_place=True)
    rotation = Rotation(delta, rope.table, rope.rotary_dim, rope.is_neox) if k.device.type != "cuda" else None
    for layer in layers:
        k, v = kv_pool.get_key_buffer(layer), kv_pool.get_value_buffer(layer)
        if rotation is None:
            rope_rerotate(k, src_slots, dst_slots, delta, rope.table, rotary_dim=rope.rotary_dim,
                          is_neox=rope.is_neox, check=False)
        else:
            k.index_copy_(0, dst_slots, rotation(k.index_select(0, src_slots)))
        v.index_copy_(0, dst_slots, v.index_select(0, src_slots))
