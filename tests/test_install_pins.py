"""install/install.sh's pins against SGLang 0.5.23's own metadata: the CPU install pins its own torch
(the CPU wheel), but the ``--gpu`` install must be the CUDA stack SGLang itself requires, or SGLang
fails at import on a CUDA machine (``sgl_kernel``) -- which nothing here can run, so it is read."""

from __future__ import annotations

import importlib.metadata as md
import re
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
INSTALL = (ROOT / "install" / "install.sh").read_text()


def gpu_branch() -> str:
    start = INSTALL.index('elif [ "$gpu" = 1 ]; then')
    return INSTALL[start: INSTALL.index("\nelse\n", start)]


def pins(text: str) -> dict[str, str]:
    """name -> version of every ``name==version`` (extras dropped) in ``text``."""
    return {m.group(1).lower().replace("_", "-"): m.group(2)
            for m in re.finditer(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([0-9][A-Za-z0-9.+-]*)", text)}


def sglang_requires() -> dict[str, str]:
    found = {}
    for line in md.requires("sglang") or []:
        req = Requirement(line)
        if req.marker is not None and "extra" in str(req.marker):
            continue
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if exact:
            found[req.name.lower().replace("_", "-")] = exact[0]
    return found


def test_the_gpu_install_pins_the_cuda_stack_sglang_requires():
    wanted, branch = sglang_requires(), pins(gpu_branch())
    gpu_constraints = pins((ROOT / "install" / "constraints-gpu.txt").read_text())
    for name in ("torch", "sglang-kernel", "flashinfer-python"):
        assert name in wanted, f"sglang no longer pins {name}: re-check install.sh --gpu"
        assert branch.get(name) == wanted[name], (name, branch.get(name), wanted[name])
    assert gpu_constraints["torch"] == wanted["torch"]
    assert "sglang" in branch and branch["sglang"] == md.version("sglang")
    # the CPU companions of torch 2.13.0 are left out of the GPU resolve (torch 2.14.1 brings its own)
    assert "grep -v -E '^(torchvision|triton)=='" in gpu_branch()


def test_the_cpu_install_keeps_its_cpu_torch_and_the_same_sglang():
    cpu = INSTALL[INSTALL.index("\nelse\n", INSTALL.index('elif [ "$gpu" = 1 ]; then')):]
    cpu_pins, constraints = pins(cpu), pins((ROOT / "install" / "constraints.txt").read_text())
    assert cpu_pins["torch"] == constraints["torch"] == md.version("torch").split("+")[0]
    assert cpu_pins["sglang"] == pins(gpu_branch())["sglang"] == md.version("sglang")
