"""CPU bf16 linears on pre-packed weights (amem_sgl.cpu_linear): the same values as ``F.linear``.

Fresh random inputs on every run, at SmolLM2-135M's shapes and at the row counts serving uses (a
decode step, a memory turn's few recomputed rows, a full prefill); through SGLang's own
``UnquantizedLinearMethod`` / ``UnquantizedEmbeddingMethod`` and the AROUND hook the plugin installs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from amem_sgl import cpu_linear
from amem_sgl import sglang_compat as sgl

pytestmark = pytest.mark.skipif(not cpu_linear.supported(), reason="this CPU/torch cannot pack bf16 weights")

from sglang.srt.layers.quantization.unquant import UnquantizedEmbeddingMethod, UnquantizedLinearMethod  # noqa: E402

# SmolLM2-135M: hidden 576, 9 query + 3 KV heads of 64, MLP 1536, vocab 49152.
SHAPES = [(576 + 2 * 192, 576), (576, 576), (2 * 1536, 576), (576, 1536)]
ROWS = [1, 4, 26, 74, 150, 800]


class Layer(torch.nn.Module):
    def __init__(self, out_features: int, in_features: int, bias: bool = False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.05,
                                         requires_grad=False)
        self.bias = torch.nn.Parameter(torch.randn(out_features, dtype=torch.bfloat16),
                                       requires_grad=False) if bias else None


def served(method, layer, x, bias=None):
    """What the hooked method returns: the AROUND hook wrapping SGLang's own ``apply``."""
    with torch.inference_mode():
        return cpu_linear.around_apply(type(method).apply, method, layer, x, bias)


@pytest.mark.parametrize("rows", ROWS)
def test_packed_linear_is_bit_identical_to_f_linear(rows):
    method = UnquantizedLinearMethod()
    before = cpu_linear.STATS["packed_calls"]
    for out_features, in_features in SHAPES:
        layer = Layer(out_features, in_features)
        x = torch.randn(rows, in_features, dtype=torch.bfloat16)
        got = served(method, layer, x)
        assert layer.__dict__[cpu_linear.PACKED_ATTR] is not None, "the weight was not packed"
        assert torch.equal(got, F.linear(x, layer.weight)), (rows, out_features, in_features)
    assert cpu_linear.STATS["packed_calls"] - before == len(SHAPES)


def test_bias_three_d_and_strided_inputs_match():
    method = UnquantizedLinearMethod()
    layer = Layer(960, 576, bias=True)
    x3 = torch.randn(2, 7, 576, dtype=torch.bfloat16)
    assert torch.equal(served(method, layer, x3, layer.bias), F.linear(x3, layer.weight, layer.bias))
    strided = torch.randn(30, 1200, dtype=torch.bfloat16)[:, 11:587]
    assert not strided.is_contiguous()
    assert torch.equal(served(method, layer, strided, layer.bias), F.linear(strided, layer.weight, layer.bias))
    empty = torch.empty(0, 576, dtype=torch.bfloat16)
    assert served(method, layer, empty).shape == (0, 960)


def test_lm_head_through_the_embedding_method():
    method = UnquantizedEmbeddingMethod()
    head = Layer(49152, 576)
    x = torch.randn(3, 576, dtype=torch.bfloat16)
    assert torch.equal(served(method, head, x), F.linear(x, head.weight))


def test_a_weight_written_in_place_is_packed_again_never_served_stale():
    method = UnquantizedLinearMethod()
    layer = Layer(576, 576)
    x = torch.randn(4, 576, dtype=torch.bfloat16)
    first = served(method, layer, x)
    repacked = cpu_linear.STATS["repacked_weights"]
    with torch.no_grad():
        layer.weight.copy_(torch.randn(576, 576, dtype=torch.bfloat16))  # /update_weights_from_disk does this
    second = served(method, layer, x)
    assert cpu_linear.STATS["repacked_weights"] == repacked + 1
    assert not torch.equal(first, second)
    assert torch.equal(second, F.linear(x, layer.weight))
    layer.weight = torch.nn.Parameter(torch.randn(576, 576, dtype=torch.bfloat16), requires_grad=False)
    assert torch.equal(served(method, layer, x), F.linear(x, layer.weight))


def test_what_it_does_not_cover_runs_sglangs_own_method():
    method = UnquantizedLinearMethod()
    layer = Layer(576, 576)
    calls = []

    def original(m, lay, x, bias=None):
        calls.append(x.dtype)
        return F.linear(x, lay.weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    with torch.inference_mode():
        fp32 = torch.randn(4, 576)
        out = cpu_linear.around_apply(original, method, layer, fp32)  # fp32 activations
        assert out.dtype == torch.float32
        fp32_layer = Layer(576, 576)
        fp32_layer.weight = torch.nn.Parameter(fp32_layer.weight.float(), requires_grad=False)
        cpu_linear.around_apply(original, method, fp32_layer, fp32)  # fp32 weight
        bf16 = torch.randn(4, 576, dtype=torch.bfloat16)
        cpu_linear.around_apply(original, method, layer, bf16, torch.zeros(576))  # fp32 bias
    assert calls == [torch.float32, torch.float32, torch.bfloat16]
    with torch.enable_grad():  # autograd (training, LoRA fitting) keeps F.linear
        cpu_linear.around_apply(original, method, layer, torch.randn(2, 576, dtype=torch.bfloat16))
    assert len(calls) == 4


def test_the_seam_targets_resolve_to_sglangs_apply_methods():
    import importlib

    for target in sgl.UNQUANTIZED_APPLY_TARGETS:
        module, cls, attr = target.rsplit(".", 2)
        owner = getattr(importlib.import_module(module), cls)
        assert callable(getattr(owner, attr)), target
    assert {t.rsplit(".", 2)[1] for t in sgl.UNQUANTIZED_APPLY_TARGETS} == {
        UnquantizedLinearMethod.__name__, UnquantizedEmbeddingMethod.__name__}


@pytest.mark.slow
def test_the_served_model_runs_its_linears_on_packed_weights(amem_server):
    """The shared server (started by amem's launcher, default config): every linear of SmolLM2's 30
    layers packed once (qkv, o, gate_up, down), and a request's forwards served from the packed copies."""
    import requests

    def stats():
        info = requests.get(f"{amem_server.url}/get_server_info", timeout=30).json()
        return info["internal_states"][0]["amem"]["cpu_linear"]

    before = stats()
    out = requests.post(f"{amem_server.url}/generate", timeout=120, json={
        "text": "The capital of France is", "sampling_params": {"max_new_tokens": 3, "temperature": 0}})
    assert out.status_code == 200, out.text
    after = stats()
    # 4 linears in each of the 30 layers, and the LM head (the tied embedding's weight)
    assert after["installed"] and after["packed_weights"] == 4 * 30 + 1, after
    assert after["packed_calls"] >= before["packed_calls"] + 3 * (4 * 30 + 1), (before, after)  # 3 forwards


class Processor:
    """What ``LogitsProcessor._compute_lm_head`` reads of its processor on a CPU bf16 model."""

    def __init__(self, fp32: bool = False):
        self.use_fp32_lm_head, self.use_fp32_lm_head_output, self.rl_on_policy_target = fp32, False, None


@pytest.mark.parametrize("rows", [1, 4, 7])
def test_the_lm_head_matmul_runs_packed_and_gives_sglangs_logits(rows):
    """SGLang multiplies an unquantized LM head (SmolLM2's tied embedding) with a plain
    ``torch.matmul``, not through the embedding method's ``apply``: the LM head hook serves that
    branch from the packed weight, bit for bit (fresh random weight and hidden states)."""
    head = Layer(49152, 576)
    head.quant_method = UnquantizedEmbeddingMethod()
    hidden = torch.randn(rows, 576, dtype=torch.bfloat16)
    original = sgl.LogitsProcessor._compute_lm_head
    calls = cpu_linear.STATS["packed_calls"]
    with torch.inference_mode():
        want = original(Processor(), hidden, head)
        got = cpu_linear.around_lm_head(original, Processor(), hidden, head, None, out=None)
    assert cpu_linear.STATS["packed_calls"] == calls + 1 and torch.equal(got, want) and got.dtype == torch.bfloat16
    with torch.inference_mode():  # an fp32 LM head (--enable-fp32-lm-head) keeps SGLang's branch
        fp32 = cpu_linear.around_lm_head(original, Processor(fp32=True), hidden, head, None)
    assert fp32.dtype == torch.float32 and cpu_linear.STATS["packed_calls"] == calls + 1


@pytest.mark.parametrize("shape", [(1, 384), (19, 384), (3, 17, 384)])
@pytest.mark.parametrize("bias", [True, False])
def test_autocast_packed_linear_is_the_autocast_linear_bit_for_bit(shape, bias):
    """The recall embedder's linears (cpu_linear.pack_linears): under bf16 autocast, the packed
    forward gives F.linear's autocast output exactly (fresh random fp32 weights and inputs, 2-D and
    3-D); outside autocast it is the wrapped fp32 linear."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    plain = torch.nn.Linear(384, 1536, bias=bias)
    with torch.no_grad():
        plain.weight.copy_(torch.randn(1536, 384, generator=gen) * 0.05)
        if bias:
            plain.bias.copy_(torch.randn(1536, generator=gen))
    packed = cpu_linear.AutocastPackedLinear(plain)
    x = torch.randn(*shape, generator=gen)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = plain(x), packed(x)
    assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)
    with torch.no_grad():
        assert torch.equal(packed(x), plain(x)) and packed(x).dtype == torch.float32


def test_the_recall_embedder_packs_its_linears_and_embeds_the_same_bits():
    """A bf16 Embedder (the default where the CPU computes bf16) replaces every linear of the real
    MiniLM by a packed one, and its vectors equal the unpacked autocast embedder's bit for bit, for a
    query and for a padded batch of texts of different lengths."""
    from amem_sgl.memory.store import Embedder

    texts = ["Where does Alice's sister live now?", "x",
             "The user's travel notes (3): " + "Bob stayed at a small hotel near the station. " * 9]
    packed, plain = Embedder(dtype="bfloat16"), Embedder(dtype="bfloat16", packed=False)
    assert torch.equal(torch.from_numpy(packed.encode(texts)), torch.from_numpy(plain.encode(texts)))
    assert torch.equal(torch.from_numpy(packed.encode(texts[:1])), torch.from_numpy(plain.encode(texts[:1])))
    assert packed.packed and not plain.packed
    wrapped = [m for m in packed.model.modules() if isinstance(m, cpu_linear.AutocastPackedLinear)]
    linears = [m for m in packed.model.modules() if type(m) is torch.nn.Linear]
    assert wrapped and {id(m) for m in linears} == {id(w.linear) for w in wrapped}  # every one wrapped
