"""The GPU kernels compile for real NVIDIA GPUs (sm_80, sm_90) on this CPU-only machine.

Triton compiles ahead of time with no GPU present: ``triton.compile(ASTSource(fn, signature,
constexprs), target=GPUTarget("cuda", cc, 32))`` runs the whole pipeline down to a cubin. The
compile happens in a child process (tests/kernels/aot_worker.py) started without
``TRITON_INTERPRET``: tests/conftest.py turns the interpreter on for this session on machines
without a GPU, and Triton reads that switch at import (``triton.jit`` then returns interpreter
objects), so in-process compilation would test the wrong thing.

Checked for both kernels, at the shapes serving uses (SmolLM2-135M: 3 KV heads x 64, 9 query
heads; Llama-3-8B: 8 KV heads x 128, 32 query heads), bf16, fp16 and fp32, sm_80 and sm_90:
* a cubin is produced for the requested architecture;
* where the kernel calls ``tl.dot`` on 16-bit inputs the PTX uses tensor-core instructions
  (``mma.sync`` on sm_80, ``wgmma.mma_async`` on sm_90) whose operands are the inputs' own type
  (bf16 / f16, not tf32); on fp32 inputs the dots are exact fp32 (``input_precision="ieee"``: FMA,
  no tf32 MMA); where the kernel has no dot, no MMA appears;
* the kernel fits the architecture: shared memory within the per-block limit of the data-centre
  part (A100: 163 KiB, H100/H200: 227 KiB), and no local memory (spills) in the PTX.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
MODELS = ("smollm2-135m", "llama-3-8b")
DTYPES = ("bf16", "fp16", "fp32")
ARCHS = ("sm_80", "sm_90")
KERNELS = ("rope_rerotate", "blend_attention")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out.parent / "triton-cache")  # a real compile every time, not a cache hit
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.aot_worker", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())
    return {(r["kernel"], r["model"], r["dtype"], r["arch"]): r for r in rows}


def _types(instr: str) -> list[str]:
    """The D (accumulator), A, B[, C] types of an mma/wgmma instruction:
    ``mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32`` and
    ``wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16`` -> ``["f32", "bf16", "bf16", ...]``."""
    parts = instr.split(".")
    shape = next(i for i, p in enumerate(parts) if p.startswith("m") and "n" in p and "k" in p)
    return [p for p in parts[shape + 1:] if p not in ("row", "col")]


def _operand_type(instr: str) -> str:
    return _types(instr)[1]


def test_every_variant_was_compiled(compiled):
    assert set(compiled) == {(k, m, d, a) for k in KERNELS for m in MODELS for d in DTYPES for a in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_compiles_for_real_gpus(compiled, kernel, model, dtype, arch):
    row = compiled[(kernel, model, dtype, arch)]
    assert row["ok"], f"{kernel} {model} {dtype} {arch} does not compile:\n{row.get('traceback') or row.get('error')}"
    assert row["cubin_bytes"] > 1000
    assert row["ptx_target"].startswith(arch)  # sm_90 compiles as sm_90a (wgmma needs the 'a' target)
    assert row["shared_bytes"] <= SHARED_LIMIT[arch], f"{row['shared_bytes']} B of shared memory per block"
    assert not row["local_memory"], "the PTX declares local memory (register spills or stack arrays)"
    if row["dots_in_source"] and dtype == "fp32":
        assert row["tensor_core_instrs"] == [], "fp32 dots must be ieee (FMA), not tf32 MMA"
        assert row["fp32_fma_count"] > 0
    elif row["dots_in_source"]:
        wanted = "wgmma.mma_async" if arch == "sm_90" else "mma.sync"
        assert any(i.startswith(wanted) for i in row["tensor_core_instrs"]), row["tensor_core_instrs"]
        assert row["tensor_core_count"] >= row["dots_in_source"]
    else:
        assert row["tensor_core_instrs"] == []


def test_the_blend_kernel_calls_tl_dot(compiled):
    """The tensor-core check above is not vacuous: the attention kernel has its two matrix products."""
    assert all(compiled[("blend_attention", m, d, a)]["dots_in_source"] == 2
               for m in MODELS for d in DTYPES for a in ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
def test_blend_kernel_uses_16_bit_mma_for_16_bit_inputs(compiled, arch):
    """bf16/fp16 q, k, v reach the tensor cores in their own type (fp32 accumulation): full MMA rate.
    Casting them to fp32 first made Triton emit tf32 MMA (half the rate, twice the shared memory:
    131 KiB per block for Llama-3-8B on sm_90, 80.5 KiB now)."""
    for model in MODELS:
        for dtype in ("bf16", "fp16"):
            row = compiled[("blend_attention", model, dtype, arch)]
            types = {_operand_type(i) for i in row["tensor_core_instrs"]}
            assert types == {"bf16" if dtype == "bf16" else "f16"}, (model, dtype, types)
            assert not any("tf32" in i for i in row["tensor_core_instrs"]), row["tensor_core_instrs"]
            assert {_types(i)[0] for i in row["tensor_core_instrs"]} == {"f32"}, row["tensor_core_instrs"]  # fp32 acc


@pytest.mark.parametrize("arch", ARCHS)
def test_blend_kernel_keeps_fp32_inputs_exact(compiled, arch):
    """fp32 inputs: the dots run as ieee fp32 (FMA), never tf32 MMA, so a GPU matches the fp32
    reference to ~1e-5 rather than tf32's ~3e-4."""
    for model in MODELS:
        row = compiled[("blend_attention", model, "fp32", arch)]
        assert row["tensor_core_instrs"] == [] and row["fp32_fma_count"] > 0, (model, row["tensor_core_instrs"])
