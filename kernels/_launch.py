"""One way to get a runnable Triton kernel for a device: compiled (``triton.jit``) for CUDA tensors,
the Triton interpreter for CPU tensors (tests on machines without a GPU)."""

from __future__ import annotations

import triton
import torch


class KernelCache:
    def __init__(self, fn) -> None:
        self.fn = fn
        self._compiled = None
        self._interpreted = None

    def for_device(self, device: torch.device):
        if device.type == "cuda":
            if self._compiled is None:
                self._compiled = triton.jit(self.fn)
            return self._compiled
        if self._interpreted is None:
            from triton.runtime.interpreter import InterpretedFunction

            self._interpreted = InterpretedFunction(self.fn)
        return self._interpreted
