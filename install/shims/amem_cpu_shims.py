"""Import-time shims that let SGLang 0.5.23 import on a machine with the CPU build of torch.

Loaded from ``amem_cpu_shims.pth`` (written by ``install/install.sh``) at every interpreter start,
so SGLang's spawned scheduler/detokenizer processes get it too. Starting it is cheap: it only puts
a finder on ``sys.meta_path``; nothing is imported until the guarded module is.

Three shims; the first two are inert where CUDA torch is installed:

* ``torchvision`` on PyPI is a CUDA build. Its ``_C`` extension cannot load against CPU torch, and
  then ``torchvision/_meta_registrations.py`` fails on ``register_fake("torchvision::nms")`` because
  the operator was never defined. Right before torchvision is first imported we define the two
  operators it registers fakes for (``nms``, ``qnms``) with CPU kernels that raise a clear error.
* ``sgl_kernel`` (the ``sglang-kernel`` wheel) is CUDA-only. SGLang's CPU engine imports it but
  calls none of it. When no real ``sgl_kernel`` is importable we serve the stand-in package from
  ``shims/sgl_kernel_cpu_standin``: every attribute is a callable that raises
  :class:`SglKernelUnavailable` naming the function, and every call is recorded in
  ``AMEM_SGL_KERNEL_CALL_LOG`` (if set) so a test can prove the CPU serving path never called it.
* SGLang's frontend (``sgl.RuntimeEndpoint``) picks a chat template by matching the served model's
  path, has no rule for SmolLM2 (a ChatML model) and falls back to ``USER:``/``ASSISTANT:`` roles.
  Right after ``sglang.lang.chat_template`` loads we register a matcher: SmolLM paths -> ``chatml``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_STANDIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sgl_kernel_cpu_standin")
_TORCHVISION_OPS = ("nms", "qnms")
_TORCHVISION_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


def _torch_is_cpu_build() -> bool:
    import torch

    return torch.version.cuda is None and getattr(torch.version, "hip", None) is None


def define_torchvision_ops() -> bool:
    """Define ``torchvision::nms``/``qnms`` if torch is a CPU build and they are missing.

    Returns True when the operators were defined here (False: not needed or already present).
    """
    import torch

    if not _torch_is_cpu_build() or hasattr(torch.ops.torchvision, "nms"):
        return False
    lib = torch.library.Library("torchvision", "DEF")  # noqa: TOR901 - lives for the process
    for name in _TORCHVISION_OPS:
        lib.define(name + _TORCHVISION_SCHEMA)

        def _unavailable(dets, scores, iou_threshold, _name=name):
            raise RuntimeError(
                f"torchvision::{_name} is unavailable: the installed torchvision is a CUDA build and "
                "torch is the CPU build (amem_cpu_shims defined the operator only so torchvision imports)"
            )

        lib.impl(name, _unavailable, "CPU")
    # Keep the Library object alive, or its definitions are removed when it is collected.
    globals()["_TORCHVISION_LIB"] = lib
    return True


def teach_frontend_chat_templates(chat_template_module) -> None:
    """Register a frontend chat-template rule for SmolLM models (ChatML)."""
    import re

    def match_smollm(model_path: str):
        return "chatml" if re.search(r"smollm", model_path, re.IGNORECASE) else None

    chat_template_module.register_chat_template_matching_function(match_smollm)


_POST_IMPORT = {"sglang.lang.chat_template": teach_frontend_chat_templates}


class _PostImportLoader(importlib.abc.Loader):
    """Wraps a module's real loader and runs a hook on the module once it has executed."""

    def __init__(self, loader, hook) -> None:
        self._loader, self._hook = loader, hook

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._hook(module)


class _ShimFinder(importlib.abc.MetaPathFinder):
    """Runs the torchvision fix-up before torchvision loads; serves the sgl_kernel stand-in;
    runs post-import hooks."""

    def __init__(self) -> None:
        self._torchvision_done = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" and not self._torchvision_done:
            self._torchvision_done = True
            define_torchvision_ops()
            return None  # the normal finders import the real torchvision
        if fullname in _POST_IMPORT:
            spec = self._spec_from_other_finders(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PostImportLoader(spec.loader, _POST_IMPORT[fullname])
            return spec
        if fullname == "sgl_kernel" or fullname.startswith("sgl_kernel."):
            if self._real_sgl_kernel_exists():
                return None
            return self._standin_spec(fullname)
        return None

    @staticmethod
    def _spec_from_other_finders(fullname, path, target):
        for finder in sys.meta_path:
            if isinstance(finder, _ShimFinder) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                return spec
        return None

    @staticmethod
    def _real_sgl_kernel_exists() -> bool:
        for finder in sys.meta_path:
            if isinstance(finder, _ShimFinder) or not hasattr(finder, "find_spec"):
                continue
            try:
                if finder.find_spec("sgl_kernel", None) is not None:
                    return not _torch_is_cpu_build()
            except Exception:  # a broken finder must not break imports
                continue
        return False

    @staticmethod
    def _standin_spec(fullname: str):
        if fullname == "sgl_kernel":
            return importlib.util.spec_from_file_location(
                "sgl_kernel",
                os.path.join(_STANDIN_DIR, "__init__.py"),
                submodule_search_locations=[_STANDIN_DIR],
            )
        # Any submodule (sgl_kernel.flash_attn, sgl_kernel.utils, ...) is a stand-in module too.
        return importlib.machinery.ModuleSpec(fullname, _StandinSubmoduleLoader(), is_package=True)


class _StandinSubmoduleLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        import sgl_kernel

        module.__path__ = []
        module.__getattr__ = sgl_kernel.make_module_getattr(module.__name__)


def install() -> None:
    if os.environ.get("AMEM_DISABLE_CPU_SHIMS") == "1":
        return
    if not any(isinstance(f, _ShimFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _ShimFinder())


install()
