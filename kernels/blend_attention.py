"""Blend attention: queries at arbitrary positions over KV gathered by slot, causal by position.

A blend pass recomputes scattered tokens of a spliced sequence at their true positions, and an
ordinary extend queries the tail of a cached sequence; both are "query i at position p_i attends to
every key of its sequence at position <= p_i", where the sequence's keys live in KV-pool slots
listed in order (key j of sequence b sits at slot ``kv_slots[kv_starts[b] + j]``, position j).

* :func:`blend_attention` -- the launcher: validates, then runs the Triton kernel (compiled on
  CUDA; the Triton interpreter on CPU when asked) or the torch reference.
* :func:`blend_attention_reference` -- the torch reference (fp32 softmax, explicit mask).

The kernel is flash-attention shaped: one program per (block of a sequence's queries, query head),
online softmax over key blocks, keys past the block's last query position skipped. GQA: query head
h reads KV head h // (H / H_kv).

Precision: both ``tl.dot`` calls accumulate in fp32. On a GPU, bf16/fp16 q, k, v go to the tensor
cores in their own dtype (``mma.sync``/``wgmma`` with bf16/f16 operands; P is cast to V's dtype for
P.V, as flash attention does) -- not cast to fp32 first, which Triton would run as tf32 MMA at half
the rate and twice the shared memory. fp32 inputs use ``input_precision="ieee"`` (exact fp32 FMA, no
tf32 rounding), so fp32 results match the fp32 reference. Under the Triton interpreter, where 16-bit
``tl.dot`` is wrong, every operand is cast to fp32 first (``DOT_F32``, chosen by the launcher).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._launch import KernelCache

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _blend_attention_kernel(
    q_ptr,  # [n_queries, heads, head_dim]
    k_ptr,  # K buffer [slots, kv_heads, head_dim]
    v_ptr,  # V buffer [slots, kv_heads, head_dim]
    o_ptr,  # output [n_queries, heads, head_dim]
    q_pos_ptr,  # int64 [n_queries]: position of every query
    q_starts_ptr,  # int64 [batch]: first query row of sequence b
    q_lens_ptr,  # int64 [batch]
    kv_slots_ptr,  # int64: slots of every sequence's keys, concatenated
    kv_starts_ptr,  # int64 [batch]: offset of sequence b in kv_slots
    kv_lens_ptr,  # int64 [batch]
    scale,
    q_stride_t, q_stride_h,
    k_stride_s, k_stride_h,
    v_stride_s, v_stride_h,
    o_stride_t, o_stride_h,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # >= HEAD_DIM, power of two
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per step
    DOT_F32: tl.constexpr,  # cast dot operands to fp32 (fp32 inputs; the interpreter)
):
    m_block = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    kv_head = head // GROUP
    q_start = tl.load(q_starts_ptr + seq)
    q_len = tl.load(q_lens_ptr + seq)
    kv_start = tl.load(kv_starts_ptr + seq)
    kv_len = tl.load(kv_lens_ptr + seq)

    m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    m_ok = m < q_len
    d_ok = d < HEAD_DIM
    rows = q_start + m
    q = tl.load(q_ptr + rows[:, None] * q_stride_t + head * q_stride_h + d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    q_pos = tl.load(q_pos_ptr + rows, mask=m_ok, other=-1)
    # Keys past the block's last query position are masked for every row: stop there.
    last = tl.minimum(tl.max(q_pos, axis=0) + 1, kv_len)

    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, last, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < last
        slots = tl.load(kv_slots_ptr + kv_start + n, mask=n_ok, other=0)
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + slots[:, None] * k_stride_s + kv_head * k_stride_h + d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + slots[:, None] * v_stride_s + kv_head * v_stride_h + d[None, :],
                    mask=kv_mask, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        # fp32 accumulation; "ieee" applies to fp32 operands only (16-bit ones run 16-bit MMA).
        s = tl.dot(q, tl.trans(k), input_precision="ieee", out_dtype=tl.float32) * scale
        visible = (n[None, :] <= q_pos[:, None]) & n_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.exp(s - safe_max[:, None])
        alpha = tl.exp(row_max - safe_max)
        row_sum = row_sum * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee", out_dtype=tl.float32)
        row_max = new_max
    out = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]
    tl.store(o_ptr + rows[:, None] * o_stride_t + head * o_stride_h + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


_KERNEL = KernelCache(_blend_attention_kernel)


def _validate(q, k_cache, v_cache, q_pos, q_lens, kv_slots, kv_lens) -> None:
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 3 or t.stride(-1) != 1:
            raise ValueError(f"{name} must be [rows, heads, head_dim] with a contiguous last dim, "
                             f"got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} dtype {t.dtype} not supported (one of {SUPPORTED_DTYPES})")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    if q.shape[2] != k_cache.shape[2]:
        raise ValueError(f"head_dim of q ({q.shape[2]}) != head_dim of the KV cache ({k_cache.shape[2]})")
    if q.shape[1] % k_cache.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k_cache.shape[1]})")
    for name, t in (("q_pos", q_pos), ("q_lens", q_lens), ("kv_slots", kv_slots), ("kv_lens", kv_lens)):
        if t.dtype not in (torch.int32, torch.int64) or t.dim() != 1:
            raise ValueError(f"{name} must be a 1-D integer tensor")
    if q_pos.shape[0] != q.shape[0] or int(q_lens.sum()) != q.shape[0]:
        raise ValueError("q_pos must give one position per query row and q_lens must sum to the rows")
    if q_lens.shape != kv_lens.shape or int(kv_lens.sum()) != kv_slots.shape[0]:
        raise ValueError("q_lens/kv_lens must have one entry per sequence and kv_lens must sum to kv_slots")
    if q.shape[0] and (int(q_pos.min()) < 0):
        raise ValueError("query positions must be >= 0")


def _dot_in_fp32(q, k_cache, v_cache) -> bool:
    """fp32 dot operands: fp32 (or mixed-dtype) inputs, or the interpreter (inexact 16-bit dot)."""
    same_16_bit = q.dtype == k_cache.dtype == v_cache.dtype != torch.float32
    return not same_16_bit or _KERNEL.interprets(q.device)


def blend_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, q_pos: torch.Tensor,
                    q_lens: torch.Tensor, kv_slots: torch.Tensor, kv_lens: torch.Tensor, *,
                    scale: float | None = None, backend: str = "auto", block_m: int = 64,
                    block_n: int = 64, check: bool = True, max_q_len: int | None = None) -> torch.Tensor:
    """Attention of ``q`` (sequences' query rows, concatenated) over each sequence's keys gathered by
    slot, query at position p seeing keys at positions <= p. Returns [n_queries, heads, head_dim].

    ``backend``: ``"triton"`` (compiled on CUDA, interpreter on CPU), ``"torch"`` (the reference),
    ``"auto"`` (Triton on CUDA, torch elsewhere). ``check=False`` skips the argument checks (three
    device->host reads on CUDA) for a caller that checked the same arguments once; ``max_q_len``
    (the longest sequence's query rows), when given, saves the grid's read of ``q_lens.max()``.
    """
    if check:
        _validate(q, k_cache, v_cache, q_pos, q_lens, kv_slots, kv_lens)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    if backend == "torch":
        return blend_attention_reference(q, k_cache, v_cache, q_pos, q_lens, kv_slots, kv_lens, scale=scale)
    if backend != "triton":
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    out = torch.empty_like(q)
    if q.shape[0] == 0:
        return out
    i64 = dict(dtype=torch.int64, device=q.device)
    q_lens64, kv_lens64 = q_lens.to(**i64), kv_lens.to(**i64)
    q_starts = torch.cumsum(q_lens64, 0) - q_lens64
    kv_starts = torch.cumsum(kv_lens64, 0) - kv_lens64
    heads, head_dim = q.shape[1], q.shape[2]
    longest = int(q_lens64.max()) if max_q_len is None else int(max_q_len)
    grid = (triton.cdiv(longest, block_m), heads, q_lens64.shape[0])
    _KERNEL.for_device(q.device)[grid](
        q, k_cache, v_cache, out, q_pos.to(**i64), q_starts, q_lens64, kv_slots.to(**i64), kv_starts, kv_lens64,
        scale, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0),
        v_cache.stride(1), out.stride(0), out.stride(1),
        GROUP=heads // k_cache.shape[1], HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_F32=_dot_in_fp32(q, k_cache, v_cache))
    return out


def blend_attention_reference(q, k_cache, v_cache, q_pos, q_lens, kv_slots, kv_lens, *, scale=None):
    """Torch reference: per sequence, fp32 scores over the gathered keys, masked by position."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    group = q.shape[1] // k_cache.shape[1]
    out = torch.empty_like(q)
    q_start = kv_start = 0
    for q_len, kv_len in zip(q_lens.tolist(), kv_lens.tolist()):
        slots = kv_slots[kv_start: kv_start + kv_len].long()
        k = k_cache[slots].float().repeat_interleave(group, dim=1)  # [keys, heads, d]
        v = v_cache[slots].float().repeat_interleave(group, dim=1)
        qs = q[q_start: q_start + q_len].float()  # [queries, heads, d]
        scores = torch.einsum("qhd,khd->hqk", qs, k) * scale
        pos = q_pos[q_start: q_start + q_len].long()
        mask = torch.arange(kv_len, device=q.device)[None, :] <= pos[:, None]
        scores = scores.masked_fill(~mask[None], float("-inf"))
        out[q_start: q_start + q_len] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
        q_start += q_len
        kv_start += kv_len
    return out
