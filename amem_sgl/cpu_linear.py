"""CPU bf16 linears on weights pre-packed for oneDNN (the same values as ``F.linear``, faster).

On a CPU without AMX, SGLang's unquantized linears call ``F.linear`` on a plain bf16 weight, and
oneDNN re-lays that weight out on every call: at the few rows a memory turn or a decode step
feeds, the re-layout is most of the matmul's cost. Here each weight is packed once, the first
time its layer runs, with ``torch.ops.mkldnn._reorder_linear_weight``, and later calls run
``torch.ops.mkldnn._linear_pointwise`` on the packed copy: the same oneDNN inner product, so the
output is bit-for-bit that of ``F.linear`` (tests/test_cpu_linear.py, fresh random inputs).
``python -m benchmarks.cpu_micro`` measures it against ``F.linear`` in one run (SmolLM2-135M's 30
layers, 2 threads: 1.45-1.8x at 1-74 rows, 1.04x at 800); ``python -m benchmarks.packed_linear``
serves both side by side (identical greedy outputs; 2026-12-04, the LM head packed too: 1.27x per
decoded token, 1.05x for a short extend, 1.11x for a cold prefill: the linears are a fifth of a
short forward on this CPU).

SGLang multiplies an unquantized LM head (SmolLM2's tied embedding) by a plain ``torch.matmul`` in
``LogitsProcessor._compute_lm_head``, not through the embedding method's ``apply``; that branch is
served from the packed weight too (:func:`around_lm_head`; one row: 4.8 -> 2.6 ms, bit for bit).

A packed copy is tied to its weight's storage and version counter: a weight replaced or written in
place (``/update_weights_from_disk``, a loader's ``copy_``) is packed again before its next use,
never served stale. Anything this path does not cover (fp32 or fp16, CUDA, AMX, a bias of another
dtype, a weight that is not a plain 2-D CPU tensor) runs SGLang's own method unchanged.

Wired in by :func:`install` (amem_sgl.plugin, when ``amem.model.packed_linear`` is on). The packed
copies cost one more copy of the linear weights' bytes in host memory. The recall embedder (bf16
autocast, amem_sgl.memory.store.Embedder) packs its own linears once at load with :func:`pack_linears`.
"""

from __future__ import annotations

import torch

PACKED_ATTR = "_amem_packed_weight"
# This process's counts: weights packed (again, for a stale one) and linears served packed.
STATS = {"packed_weights": 0, "repacked_weights": 0, "packed_calls": 0}


def supported() -> bool:
    """Whether this torch/CPU can pack bf16 linear weights for oneDNN."""
    ops = torch.ops.mkldnn
    try:
        return (torch.backends.mkldnn.is_available() and bool(ops._is_mkldnn_bf16_supported())
                and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))
    except (AttributeError, RuntimeError):
        return False


def _stamp(weight: torch.Tensor):
    try:
        return weight.data_ptr(), weight._version, tuple(weight.shape)
    except RuntimeError:  # an inference-mode tensor has no version counter: never pack it
        return None


def _packable(weight) -> bool:
    return (isinstance(weight, torch.Tensor) and weight.device.type == "cpu" and weight.dtype == torch.bfloat16
            and weight.dim() == 2 and weight.numel() > 0 and not weight.requires_grad
            and type(weight.data) is torch.Tensor)


def packed_weight(layer: torch.nn.Module, weight: torch.Tensor) -> torch.Tensor | None:
    """``weight``'s oneDNN-packed copy, made (again) when missing or stale; None if not packable."""
    cached = layer.__dict__.get(PACKED_ATTR)
    stamp = _stamp(weight)
    if cached is not None and stamp is not None and cached[0] == stamp:
        return cached[1]
    if stamp is None or not _packable(weight):
        layer.__dict__[PACKED_ATTR] = None
        return None
    with torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    STATS["repacked_weights" if cached is not None else "packed_weights"] += 1
    layer.__dict__[PACKED_ATTR] = (stamp, packed)
    return packed


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _covers(x: torch.Tensor, bias) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and not torch.is_grad_enabled()
            and (bias is None or (bias.dtype == torch.bfloat16 and bias.device.type == "cpu")))


def around_apply(original, method, layer, x, bias=None, *args, **kwargs):
    """AROUND hook for an unquantized method's ``apply(layer, x, bias)``."""
    if not args and not kwargs and _covers(x, bias) and not getattr(layer, "use_intel_amx_backend", False):
        packed = packed_weight(layer, layer.weight)
        if packed is not None:
            STATS["packed_calls"] += 1
            return linear(x, packed, bias)
    return original(method, layer, x, bias, *args, **kwargs)


class AutocastPackedLinear(torch.nn.Module):
    """An ``nn.Linear`` whose bf16 autocast forward runs on a weight packed once: the output of
    ``F.linear`` under ``torch.autocast("cpu", bfloat16)`` bit for bit (input, weight and bias cast
    to bf16, a bf16 result), without casting and re-laying out the fp32 weight on every call.
    Outside autocast (or with grad on) it is the wrapped linear. For a model that does not change
    its weights after loading (the recall embedder: :func:`pack_linears`)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.linear = linear
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().to(torch.bfloat16))
            self.bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and not torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")
                and torch.get_autocast_dtype("cpu") == torch.bfloat16):
            return linear(x.to(torch.bfloat16), self.packed, self.bias)
        return self.linear(x)


def pack_linears(module: torch.nn.Module) -> int:
    """Replace every plain CPU ``nn.Linear`` inside ``module`` by an :class:`AutocastPackedLinear`;
    returns how many (0 where this CPU/torch cannot pack bf16 weights)."""
    if not supported():
        return 0
    count = 0
    for name, child in list(module.named_children()):
        if type(child) is torch.nn.Linear and child.weight.device.type == "cpu":
            setattr(module, name, AutocastPackedLinear(child))
            count += 1
        else:
            count += pack_linears(child)
    return count


def around_lm_head(original, processor, hidden_states, lm_head, embedding_bias=None, *args, **kwargs):
    """AROUND hook for ``LogitsProcessor._compute_lm_head``: the branch that multiplies by a plain
    (unquantized, non-LoRA, non-AMX) LM head weight -- ``torch.matmul(hidden.to(w.dtype), w.T)``,
    which ignores ``out`` and ``embedding_bias`` -- on the packed weight: the same values (a tied
    embedding's weight is packed once, its lookup keeps the original). Every other case is SGLang's."""
    from amem_sgl import sglang_compat as sgl

    weight = getattr(lm_head, "weight", None)
    if (not args and isinstance(weight, torch.Tensor) and weight.dtype == torch.bfloat16
            and hidden_states.device.type == "cpu" and not torch.is_grad_enabled()
            and not (hasattr(lm_head, "set_lora") and hasattr(lm_head, "apply_lora"))
            and not sgl.should_apply_lm_head_quant_method(lm_head, getattr(lm_head, "quant_method", None))
            and not getattr(processor, "use_fp32_lm_head", False) and not getattr(lm_head, "use_intel_amx_backend", False)
            and getattr(processor, "rl_on_policy_target", None) is None):
        packed = packed_weight(lm_head, weight)
        if packed is not None:
            STATS["packed_calls"] += 1
            return linear(hidden_states.to(torch.bfloat16), packed, None)
    return original(processor, hidden_states, lm_head, embedding_bias, *args, **kwargs)


_installed = False


def describe() -> dict:
    return {"installed": _installed, **STATS}


def install() -> bool:
    """Route SGLang's unquantized CPU linears (and the LM head) through packed weights; returns
    whether it did (False where this CPU/torch cannot pack bf16 weights)."""
    global _installed
    if _installed:
        return True
    if not supported():
        return False
    from amem_sgl import sglang_compat as sgl

    for target in sgl.UNQUANTIZED_APPLY_TARGETS:
        sgl.add_around_hook(target, around_apply)
    sgl.add_around_hook(sgl.LM_HEAD_TARGET, around_lm_head)
    _installed = True
    return True
