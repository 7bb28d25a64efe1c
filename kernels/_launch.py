"""One way to get a runnable Triton kernel for a device: compiled (``triton.jit``) for CUDA tensors,
the Triton interpreter for CPU tensors (tests on machines without a GPU)."""

from __future__ import annotations

import triton
import torch
from triton.runtime.interpreter import InterpretedFunction


class KernelCache:
    def __init__(self, fn) -> None:
        self.fn = fn
        self._compiled = None
        self._interpreted = None

    def for_device(self, device: torch.device):
        if device.type == "cuda":
            if self._compiled is None:
                self._compiled = triton.jit(self.fn)  # an interpreter object under TRITON_INTERPRET=1
            return self._compiled
        if self._interpreted is None:
            self._interpreted = InterpretedFunction(self.fn)
        return self._interpreted

    def interprets(self, device: torch.device) -> bool:
        """Whether launches on ``device`` run in the Triton interpreter (CPU tensors, or
        ``TRITON_INTERPRET=1`` at the first CUDA launch), where e.g. 16-bit ``tl.dot`` is inexact."""
        return isinstance(self.for_device(device), InterpretedFunction)
