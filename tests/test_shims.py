"""The CPU shims installed by install/install.sh, exercised in fresh interpreters (as SGLang's
spawned processes get them): import-time behaviour cannot be tested inside this process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, **env))


def test_the_pth_hook_is_installed_and_active_at_startup():
    result = run_python("""
        import sys, amem_cpu_shims
        print(any(type(f).__name__ == "_ShimFinder" for f in sys.meta_path))
    """)
    assert result.stdout.strip() == "True", result.stderr


def test_sgl_kernel_standin_raises_naming_the_function_and_records_the_call(tmp_path):
    log = tmp_path / "calls.log"
    result = run_python("""
        import sgl_kernel
        from sgl_kernel.flash_attn import flash_attn_varlen_func
        assert sgl_kernel.IS_AMEM_CPU_STANDIN
        for fn, args in ((sgl_kernel.rmsnorm, (1, 2)), (flash_attn_varlen_func, ())):
            try:
                fn(*args)
            except sgl_kernel.SglKernelUnavailable as e:
                print("raised:", e)
            else:
                raise SystemExit("stand-in did not raise")
    """, AMEM_SGL_KERNEL_CALL_LOG=str(log))
    assert result.returncode == 0, result.stderr
    assert "sgl_kernel.rmsnorm() was called" in result.stdout
    assert "sgl_kernel.flash_attn.flash_attn_varlen_func() was called" in result.stdout
    recorded = [line.split(" ", 1)[1] for line in log.read_text().splitlines()]
    assert recorded == ["sgl_kernel.rmsnorm", "sgl_kernel.flash_attn.flash_attn_varlen_func"]


def test_torchvision_imports_with_cpu_torch_and_its_nms_fails_clearly():
    result = run_python("""
        import torch, torchvision
        boxes = torch.rand(4, 4); scores = torch.rand(4)
        try:
            torch.ops.torchvision.nms(boxes, scores, 0.5)
        except RuntimeError as e:
            print("raised:", e)
    """)
    assert result.returncode == 0, result.stderr
    assert "torchvision::nms is unavailable" in result.stdout


def test_without_the_shims_sglang_cannot_import_here():
    # The reason the shims exist: the same import fails when they are switched off.
    result = run_python("import sglang.srt.server_args", AMEM_DISABLE_CPU_SHIMS="1")
    if result.returncode == 0:
        pytest.skip("this machine's torchvision/sgl_kernel import without help (e.g. CUDA torch)")
    assert "torchvision" in result.stderr or "sgl_kernel" in result.stderr


def test_frontend_picks_chatml_for_smollm_models():
    result = run_python("""
        from sglang.lang.chat_template import get_chat_template_by_model_path
        print(get_chat_template_by_model_path("/cache/SmolLM2-135M-Instruct-0.1.2").name)
        print(get_chat_template_by_model_path("/models/some-unknown-model").name)
    """)
    assert result.stdout.split() == ["chatml", "default"], result.stderr
