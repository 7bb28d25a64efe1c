"""amem's attention seam on a real SGLang model worker: a random-init Llama (4 layers, GQA, fp32)
built in this process by SGLang's own TpModelWorker on CPU, its torch_native backend wrapped by
amem's factory, a ChunkRadixCache on the worker's real pools, batches from SGLang's ScheduleBatch.

* policy ``all`` through the seam writes the same KV as a full prefill and gives the same next-token
  logits;
* the seam's CUDA branch (the Triton ``blend_attention`` kernel, here under TRITON_INTERPRET=1 on CPU
  tensors) and its CPU torch path write the same KV (fp32, within 1e-5 of the KV's magnitude) for
  the same blend pass;
* a probe pass runs only up to its check layer (the model's layer range is cut), records the key
  deviation there, stores nothing at or above it, and raises nothing through the model's code.
"""

from __future__ import annotations

import os
from array import array

import pytest
import torch

from amem_sgl import sglang_compat as sgl
from amem_sgl.blend.backend import AmemAttnBackend, amem_backend_of
from amem_sgl.blend.context import BlendContext
from amem_sgl.blend.policy import BlendPolicy
from amem_sgl.blend.runner import BlendRunner
from amem_sgl.cache.chunk_radix_cache import ChunkRadixCache, ChunkSupport
from amem_sgl.cache.splice import find_rope
from amem_sgl.chunks import build_kv_hints
from tests.pools import load_back
from tests.tiny_worker import LAYERS, tiny_worker

pytestmark = pytest.mark.slow

PRE = list(range(200, 206))
A, B = list(range(10, 22)), list(range(30, 41))
Q = [90, 91, 92, 93]


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    return tiny_worker(tmp_path_factory)


@pytest.fixture
def cache(worker):
    runner = worker.model_runner
    pool = runner.token_to_kv_pool_allocator
    pool.clear()
    support = ChunkSupport(kv_pool=runner.token_to_kv_pool, rope=find_rope(runner.model), model_id="tiny",
                           enabled=True, max_chunk_tokens=64, blend_default=BlendPolicy("none"),
                           blend_available=True)
    c = ChunkRadixCache(sgl.CacheInitParams(disable=False, req_to_token_pool=runner.req_to_token_pool,
                                            token_to_kv_pool_allocator=pool, page_size=1), chunks=support)
    amem_backend_of(runner).blender = BlendRunner(c)
    yield c
    amem_backend_of(runner).blender = None


_rid = iter(range(10**6))


def extend(worker, cache, prompt, hints=None, *, blend: str | None = "default", fold: bool = False):
    """One request through SGLang's admission (match, ScheduleBatch.prepare_for_extend), then the
    blend runner (kernel ``blend``; None: no blend pass), then the worker's own forward (``fold``:
    the blend pass folded into it, as the serving hook runs it)."""
    from sglang.srt.managers.overlap_utils import resolve_forward_inputs
    from sglang.srt.managers.schedule_batch import ScheduleBatch
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    runner = worker.model_runner
    req = sgl.Req(rid=f"seam{next(_rid)}", origin_input_text="", origin_input_ids=array("q", prompt),
                  sampling_params=sgl.SamplingParams(max_new_tokens=1), kv_hints=hints)
    req.init_next_round_input(cache)
    load_back(cache, req)  # what the PrefillAdder does for an admitted request: splice, then lock
    req.lock = cache.lock(req.last_node)
    req.extend_end = len(req.full_untruncated_fill_ids)
    batch = ScheduleBatch.init_new([req], runner.req_to_token_pool, runner.token_to_kv_pool_allocator, cache,
                                   runner.model_config, False, SpeculativeAlgorithm.NONE)
    batch.prepare_for_extend()
    resolve_forward_inputs(batch, None)  # the scheduler's step before the forward (prefill: H2D of the ids)
    blender = amem_backend_of(runner).blender
    if blend is not None:
        blender.kernel = None if blend == "default" else blend
        folded = blender.run(worker, batch, fold=fold)
        assert (folded is not None) == fold  # folding happens only where asked for (and allowed)
        if folded is not None:
            original = type(worker).forward_batch_generation
            out = folded.forward(original, worker, (batch,), {})
            assert folded.ctx.fold.positions_set and folded.ctx.layers_attended == list(range(LAYERS))
            return req, out.logits_output.next_token_logits[0].clone()
    else:
        cache.take_blend_plans(batch.reqs)
    out = worker.forward_batch_generation(batch)
    return req, out.logits_output.next_token_logits[0].clone()


def release(cache, req):
    req.output_ids.append(0)
    req.finished_reason = sgl.FINISH_LENGTH(1)
    sgl.release_kv_cache(req, cache, checkpoint=True)


def row_kv(worker, req, n):
    runner = worker.model_runner
    slots = runner.req_to_token_pool.req_to_token[req.kv.req_pool_idx, :n].long()
    pool = runner.token_to_kv_pool
    return [(pool.get_key_buffer(i)[slots].clone(), pool.get_value_buffer(i)[slots].clone()) for i in range(LAYERS)]


def spliced(worker, cache, policy: BlendPolicy, blend="default", fold=False):
    """Register A and B behind PRE, then splice PRE+A+B+Q (B, A order swapped: re-rotation matters)."""
    for chunk in (A, B):
        req, _ = extend(worker, cache, PRE + chunk, build_kv_hints("alice", [(len(PRE), len(PRE) + len(chunk))],
                                                                  register=True), blend=None)
        release(cache, req)
    prompt = PRE + B + A + Q
    spans = [(len(PRE), len(PRE) + len(B)), (len(PRE) + len(B), len(PRE) + len(B) + len(A))]
    req, logits = extend(worker, cache, prompt, build_kv_hints("alice", spans, blend=policy), blend=blend, fold=fold)
    return req, logits, prompt


def max_diff(kv1, kv2):
    """Largest |difference| over every layer's K and V, relative to that tensor's largest |value|
    (fp32 keeps ~1e-7 relative; the KV here reaches ~10)."""
    return max(((x - y).abs().max() / y.abs().max()).item()
               for pair1, pair2 in zip(kv1, kv2) for x, y in zip(pair1, pair2))


def test_the_stock_backend_is_wrapped_under_its_own_name(worker):
    backend = worker.model_runner.attn_backend
    assert isinstance(backend, AmemAttnBackend) and isinstance(backend.inner, sgl.TorchNativeAttnBackend)
    assert sgl.ATTENTION_BACKENDS["torch_native"]._amem_stock is not None
    assert backend.token_to_kv_pool is worker.model_runner.token_to_kv_pool  # delegated


def test_policy_all_through_the_seam_equals_a_full_prefill(worker, cache):
    req_full, logits_full = extend(worker, cache, PRE + B + A + Q, blend=None)
    n = len(req_full.origin_input_ids)
    full = row_kv(worker, req_full, n)
    release(cache, req_full)
    req, logits, prompt = spliced(worker, cache, BlendPolicy("all"))
    assert req.prefix_len == len(PRE) + len(A) + len(B) and cache.stats.blend_passes == 1
    assert max_diff(row_kv(worker, req, n), full) < 1e-5
    torch.testing.assert_close(logits, logits_full, rtol=1e-5, atol=1e-5)
    release(cache, req)
    # The check can fail: pure splicing (no blend pass) leaves KV blind to the chunk before it.
    cache.evict(sgl.EvictParams(num_tokens=10_000))  # else the blended sequence is an exact prefix hit
    req2, logits2, _ = spliced(worker, cache, BlendPolicy("none"))
    assert max_diff(row_kv(worker, req2, n), full) > 1e-3
    assert (logits2 - logits_full).abs().max() > 1e-3
    release(cache, req2)


@pytest.mark.parametrize("policy", ["edges:2", "all", "edges+query:1:0.2"])
def test_a_blend_pass_folded_into_the_extend_writes_the_same_kv_and_logits(worker, cache, policy):
    """The folded forward (recomputed tokens in front of the extend tokens, one forward) against the
    separate blend pass then the extend: the same KV and next-token logits. Within fp32 rounding here:
    an fp32 GEMM's rows may round differently with the row count (the served bf16 one did not on the
    benchmark machine, where the same-answer check compares served answers token for token); a wrong
    position, key range or slot moves them by ~1e-2."""
    req_s, logits_s, prompt = spliced(worker, cache, BlendPolicy.parse(policy))
    separate = row_kv(worker, req_s, len(prompt))
    passes, recomputed = cache.stats.blend_passes, cache.stats.recomputed_tokens
    release(cache, req_s)
    cache.evict(sgl.EvictParams(num_tokens=10_000))  # the folded run splices afresh
    req_f, logits_f, _ = spliced(worker, cache, BlendPolicy.parse(policy), fold=True)
    assert cache.stats.blend_passes == 2 * passes and cache.stats.recomputed_tokens == 2 * recomputed
    assert max_diff(row_kv(worker, req_f, len(prompt)), separate) < 1e-5  # fp32 rounding, 1e-2 below a bug
    torch.testing.assert_close(logits_f, logits_s, rtol=1e-5, atol=1e-5)
    release(cache, req_f)
    # The comparison can fail: without the blend pass the KV and logits differ.
    cache.evict(sgl.EvictParams(num_tokens=10_000))
    req_n, logits_n, _ = spliced(worker, cache, BlendPolicy("none"))
    assert max_diff(row_kv(worker, req_n, len(prompt)), separate) > 1e-3
    assert (logits_n - logits_s).abs().max() > 1e-3
    release(cache, req_n)


@pytest.mark.parametrize("policy", ["edges:2", "all"])
def test_triton_kernel_and_torch_path_write_the_same_kv(worker, cache, policy, monkeypatch):
    import kernels.blend_attention as kernel

    assert os.environ.get("TRITON_INTERPRET") == "1"  # tests/conftest.py: the interpreter on CPU
    launches = []
    launcher = kernel.blend_attention
    monkeypatch.setattr(kernel, "blend_attention", lambda *a, **k: launches.append(k["backend"]) or launcher(*a, **k))
    req_t, logits_t, prompt = spliced(worker, cache, BlendPolicy.parse(policy), blend="torch")
    torch_kv = row_kv(worker, req_t, len(prompt))
    release(cache, req_t)
    cache.evict(sgl.EvictParams(num_tokens=10_000))  # the triton run splices afresh
    assert not launches  # the torch path does not use the kernel
    req_k, logits_k, _ = spliced(worker, cache, BlendPolicy.parse(policy), blend="triton")
    assert launches == ["triton"] * LAYERS  # one launch per layer of the blend pass
    assert max_diff(row_kv(worker, req_k, len(prompt)), torch_kv) < 1e-5
    torch.testing.assert_close(logits_k, logits_t, rtol=1e-5, atol=1e-5)
    release(cache, req_k)


def test_a_probe_runs_only_up_to_its_check_layer_and_stores_nothing_there(worker, cache):
    runner = worker.model_runner
    req, _, prompt = spliced(worker, cache, BlendPolicy("none"), blend=None)
    before = row_kv(worker, req, len(prompt))
    ctx = BlendContext(probe_layer=2)
    blender = amem_backend_of(runner).blender
    from sglang.srt.managers.schedule_batch import ScheduleBatch
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    batch = ScheduleBatch.init_new([req], runner.req_to_token_pool, runner.token_to_kv_pool_allocator, cache,
                                   runner.model_config, False, SpeculativeAlgorithm.NONE)
    batch.forward_mode = sgl.ForwardMode.EXTEND
    batch.req_pool_indices = torch.tensor([req.kv.req_pool_idx])
    batch.req_pool_indices_cpu = batch.req_pool_indices
    batch.global_num_tokens = None
    end = len(PRE) + len(A) + len(B)
    positions = tuple(range(len(PRE), end))
    blender._forward(runner, batch, [(0, end, positions)], ctx)
    assert ctx.layers_attended == [0, 1]  # layer 3 never ran: the model's layer range was cut
    assert ctx.deviation is not None and ctx.deviation.shape == (len(positions),)
    # B sits where it was computed (behind PRE): its fresh keys equal its spliced ones; A moved
    # behind B, so layer 2's keys (which saw B through layers 0-1) deviate.
    on_b, on_a = ctx.deviation[: len(B)], ctx.deviation[len(B):]
    assert on_b.max() < 1e-6 < 1e-2 < on_a.min()
    after = row_kv(worker, req, len(prompt))
    for layer in (2, 3):  # at and above the check layer: untouched
        assert torch.equal(after[layer][0], before[layer][0]) and torch.equal(after[layer][1], before[layer][1])
    assert not torch.equal(after[0][0][len(PRE):end], before[0][0][len(PRE):end])  # below it: recomputed
    assert runner.model.model.end_layer == LAYERS  # restored
    release(cache, req)
