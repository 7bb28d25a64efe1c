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


def model_rotary(module: torch.nn.Module, positions: torch.Tensor, query: torch.Tensor,
                 key: torch.Tensor) -> tuple[torch.Tensor, str]:
    """``key`` rotated at ``positions`` by the rotary the model runs on this device: the module's
    dispatched forward (SGLang picks the CUDA kernel on a GPU, ``forward_native`` on this CPU), or
    ``forward_native`` where that forward cannot run outside a model forward (the reason is
    returned). The keys are the model's own only if this is what its layers call."""
    pristine = query.clone(), key.clone()  # the dispatched kernel may rotate in place before failing
    try:
        _, rotated = module(positions, query, key)
        return rotated, "forward"
    except Exception as exc:  # noqa: BLE001 -- any failure of the dispatched kernel: the native formula
        _, rotated = module.forward_native(positions, *pristine)
        return rotated, f"forward_native ({type(exc).__name__}: {exc})"


def self_check(rope: RopeSpec | None, dtype: torch.dtype, num_heads: int, seed: int = 0) -> SelfCheck:
    """Keys rotated by the model at positions p, re-rotated by delta, against the model at p+delta
    (both by the model's own dispatched rotary, :func:`model_rotary`)."""
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
        k_old, how = model_rotary(rope.module, old, torch.zeros_like(raw), raw.clone())
        k_new, how_new = model_rotary(rope.module, new, torch.zeros_like(raw), raw.clone())
    if how_new != how:  # one side fell back: the two sides ran different rotaries; say both
        how = f"{how} at the old positions, {how_new} at the new"
    idx = torch.arange(n, device=device)
    moved = rope_rerotate(k_old.reshape(n, num_heads, rope.head_size).clone(), idx, idx, new - old, rope.table,
                          rotary_dim=rope.rotary_dim, is_neox=rope.is_neox)
    want = k_new.reshape(n, num_heads, rope.head_size).float()
    error = ((moved.float() - want).abs().max() / want.abs().max()).item()
    tolerance = SELF_CHECK_TOLERANCE.get(dtype, 1e-4)
    return SelfCheck(error <= tolerance, error, tolerance,
                     f"{type(rope.module).__name__} rotary_dim={rope.rotary_dim} neox={rope.is_neox} "
                     f"dtype={dtype} via {how}")


def pool_layers(kv_pool) -> range:
    """The layer ids whose KV ``kv_pool`` holds."""
    return range(kv_pool.start_layer, kv_pool.start_layer + kv_pool.layer_num)


def copy_kv(kv_pool, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
    """Copy every layer's KV from ``src_slots`` to ``dst_slots`` as is (same positions)."""
    for layer in pool_layers(kv_pool):
        k, v = kv_pool.get_key_buffer(layer), kv_pool.get_value_buffer(layer)
        k[dst_slots] = k[src_slots]
        v[dst_slots] = v[src_slots]


# A splice whose (source, destination, delta) rows form at most this many runs -- consecutive
# sources, consecutive destinations, one delta: a chunk spliced into freshly allocated slots -- moves
# them as slices (V by memcpy, in-place runs' K too); else one index gather and scatter per layer.
MAX_SPLICE_RUNS = 32


def splice_runs(src_slots: torch.Tensor, dst_slots: torch.Tensor, delta: torch.Tensor,
                max_runs: int = MAX_SPLICE_RUNS) -> list[tuple[int, int, int, int]] | None:
    """(first source, first destination, count, delta) runs of the rows, or None when they break
    into more than ``max_runs`` (or live on a device)."""
    if src_slots.device.type != "cpu" or src_slots.numel() == 0:
        return None
    breaks = ((src_slots[1:] - src_slots[:-1] != 1) | (dst_slots[1:] - dst_slots[:-1] != 1)
              | (delta[1:] != delta[:-1]))
    starts = [0] + (torch.nonzero(breaks).flatten() + 1).tolist()
    if len(starts) > max_runs:
        return None
    ends = starts[1:] + [src_slots.numel()]
    firsts = torch.stack([src_slots[starts], dst_slots[starts], delta[starts]]).tolist()
    return [(s, d, end - start, dl) for s, d, dl, start, end in zip(*firsts, starts, ends)]


def splice_kv(kv_pool, src_slots: torch.Tensor, dst_slots: torch.Tensor, delta: torch.Tensor,
              rope: RopeSpec) -> None:
    """Copy every layer's KV from ``src_slots`` to ``dst_slots``, keys rotated by ``delta``. The
    index values are checked once for all layers (every layer's K buffer has the pool's slot count):
    per layer they cost a sort and a device->host read each (30 of them for SmolLM2).

    On CPU the rotation's cos/sin rows are gathered once for all layers (:class:`Rotation`), for
    the rows whose delta is not 0 (rotating by 0 changes no bit: an in-place chunk's keys are
    copied). When the rows form few runs (:func:`splice_runs`, a chunk into fresh slots) V and the
    unrotated keys move as slice copies, else by one index gather and ``index_copy_``; the rotated
    keys are one gather, the rotation and one ``index_copy_`` a layer. The same values as
    ``rope_rerotate``'s torch path layer by layer (tests/test_splice_kv.py); 780 tokens in 4 chunks
    (one in place) over 30 layers, 2 threads: ``python -m benchmarks.cpu_micro``. On CUDA each layer
    is one launch of the Triton kernel."""
    layers = pool_layers(kv_pool)
    if not len(layers) or src_slots.numel() == 0:
        return
    k = kv_pool.get_key_buffer(layers[0])
    check_rerotate_indices(src_slots, dst_slots, delta, src_num_slots=k.shape[0],
                           table_positions=rope.table.shape[0], in_place=True)
    if k.device.type == "cuda":
        for layer in layers:
            k, v = kv_pool.get_key_buffer(layer), kv_pool.get_value_buffer(layer)
            rope_rerotate(k, src_slots, dst_slots, delta, rope.table, rotary_dim=rope.rotary_dim,
                          is_neox=rope.is_neox, check=False)
            v.index_copy_(0, dst_slots, v.index_select(0, src_slots))
        return
    runs = splice_runs(src_slots, dst_slots, delta, MAX_SPLICE_RUNS)
    moved = delta != 0
    rotation = rot_src = rot_dst = None
    if bool(moved.any()):
        rot_src, rot_dst = src_slots[moved], dst_slots[moved]
        rotation = Rotation(delta[moved], rope.table, rope.rotary_dim, rope.is_neox)
    still = [(s, d, n) for s, d, n, dl in runs if dl == 0] if runs is not None else None
    unmoved = None if still is not None or rotation is None else (src_slots[~moved], dst_slots[~moved])
    for layer in layers:
        k, v = kv_pool.get_key_buffer(layer), kv_pool.get_value_buffer(layer)
        if rotation is not None:
            k.index_copy_(0, rot_dst, rotation(k.index_select(0, rot_src)))
        if runs is not None:
            for s, d, n, _ in runs:
                v[d: d + n].copy_(v[s: s + n])
            for s, d, n in still:
                k[d: d + n].copy_(k[s: s + n])
        else:
            v.index_copy_(0, dst_slots, v.index_select(0, src_slots))
            if rotation is None:
                k.index_copy_(0, dst_slots, k.index_select(0, src_slots))
            elif unmoved is not None and unmoved[0].numel():
                k.index_copy_(0, unmoved[1], k.index_select(0, unmoved[0]))
