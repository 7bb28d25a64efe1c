"""Microbenchmark: kernels.rope_rerotate against copies of the same bytes measured in the same run.

Shape: one Llama-3-8B layer of K (8 KV heads x 128 dims, bf16), n tokens gathered from random slots
and scattered to other random slots, one position delta per 512-token chunk (as splicing does).
The fewest bytes the operation must move: K read once + K written once + the slot/delta indices.

Ceilings, measured here on the same tensors:
* copy    -- a contiguous device-to-device copy of the same K bytes (read + write);
* gather  -- ``k[dst] = k[src]``: the same gather/scatter without the rotation.

Two timings of the re-rotation through the public launcher: ``rerotate`` with its default index
checks (``check=True``: slot ranges, repeats, |delta| against the table, gathered into one
device->host read per call), and ``kernel`` with ``check=False`` (the launch alone, as a caller that
checked its indices once per splice plan calls it: the number to hold against the copy ceiling).
``check_overhead_ms`` is their difference; ``host_check_ms`` is what that once-per-plan check
(:func:`kernels.rope_rerotate.check_rerotate_indices`) costs on the plan's CPU index tensors.
Input sets rotate and together exceed 4x a large L2 (50 MB), so no timing reads a warm cache.

On CUDA the Triton kernel is timed with ``triton.testing.do_bench`` (median); on CPU the torch path
(the serving path there) is timed with a host clock (median of repeats). Every run is checked first
against a float64 reference on fresh random inputs, with the destination poisoned beforehand.

    python -m benchmarks.kernels.bench_rope_rerotate [--tokens 4096 8192 16384 32768] [--save]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.fidelity import device_name
from kernels.rope_rerotate import check_rerotate_indices, rope_rerotate

RESULTS = Path(__file__).resolve().parents[1] / "results"
HEADS, HEAD_DIM, CHUNK = 8, 128, 512
L2_FLUSH_BYTES = 200 * 2**20  # input sets together exceed this: 4x the L2 of an H100/H200


def table(rotary_dim: int, max_pos: int = 65536, base: float = 500000.0, device="cpu") -> torch.Tensor:
    inv = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv)
    return torch.cat((freqs.cos(), freqs.sin()), -1).float().contiguous().to(device)


def make_inputs(n: int, dtype, device, gen, heads: int = HEADS, head_dim: int = HEAD_DIM):
    k = torch.randn(2 * n + 1, heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    perm = torch.randperm(2 * n + 1, generator=gen)
    src, dst = perm[:n].to(device), perm[n:2 * n].to(device)
    per_chunk = torch.randint(-30000, 30000, (-(-n // CHUNK),), generator=gen)
    delta = per_chunk.repeat_interleave(CHUNK)[:n].contiguous().to(device)
    return k, src, dst, delta


def check(n: int, dtype, device, backend: str, cs: torch.Tensor, gen, heads: int = HEADS,
          head_dim: int = HEAD_DIM) -> float:
    """Relative error against a float64 reference; every destination element must be written."""
    k, src, dst, delta = make_inputs(n, dtype, device, gen, heads, head_dim)
    k[dst] = float("nan")  # poison
    out = rope_rerotate(k, src, dst, delta, cs, rotary_dim=head_dim, backend=backend)[dst].double()
    x = k[src].double()
    half = head_dim // 2
    rows = cs[delta.abs()].double()
    sign = torch.where(delta < 0, -1.0, 1.0).double()[:, None, None]
    cos, sin = rows[:, None, :half], rows[:, None, half:] * sign
    ref = torch.cat((x[..., :half] * cos - x[..., half:] * sin, x[..., half:] * cos + x[..., :half] * sin), -1)
    assert not torch.isnan(out).any(), "an output element was not written"
    return ((out - ref).norm() / ref.norm()).item()


def timer(device):
    if device.type == "cuda":
        import triton

        return lambda fn: triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median") * 1e-3

    def host(fn, repeats: int = 9):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return host


def run(tokens: list[int], device: torch.device, sets: int = 3) -> list[dict]:
    backend = "triton" if device.type == "cuda" else "torch"
    dtype = torch.bfloat16
    cs = table(HEAD_DIM, device=device)
    gen = torch.Generator().manual_seed(int(time.time()))
    measure = timer(device)
    rows = []
    for n in tokens:
        error = check(n, dtype, device, backend, cs, gen)
        set_bytes = (2 * n + 1) * HEADS * HEAD_DIM * torch.finfo(dtype).bits // 8
        n_sets = max(sets, -(-L2_FLUSH_BYTES // set_bytes)) if device.type == "cuda" else sets
        inputs = [make_inputs(n, dtype, device, gen) for _ in range(n_sets)]  # rotate: no warm cache
        state = {"i": 0}

        def pick():
            state["i"] = (state["i"] + 1) % n_sets
            return inputs[state["i"]]

        def rerotate(check: bool = True):
            k, src, dst, delta = pick()
            rope_rerotate(k, src, dst, delta, cs, rotary_dim=HEAD_DIM, backend=backend, check=check)

        host_idx = [tuple(t.cpu() for t in ins[1:]) for ins in inputs]

        def host_check():
            src, dst, delta = host_idx[state["i"]]
            state["i"] = (state["i"] + 1) % n_sets
            check_rerotate_indices(src, dst, delta, src_num_slots=2 * n + 1, table_positions=cs.shape[0])

        def gather():
            k, src, dst, _ = pick()
            k[dst] = k[src]

        flat = [(k[:n].clone(), torch.empty_like(k[:n])) for k, *_ in inputs]

        def copy():
            a, b = flat[state["i"]]
            state["i"] = (state["i"] + 1) % n_sets
            b.copy_(a)

        k_bytes = n * HEADS * HEAD_DIM * torch.finfo(dtype).bits // 8
        moved = 2 * k_bytes + 3 * n * 8
        t_rot, t_gather, t_copy = measure(rerotate), measure(gather), measure(copy)
        t_kernel = measure(lambda: rerotate(check=False))
        t_host = timer(torch.device("cpu"))(host_check)
        gbs = lambda t, b=moved: b / t / 1e9  # noqa: E731
        rows.append({
            "tokens": n, "backend": backend, "rel_error_vs_fp64": error,
            "rerotate_ms": t_rot * 1e3, "rerotate_GBps": gbs(t_rot),
            "kernel_ms": t_kernel * 1e3, "kernel_GBps": gbs(t_kernel),
            "check_overhead_ms": (t_rot - t_kernel) * 1e3, "host_check_ms": t_host * 1e3,
            "kernel_pct_of_contiguous_copy": 100 * gbs(t_kernel) / gbs(t_copy, 2 * k_bytes),
            "gather_copy_GBps": gbs(t_gather), "contiguous_copy_GBps": gbs(t_copy, 2 * k_bytes),
            "pct_of_contiguous_copy": 100 * gbs(t_rot) / gbs(t_copy, 2 * k_bytes),
            "pct_of_gather_copy": 100 * gbs(t_rot) / gbs(t_gather),
        })
    return rows


def report(rows: list[dict], head: list[str], title: str, name: str, command: str, save: bool) -> None:
    """Print the rows as a markdown table; with ``save`` also write results/<date>-<device>-<name>.{json,md}."""
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[h]:.4g}" if isinstance(r[h], float) else str(r[h]) for h in head) + " |")
    print("\n".join(lines))
    if save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stem = RESULTS / f"{dt.date.today().isoformat()}-{device_name()}-{name}"
        stem.with_suffix(".json").write_text(json.dumps({"device": device_name(), "rows": rows}, indent=2))
        stem.with_suffix(".md").write_text("\n".join(lines) + f"\n\nCommand: `{command}`\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/<date>-<device>-rope-rerotate.*")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = run(args.tokens, device)
    head = ["tokens", "backend", "rel_error_vs_fp64", "rerotate_ms", "rerotate_GBps", "kernel_ms", "kernel_GBps",
            "check_overhead_ms", "host_check_ms",
            "gather_copy_GBps", "contiguous_copy_GBps", "pct_of_contiguous_copy", "kernel_pct_of_contiguous_copy",
            "pct_of_gather_copy"]
    report(rows, head, f"rope_rerotate on {device_name()} (8 KV heads x 128, bf16; rerotate = check=True, "
           "kernel = check=False)", "rope-rerotate",
           "python -m benchmarks.kernels.bench_rope_rerotate --save", args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
