"""CPU stand-in for ``sgl_kernel`` (the CUDA-only ``sglang-kernel`` wheel).

SGLang 0.5.23's CPU engine imports names from ``sgl_kernel`` but, on the CPU serving path, calls none
of them. This package lets those imports succeed. Every name is a :class:`StandinFunction`; calling
one raises :class:`SglKernelUnavailable` naming the function, and appends the name to the file named
by ``AMEM_SGL_KERNEL_CALL_LOG`` (if set) so tests can assert that nothing called into it.
"""

from __future__ import annotations

import os

__version__ = "0.0.0+amem-cpu-standin"
IS_AMEM_CPU_STANDIN = True


class SglKernelUnavailable(RuntimeError):
    """Raised when code calls into the CPU stand-in of sgl_kernel."""


def _record_call(qualname: str) -> None:
    log = os.environ.get("AMEM_SGL_KERNEL_CALL_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"{os.getpid()} {qualname}\n")


class StandinFunction:
    """A named placeholder for an sgl_kernel function; calling it raises."""

    def __init__(self, qualname: str) -> None:
        self.__name__ = qualname.rsplit(".", 1)[-1]
        self.__qualname__ = qualname

    def __call__(self, *args, **kwargs):
        _record_call(self.__qualname__)
        raise SglKernelUnavailable(
            f"{self.__qualname__}() was called, but sgl_kernel is a CPU stand-in here "
            "(the real sglang-kernel wheel is CUDA-only). This code path needs a GPU."
        )

    def __getattr__(self, name: str):
        # Nested access such as sgl_kernel.ops.foo or torch-op style .default resolves to another stub.
        if name.startswith("__"):
            raise AttributeError(name)
        return StandinFunction(f"{self.__qualname__}.{name}")

    def __repr__(self) -> str:
        return f"<sgl_kernel CPU stand-in {self.__qualname__}>"


def make_module_getattr(module_name: str):
    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return StandinFunction(f"{module_name}.{name}")

    return __getattr__


__getattr__ = make_module_getattr("sgl_kernel")
