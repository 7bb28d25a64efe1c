"""The startup RoPE self-check compares re-rotation with the rotary the model runs on this device
(the module's dispatched forward -- SGLang's CUDA kernel on a GPU), not only with ``forward_native``:
on SGLang's real RotaryEmbedding it passes via ``forward``; a module whose dispatched rotary differs
from its native formula fails it; one whose dispatched forward cannot run falls back to the native
formula and says so."""

from __future__ import annotations

import copy

import torch

from amem_sgl import sglang_compat as sgl
from amem_sgl.cache.splice import find_rope, self_check


def _rope(base: int = 10000):
    """A private copy of SGLang's rotary (get_rope caches and shares its instances)."""
    return copy.deepcopy(sgl.get_rope(64, 64, 4096, base, True, None, torch.float32))


def test_the_real_rotary_passes_via_its_dispatched_forward():
    check = self_check(find_rope(_rope()), torch.bfloat16, num_heads=3)
    assert check.passed and check.detail.endswith("via forward"), check


def test_a_dispatched_rotary_that_differs_from_the_native_formula_fails():
    rope = _rope()
    other = _rope(base=5000)  # another base frequency

    def kernel(positions, query, key, *args, **kwargs):  # a kernel not computing the native formula
        return other.forward_native(positions, query, key)

    rope.forward = kernel  # what the model's layers would call
    check = self_check(find_rope(rope), torch.float32, num_heads=3)
    assert not check.passed and check.max_relative_error > check.tolerance, check


def test_a_dispatched_forward_that_cannot_run_falls_back_to_the_native_formula():
    rope = _rope()

    def broken(positions, query, key, *args, **kwargs):
        key.mul_(7.0)  # partly done in place, then fails
        raise RuntimeError("no kernel for this device")

    rope.forward = broken
    check = self_check(find_rope(rope), torch.float32, num_heads=3)
    assert check.passed and "forward_native (RuntimeError: no kernel for this device)" in check.detail, check


def test_a_forward_that_fails_on_one_side_only_is_named_for_both():
    """The old positions rotated by the dispatched forward, the new ones by the fallback: the detail
    names both, not only the first side's."""
    rope = _rope()
    calls = []

    def flaky(positions, query, key, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("second call fails")
        return rope.forward_native(positions, query, key)

    rope.forward = flaky
    check = self_check(find_rope(rope), torch.float32, num_heads=3)
    assert "forward at the old positions, forward_native (RuntimeError: second call fails) at the new" in check.detail, check
