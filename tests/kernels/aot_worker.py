"""Compile the project's Triton kernels ahead of time for real NVIDIA GPUs (no GPU needed).

Run as ``python -m tests.kernels.aot_worker OUT.json`` in an interpreter started WITHOUT
``TRITON_INTERPRET``: tests/conftest.py sets ``TRITON_INTERPRET=1`` on machines without a GPU, and
Triton reads that switch when it is imported (``triton.jit`` then hands back interpreter objects and
the interpreter patches ``tl`` builtins), so the compile runs in this separate process with the
variable removed. ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` lowers
through TTIR -> TTGIR -> LLVM IR -> PTX -> cubin (ptxas ships inside the triton wheel); nothing
touches a driver.

For every (kernel, model shape, dtype, arch) it writes one JSON row: whether a cubin came out, its
size, the tensor-core instructions in the PTX (``mma.sync...`` on sm_80, ``wgmma.mma_async...`` on
sm_90), the operand types of those instructions, how many ``tl.dot`` calls the kernel's source has,
how many fp32 FMAs it has, whether the PTX declares local memory (register spills / stack arrays),
and the error if it failed. ``python -m tests.kernels.aot_worker OUT.json blend_attention`` compiles
one kernel only.

The launch parameters mirror the launchers (kernels/rope_rerotate.py, kernels/blend_attention.py):
block sizes from the same formulas, pointers and 16-multiple integers marked 16-divisible as
Triton's runtime specialisation marks them for real tensors.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
import traceback

# Shapes serving uses: (name, kv_heads, query_heads, head_dim).
MODELS = (("smollm2-135m", 3, 9, 64), ("llama-3-8b", 8, 32, 128))
DTYPES = ("bf16", "fp16", "fp32")
ARCHS = (80, 90)
TC_RE = re.compile(r"\b((?:wgmma\.)?mma(?:_async)?\.sync\.aligned\.[\w.]+)")


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def rope_variant(kv_heads: int, head_dim: int, dtype: str):
    """Signature/constexprs of kernels.rope_rerotate._rope_rerotate_kernel as rope_rerotate() launches it
    on CUDA (full rotary dim, NeoX pairs: Llama and SmolLM2)."""
    from kernels.rope_rerotate import _rope_rerotate_kernel

    block_h, block_r = _next_pow2(kv_heads), _next_pow2(head_dim // 2)
    n_tokens = 8192
    block_t = max(1, min(_next_pow2(n_tokens), 4096 // (block_h * block_r)))
    sig = {"src_ptr": f"*{dtype}", "dst_ptr": f"*{dtype}", "src_slots_ptr": "*i64", "dst_slots_ptr": "*i64",
           "delta_ptr": "*i64", "cos_sin_ptr": "*fp32", "n_tokens": "i32", "num_heads": "i32",
           "src_stride_slot": "i32", "src_stride_head": "i32", "dst_stride_slot": "i32",
           "dst_stride_head": "i32", "cs_stride": "i32"}
    ints = {"n_tokens": n_tokens, "num_heads": kv_heads, "src_stride_slot": kv_heads * head_dim,
            "src_stride_head": head_dim, "dst_stride_slot": kv_heads * head_dim, "dst_stride_head": head_dim,
            "cs_stride": head_dim}
    constexprs = {"ROT_HALF": head_dim // 2, "PASS_START": head_dim, "PASS_DIMS": 0, "IS_NEOX": True,
                  "BLOCK_T": block_t, "BLOCK_H": block_h, "BLOCK_R": block_r, "BLOCK_P": 1}
    return _rope_rerotate_kernel, sig, ints, constexprs


def blend_variant(kv_heads: int, q_heads: int, head_dim: int, dtype: str):
    """Signature/constexprs of kernels.blend_attention._blend_attention_kernel as blend_attention()
    launches it (default block_m = block_n = 64; fp32 dot operands only for fp32 inputs on a GPU)."""
    from kernels.blend_attention import _blend_attention_kernel

    sig = {name: f"*{dtype}" for name in ("q_ptr", "k_ptr", "v_ptr", "o_ptr")}
    sig.update({name: "*i64" for name in ("q_pos_ptr", "q_starts_ptr", "q_lens_ptr", "kv_slots_ptr",
                                          "kv_starts_ptr", "kv_lens_ptr")})
    sig["scale"] = "fp32"
    ints = {"q_stride_t": q_heads * head_dim, "q_stride_h": head_dim, "k_stride_s": kv_heads * head_dim,
            "k_stride_h": head_dim, "v_stride_s": kv_heads * head_dim, "v_stride_h": head_dim,
            "o_stride_t": q_heads * head_dim, "o_stride_h": head_dim}
    sig.update({name: "i32" for name in ints})
    constexprs = {"GROUP": q_heads // kv_heads, "HEAD_DIM": head_dim, "BLOCK_D": _next_pow2(head_dim),
                  "BLOCK_M": 64, "BLOCK_N": 64, "DOT_F32": dtype == "fp32"}
    return _blend_attention_kernel, sig, ints, constexprs


def compile_one(kernel: str, model: tuple, dtype: str, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, kv_heads, q_heads, head_dim = model
    if kernel == "rope_rerotate":
        fn, sig, ints, constexprs = rope_variant(kv_heads, head_dim, dtype)
    else:
        fn, sig, ints, constexprs = blend_variant(kv_heads, q_heads, head_dim, dtype)
    row = {"kernel": kernel, "model": name, "dtype": dtype, "arch": f"sm_{arch}",
           "dots_in_source": len(re.findall(r"\btl\.dot\(", inspect.getsource(fn)))}
    jitted = triton.jit(fn)
    signature = {arg: ("constexpr" if arg in constexprs else sig[arg]) for arg in jitted.arg_names}
    attrs = {}
    for i, arg in enumerate(jitted.arg_names):
        if sig.get(arg, "").startswith("*") or (arg in ints and ints[arg] % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    try:
        compiled = triton.compile(ASTSource(fn=jitted, signature=signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32))
    except Exception as err:  # noqa: BLE001 -- the failure is the finding: report it whole
        row.update(ok=False, error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-4000:])
        return row
    ptx = compiled.asm["ptx"]
    tc = TC_RE.findall(ptx)
    row.update(ok=True, cubin_bytes=len(compiled.asm.get("cubin", b"")),
               ptx_target=(re.search(r"^\.target\s+(\S+)", ptx, re.M) or [None, None])[1],
               tensor_core_instrs=sorted(set(tc)), tensor_core_count=len(tc),
               operand_types=sorted({m.split(".")[-1] for m in tc}),
               fp32_fma_count=len(re.findall(r"\bfma\.rn\.f32\b", ptx)),
               local_memory=bool(re.search(r"\.local\b", ptx)),
               num_warps=compiled.metadata.num_warps, shared_bytes=compiled.metadata.shared)
    return row


def main(argv: list[str], only: str | None = None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("run without TRITON_INTERPRET (the interpreter replaces the compiler)", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    rows = [compile_one(kernel, model, dtype, arch) for kernel in ("rope_rerotate", "blend_attention")
            for model in MODELS for dtype in DTYPES for arch in ARCHS if only in (None, kernel)]
    with open(argv[0], "w") as fh:
        json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:2], *sys.argv[2:3]))  # OUT.json [KERNEL]
