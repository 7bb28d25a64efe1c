"""Microbenchmark: kernels.blend_attention against dense attention and a copy of the same bytes.

Shape: one Llama-3-8B layer (32 query heads, 8 KV heads x 128 dims, bf16), one sequence of n keys in
random KV-pool slots. Two query sets:
* ``blend``  -- 15% of the positions, scattered (a blend pass's recomputed tokens);
* ``extend`` -- the last 512 positions (an ordinary extend over a cached prefix).

Compared in the same run, on the same logical problem:
* ``sdpa``  -- torch's scaled_dot_product_attention over the same keys already gathered into
  contiguous K/V with the KV heads expanded to the query heads (``enable_gqa`` with a mask would
  leave CUDA only its math kernel), with the position mask (the dense-attention baseline; on CUDA
  its memory-efficient kernel);
* ``copy``  -- a contiguous device copy of the K+V bytes the kernel must read (the bandwidth ceiling).

On CUDA the Triton kernel is timed with ``triton.testing.do_bench`` (median), its arguments checked
once before (``check=False``, ``max_q_len`` given: no host reads inside the timed call); on CPU the torch
reference (there is no compiled Triton) with a host clock. Every shape is checked against the
reference on fresh random inputs first.

    python -m benchmarks.kernels.bench_blend_attention [--keys 8192 16384 32768] [--save]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.nn.functional import scaled_dot_product_attention

from benchmarks.fidelity import device_name
from benchmarks.kernels.bench_rope_rerotate import report, timer
from kernels.blend_attention import blend_attention, blend_attention_reference


HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def make_inputs(n_keys: int, queries: str, device, gen, dtype=torch.bfloat16):
    slots = torch.randperm(n_keys + 64, generator=gen)[:n_keys]
    k_cache = torch.randn(n_keys + 64, KV_HEADS, HEAD_DIM, generator=gen).to(device=device, dtype=dtype)
    v_cache = torch.randn(n_keys + 64, KV_HEADS, HEAD_DIM, generator=gen).to(device=device, dtype=dtype)
    if queries == "blend":
        q_pos = torch.sort(torch.randperm(n_keys, generator=gen)[: max(1, int(0.15 * n_keys))]).values
    else:
        q_pos = torch.arange(max(n_keys - 512, 0), n_keys)
    q = torch.randn(q_pos.shape[0], HEADS, HEAD_DIM, generator=gen).to(device=device, dtype=dtype)
    lens = (torch.tensor([q_pos.shape[0]], device=device), torch.tensor([n_keys], device=device))
    return q, k_cache, v_cache, q_pos.to(device), lens[0], slots.to(device), lens[1]


def run(keys: list[int], device: torch.device) -> list[dict]:
    backend = "triton" if device.type == "cuda" else "torch"
    gen = torch.Generator().manual_seed(int(time.time()))
    measure = timer(device)
    rows = []
    for n in keys:
        for queries in ("blend", "extend"):
            case = make_inputs(n, queries, device, gen)
            q, k_cache, v_cache, q_pos, q_lens, slots, kv_lens = case
            got = blend_attention(*case, backend=backend).float()
            want = blend_attention_reference(*case).float()
            error = ((got - want).norm() / want.norm()).item()
            group = HEADS // KV_HEADS
            k = k_cache[slots].repeat_interleave(group, dim=1).transpose(0, 1)[None]
            v = v_cache[slots].repeat_interleave(group, dim=1).transpose(0, 1)[None]
            mask = torch.arange(n, device=device)[None, :] <= q_pos[:, None]
            qt = q.transpose(0, 1)[None]
            flat = torch.cat([k_cache[slots], v_cache[slots]]).contiguous()
            dst = torch.empty_like(flat)
            longest = int(q_lens.max())
            t_kernel = measure(lambda: blend_attention(*case, backend=backend, check=False, max_q_len=longest))
            t_sdpa = measure(lambda: scaled_dot_product_attention(qt, k, v, attn_mask=mask))
            t_copy = measure(lambda: dst.copy_(flat))
            kv_bytes = flat.numel() * flat.element_size()
            gbs = kv_bytes / t_kernel / 1e9
            rows.append({
                "keys": n, "queries": queries, "n_queries": int(q.shape[0]), "backend": backend,
                "rel_error_vs_reference": error, "kernel_ms": t_kernel * 1e3, "sdpa_ms": t_sdpa * 1e3,
                "kernel_over_sdpa_time": t_kernel / t_sdpa, "kv_read_GBps": gbs,
                "copy_GBps": 2 * kv_bytes / t_copy / 1e9, "pct_of_copy": 100 * gbs / (2 * kv_bytes / t_copy / 1e9),
            })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, nargs="+", default=None,
                        help="sequence lengths (default 8192 16384 32768 on CUDA, 2048 4096 on CPU)")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/<date>-<device>-blend-attention.*")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    keys = args.keys or ([8192, 16384, 32768] if device.type == "cuda" else [2048, 4096])
    rows = run(keys, device)
    head = ["keys", "queries", "n_queries", "backend", "rel_error_vs_reference", "kernel_ms", "sdpa_ms",
            "kernel_over_sdpa_time", "kv_read_GBps", "copy_GBps", "pct_of_copy"]
    report(rows, head, f"blend_attention on {device_name()} (32 q heads, 8 KV heads x 128, bf16)",
           "blend-attention", "python -m benchmarks.kernels.bench_blend_attention --save", args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
