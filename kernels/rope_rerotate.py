"""RoPE re-rotation of cached keys: K[dst] <- R(delta) . K[src], gathered and scattered in one pass.

Keys are stored after RoPE, so a key computed at position p and moved to position p + delta needs one
more rotation by delta: R(delta) R(p) k = R(p + delta) k. The rotation uses the model's own cos/sin
table (``cat(cos, sin)`` rows, as SGLang's RotaryEmbedding builds it), so frequency scaling
(llama3, linear, YaRN) is whatever the model does. Tables that fold a magnitude into cos/sin (YaRN's
mscale) are normalised by row 0 (position 0: cos = mscale, sin = 0), so the rotation stays a pure
rotation. Negative deltas use cos(-a) = cos(a), sin(-a) = -sin(a).

* :func:`rope_rerotate` -- the launcher: validates, then runs the Triton kernel (compiled on CUDA;
  the Triton interpreter on CPU when asked) or the torch reference. ``check=False`` skips the
  index-value checks (the part that reads device memory back) for indices already checked by
* :func:`check_rerotate_indices` -- those checks alone, e.g. on a splice plan's CPU index tensors
  once, before they go to the device.
* :func:`rope_rerotate_reference` -- the torch reference (also the CPU serving path).

Layouts: ``is_neox=True`` rotates pairs (j, j + rotary_dim/2) (Llama, Qwen, ...); ``False`` rotates
interleaved pairs (2j, 2j+1) (GPT-J). Dims past ``rotary_dim`` are copied unchanged.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._launch import KernelCache

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _rope_rerotate_kernel(
    src_ptr,  # K source buffer [slots, heads, head_dim] (last dim contiguous)
    dst_ptr,  # K destination buffer, same layout (may be src_ptr)
    src_slots_ptr,  # int64 [n_tokens]: slot read for token t
    dst_slots_ptr,  # int64 [n_tokens]: slot written for token t
    delta_ptr,  # int64 [n_tokens]: new position - old position
    cos_sin_ptr,  # fp32 [max_pos, rotary_dim]: cat(cos, sin) per position
    n_tokens,
    num_heads,
    src_stride_slot,
    src_stride_head,
    dst_stride_slot,
    dst_stride_head,
    cs_stride,
    ROT_HALF: tl.constexpr,  # rotary_dim // 2
    PASS_START: tl.constexpr,  # rotary_dim: first dim copied unchanged
    PASS_DIMS: tl.constexpr,  # head_dim - rotary_dim
    IS_NEOX: tl.constexpr,
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK_H: tl.constexpr,  # >= num_heads, power of two
    BLOCK_R: tl.constexpr,  # >= ROT_HALF, power of two
    BLOCK_P: tl.constexpr,  # >= PASS_DIMS, power of two (1 when there are none)
):
    pid = tl.program_id(0)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.arange(0, BLOCK_H)
    r = tl.arange(0, BLOCK_R)
    t_ok = t < n_tokens
    src_slot = tl.load(src_slots_ptr + t, mask=t_ok, other=0)
    dst_slot = tl.load(dst_slots_ptr + t, mask=t_ok, other=0)
    delta = tl.load(delta_ptr + t, mask=t_ok, other=0)
    neg = delta < 0
    dist = tl.where(neg, -delta, delta)

    # cos/sin at |delta|, normalised by position 0's cos (the table's magnitude, 1 unless scaled).
    r_ok = r < ROT_HALF
    cs_mask = t_ok[:, None] & r_ok[None, :]
    cos = tl.load(cos_sin_ptr + dist[:, None] * cs_stride + r[None, :], mask=cs_mask, other=1.0)
    sin = tl.load(cos_sin_ptr + dist[:, None] * cs_stride + ROT_HALF + r[None, :], mask=cs_mask, other=0.0)
    scale = tl.load(cos_sin_ptr + r, mask=r_ok, other=1.0)
    cos = cos / scale[None, :]
    sin = tl.where(neg[:, None], -sin, sin) / scale[None, :]

    if IS_NEOX:
        first = r
        second = r + ROT_HALF
    else:
        first = 2 * r
        second = 2 * r + 1
    mask = t_ok[:, None, None] & (h < num_heads)[None, :, None] & r_ok[None, None, :]
    src_row = src_slot[:, None, None] * src_stride_slot + h[None, :, None] * src_stride_head
    dst_row = dst_slot[:, None, None] * dst_stride_slot + h[None, :, None] * dst_stride_head
    x1 = tl.load(src_ptr + src_row + first[None, None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src_ptr + src_row + second[None, None, :], mask=mask, other=0.0).to(tl.float32)
    c = cos[:, None, :]
    s = sin[:, None, :]
    out_ty = dst_ptr.dtype.element_ty
    tl.store(dst_ptr + dst_row + first[None, None, :], (x1 * c - x2 * s).to(out_ty), mask=mask)
    tl.store(dst_ptr + dst_row + second[None, None, :], (x2 * c + x1 * s).to(out_ty), mask=mask)

    if PASS_DIMS > 0:
        p = tl.arange(0, BLOCK_P)
        p_mask = t_ok[:, None, None] & (h < num_heads)[None, :, None] & (p < PASS_DIMS)[None, None, :]
        rest = tl.load(src_ptr + src_row + PASS_START + p[None, None, :], mask=p_mask, other=0.0)
        tl.store(dst_ptr + dst_row + PASS_START + p[None, None, :], rest, mask=p_mask)


_KERNEL = KernelCache(_rope_rerotate_kernel)


def _validate(k_src, k_dst, src_slots, dst_slots, delta, cos_sin_cache, rotary_dim, check: bool = True) -> None:
    """Shapes, dtypes, devices and layouts (no device->host reads), then -- with ``check`` -- the
    index values (:func:`check_rerotate_indices`: one read-back on a GPU)."""
    for name, k in (("k_src", k_src), ("k_dst", k_dst)):
        if k.dim() != 3:
            raise ValueError(f"{name} must be [slots, heads, head_dim], got shape {tuple(k.shape)}")
        if k.stride(-1) != 1:
            raise ValueError(f"{name}'s last dim must be contiguous, got strides {k.stride()}")
        if k.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} dtype {k.dtype} unsupported; use one of {SUPPORTED_DTYPES}")
    if k_src.shape[1:] != k_dst.shape[1:] or k_src.dtype != k_dst.dtype or k_src.device != k_dst.device:
        raise ValueError(f"k_src {tuple(k_src.shape)} {k_src.dtype} {k_src.device} and k_dst "
                         f"{tuple(k_dst.shape)} {k_dst.dtype} {k_dst.device} must match past dim 0")
    _check_index_layout(src_slots, dst_slots, delta, k_src.device)
    head_dim = k_src.shape[2]
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise ValueError(f"rotary_dim must be even and in (0, head_dim={head_dim}], got {rotary_dim}")
    if (cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != rotary_dim
            or cos_sin_cache.dtype != torch.float32 or not cos_sin_cache.is_contiguous()):
        raise ValueError(f"cos_sin_cache must be contiguous fp32 [max_pos, rotary_dim={rotary_dim}], "
                         f"got {tuple(cos_sin_cache.shape)} {cos_sin_cache.dtype}")
    if cos_sin_cache.device != k_src.device:
        raise ValueError(f"cos_sin_cache is on {cos_sin_cache.device}, K on {k_src.device}")
    if check:
        check_rerotate_indices(src_slots, dst_slots, delta, src_num_slots=k_src.shape[0],
                               dst_num_slots=k_dst.shape[0], table_positions=cos_sin_cache.shape[0],
                               in_place=k_src.data_ptr() == k_dst.data_ptr())


def _check_index_layout(src_slots, dst_slots, delta, device=None) -> None:
    n = src_slots.numel()
    device = src_slots.device if device is None else device
    for name, v in (("src_slots", src_slots), ("dst_slots", dst_slots), ("delta", delta)):
        if v.dim() != 1 or v.numel() != n:
            raise ValueError(f"{name} must be 1-D with {n} entries, got shape {tuple(v.shape)}")
        if v.dtype != torch.int64:
            raise TypeError(f"{name} must be int64, got {v.dtype}")
        if v.device != device:
            raise ValueError(f"{name} is on {v.device}, K on {device}")
        if not v.is_contiguous():
            raise ValueError(f"{name} must be contiguous")


def check_rerotate_indices(src_slots: torch.Tensor, dst_slots: torch.Tensor, delta: torch.Tensor, *,
                           src_num_slots: int, dst_num_slots: int | None = None, table_positions: int,
                           in_place: bool = True) -> None:
    """The index-value checks of :func:`rope_rerotate`: slots in range, no repeated destination,
    |delta| within the cos/sin table, and (``in_place``: K read and written in one buffer) destinations
    either equal to the sources or disjoint from them. Raises as the launcher does.

    Every statistic is gathered into one tensor and read once, so on device tensors this costs one
    device->host sync; on CPU tensors none. Callers that reuse one set of indices (every layer of a
    splice) call this once -- best on the host-side CPU tensors, before they are copied to the
    device -- and launch with ``rope_rerotate(..., check=False)``."""
    _check_index_layout(src_slots, dst_slots, delta)
    dst_num_slots = src_num_slots if dst_num_slots is None else dst_num_slots
    n = src_slots.numel()
    if n == 0:
        return
    dst_sorted = torch.sort(dst_slots).values
    stats = [delta.abs().max(), src_slots.min(), src_slots.max(), dst_sorted[0], dst_sorted[-1],
             (dst_sorted[1:] == dst_sorted[:-1]).any()]
    if in_place:
        # dst in src by binary search over the sorted sources (on CPU, 4K tokens, one thread: 0.6 ms
        # against torch.isin's 1.5 ms).
        src_sorted = torch.sort(src_slots).values
        hit = src_sorted[torch.searchsorted(src_sorted, dst_slots).clamp_(max=n - 1)] == dst_slots
        stats += [(src_slots != dst_slots).any() & hit.any()]
    max_dist, src_lo, src_hi, dst_lo, dst_hi, repeats, *overlap = torch.stack(
        [t.to(torch.int64) for t in stats]).tolist()
    if max_dist >= table_positions:
        raise ValueError(f"|delta| up to {max_dist} exceeds the cos/sin table ({table_positions} positions)")
    for name, lo, hi, size in (("src_slots", src_lo, src_hi, src_num_slots), ("dst_slots", dst_lo, dst_hi, dst_num_slots)):
        if lo < 0 or hi >= size:
            raise IndexError(f"{name} out of range [0, {size})")
    if repeats:
        raise ValueError("dst_slots must not repeat a slot")
    if overlap and overlap[0]:
        raise ValueError("in-place re-rotation needs dst_slots == src_slots or disjoint slot sets "
                         "(a token's source would be overwritten by another's result)")


def rope_rerotate(
    k_src: torch.Tensor,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    delta: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    *,
    rotary_dim: int,
    is_neox: bool = True,
    k_dst: torch.Tensor | None = None,
    backend: str = "auto",
    check: bool = True,
) -> torch.Tensor:
    """Rotate K[src_slots] by ``delta`` positions into K_dst[dst_slots]; returns ``k_dst``.

    ``k_dst`` defaults to ``k_src`` (in place). ``backend``: "auto" (Triton on CUDA, torch on CPU),
    "triton" (on CPU: the Triton interpreter, for tests), or "torch" (the reference).

    ``check`` (default on): validate the index values (:func:`check_rerotate_indices`, one
    device->host sync on a GPU). ``check=False`` keeps the shape/dtype/device checks (no sync) and
    skips the value checks: only for indices already checked with :func:`check_rerotate_indices`
    against this K buffer's slot count and table -- an out-of-range slot then reads or writes
    outside the buffer.
    """
    k_dst = k_src if k_dst is None else k_dst
    _validate(k_src, k_dst, src_slots, dst_slots, delta, cos_sin_cache, rotary_dim, check)
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be auto, triton or torch, got {backend!r}")
    n = src_slots.numel()
    if n == 0:
        return k_dst
    if backend == "torch" or (backend == "auto" and k_src.device.type != "cuda"):
        k_dst[dst_slots] = _rotated(k_src[src_slots], delta, cos_sin_cache, rotary_dim, is_neox)
        return k_dst

    num_heads, head_dim = k_src.shape[1], k_src.shape[2]
    block_h = triton.next_power_of_2(num_heads)
    block_r = triton.next_power_of_2(rotary_dim // 2)
    pass_dims = head_dim - rotary_dim
    # ~4K elements per half-tile on GPU; the interpreter pays per program, so it gets large tiles.
    budget = 4096 if k_src.device.type == "cuda" else 1 << 16
    block_t = max(1, min(triton.next_power_of_2(n), budget // (block_h * block_r)))
    grid = (triton.cdiv(n, block_t),)
    _KERNEL.for_device(k_src.device)[grid](
        k_src, k_dst, src_slots, dst_slots, delta, cos_sin_cache,
        n, num_heads,
        k_src.stride(0), k_src.stride(1), k_dst.stride(0), k_dst.stride(1),
        cos_sin_cache.stride(0),
        ROT_HALF=rotary_dim // 2, PASS_START=rotary_dim, PASS_DIMS=pass_dims, IS_NEOX=is_neox,
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_R=block_r,
        BLOCK_P=triton.next_power_of_2(pass_dims) if pass_dims else 1,
    )
    return k_dst


class Rotation:
    """Keys [n, heads, head_dim] rotated by ``delta`` [n] positions, computed in fp32 and returned in
    the keys' dtype; the cos/sin rows (the table normalised by its row 0) are gathered once, so one
    Rotation serves every layer of a splice.

    Written as multiply + fused multiply-add into a preallocated output (4 passes over the keys
    instead of ~12 for the plain expression): 1.6x faster on CPU, where this is the serving path."""

    def __init__(self, delta: torch.Tensor, cos_sin_cache: torch.Tensor, rotary_dim: int, is_neox: bool) -> None:
        half = rotary_dim // 2
        scale = cos_sin_cache[0, :half]
        rows = cos_sin_cache[delta.abs()]
        self.cos = (rows[:, :half] / scale)[:, None, :]
        self.sin = (rows[:, half:] / scale * torch.where(delta < 0, -1.0, 1.0)[:, None])[:, None, :]
        self.half, self.rotary_dim, self.is_neox = half, rotary_dim, is_neox

    def __call__(self, keys: torch.Tensor) -> torch.Tensor:
        half, rotary_dim, cos, sin = self.half, self.rotary_dim, self.cos, self.sin
        x = keys.to(torch.float32)
        out = x.clone() if rotary_dim < x.shape[-1] else torch.empty_like(x)  # pass-through dims kept
        if self.is_neox:
            x1, x2 = x[..., :half], x[..., half:rotary_dim]
            o1, o2 = out[..., :half], out[..., half:rotary_dim]
        else:
            x1, x2 = x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]
            o1, o2 = out[..., 0:rotary_dim:2], out[..., 1:rotary_dim:2]
        torch.mul(x1, cos, out=o1)
        o1.addcmul_(x2, sin, value=-1.0)
        torch.mul(x2, cos, out=o2)
        o2.addcmul_(x1, sin)
        return out.to(keys.dtype)


def _rotated(keys: torch.Tensor, delta: torch.Tensor, cos_sin_cache: torch.Tensor, rotary_dim: int,
             is_neox: bool) -> torch.Tensor:
    """keys [n, heads, head_dim] rotated by delta [n] (:class:`Rotation`)."""
    return Rotation(delta, cos_sin_cache, rotary_dim, is_neox)(keys)


def rope_rerotate_reference(k_src, src_slots, dst_slots, delta, cos_sin_cache, *, rotary_dim,
                            is_neox=True, k_dst=None) -> torch.Tensor:
    """Torch reference: the same contract as :func:`rope_rerotate`, written plainly."""
    k_dst = k_src if k_dst is None else k_dst
    k_dst[dst_slots] = _rotated(k_src[src_slots], delta, cos_sin_cache, rotary_dim, is_neox)
    return k_dst
