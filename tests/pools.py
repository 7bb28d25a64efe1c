"""Real SGLang CPU pools and a one-request driver that walks the scheduler's steps.

The driver uses SGLang's own functions for every step a scheduler takes with a request's KV:
``Req.init_next_round_input`` (prefix match through ``match_kv_cache``), the tree lock the prefill
adder takes, a ``ReqToTokenPool`` row, slots from ``TokenToKVPoolAllocator``, one slot per decoded
token, and ``release_kv_cache(..., checkpoint=True)`` (the tree's ``checkpoint`` + freeing the
rest). Only the model forward is left out: the driver writes a value derived from (token id,
position) into the real K buffer at every slot it fills, so a test can check which KV a later
prefix hit is served from.
"""

from __future__ import annotations

import dataclasses
import itertools
import tempfile
from array import array
from pathlib import Path

import torch

from amem_sgl import sglang_compat as sgl

_rid = itertools.count()
_context_published = False


def publish_cpu_context() -> None:
    """SGLang's Req reads the scheduler's runtime context; publish a CPU one once per process."""
    global _context_published
    if not _context_published:
        sgl.publish_scheduler_context(sgl.ServerArgs(model_path=str(tiny_llama_folder()), device="cpu"))
        _context_published = True


def tiny_llama_folder() -> Path:
    """A local folder with a small random-init Llama config (what ServerArgs needs to resolve)."""
    from transformers import LlamaConfig

    folder = Path(tempfile.gettempdir()) / "amem-tests-tiny-llama"
    if not (folder / "config.json").is_file():
        LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=256, max_position_embeddings=512,
                    architectures=["LlamaForCausalLM"]
                    ).save_pretrained(folder)
    return folder


def kv_signature(token_ids, positions) -> torch.Tensor:
    """The value the driver writes for (token, position) into K: easy to recognise later."""
    t = torch.as_tensor(list(token_ids), dtype=torch.float32)
    p = torch.as_tensor(list(positions), dtype=torch.float32)
    return t * 1000.0 + p


@dataclasses.dataclass
class Pools:
    kv: sgl.MHATokenToKVPool
    allocator: sgl.TokenToKVPoolAllocator
    req_to_token: sgl.ReqToTokenPool
    size: int

    @classmethod
    def create(cls, size: int = 512, rows: int = 16, max_context: int = 256) -> "Pools":
        publish_cpu_context()
        kv = sgl.MHATokenToKVPool(size=size, page_size=1, dtype=torch.float32, head_num=2, head_dim=4,
                                  layer_num=2, device="cpu", enable_memory_saver=False)
        allocator = sgl.TokenToKVPoolAllocator(size=size, dtype=torch.float32, device="cpu",
                                               kvcache=kv, need_sort=False)
        rows_pool = sgl.ReqToTokenPool(size=rows, max_context_len=max_context, device="cpu",
                                       enable_memory_saver=False)
        return cls(kv, allocator, rows_pool, size)

    def init_params(self) -> sgl.CacheInitParams:
        return sgl.CacheInitParams(disable=False, req_to_token_pool=self.req_to_token,
                                   token_to_kv_pool_allocator=self.allocator, page_size=1)

    def k_at(self, slots: torch.Tensor) -> torch.Tensor:
        return self.kv.k_buffer[0][slots.long(), 0, 0]


@dataclasses.dataclass
class Served:
    prefix_len: int  # tokens the tree served
    req: sgl.Req


def start(cache, pools: Pools, prompt: list[int]) -> sgl.Req:
    """Admit a request: match, lock, take a row and slots for the uncached part, write 'KV'."""
    req = sgl.Req(rid=f"r{next(_rid)}", origin_input_text="", origin_input_ids=array("q", prompt),
                  sampling_params=sgl.SamplingParams(max_new_tokens=64))
    req.init_next_round_input(cache)
    req.lock = cache.lock(req.last_node)
    prefix = cache.prefix_device_indices(req) if req.prefix_len else torch.empty(0, dtype=torch.int64)
    assert pools.req_to_token.alloc([req]) is not None, "no free request row"
    new = _alloc(cache, pools, len(prompt) - req.prefix_len)
    row = req.kv.req_pool_idx
    pools.req_to_token.write((row, slice(0, req.prefix_len)), prefix.to(torch.int32))
    pools.req_to_token.write((row, slice(req.prefix_len, len(prompt))), new.to(torch.int32))
    positions = range(req.prefix_len, len(prompt))
    pools.kv.k_buffer[0][new, 0, 0] = kv_signature(prompt[req.prefix_len:], positions)
    req.kv.kv_allocated_len = req.kv.kv_committed_len = len(prompt)
    return req


def decode(cache, pools: Pools, req: sgl.Req, token: int) -> None:
    """One decode step: a slot for the new token, its 'KV' written, committed."""
    slot = _alloc(cache, pools, 1)
    pos = req.kv.kv_committed_len
    pools.req_to_token.write((req.kv.req_pool_idx, slice(pos, pos + 1)), slot.to(torch.int32))
    pools.kv.k_buffer[0][slot, 0, 0] = kv_signature([token], [pos])
    req.output_ids.append(token)
    req.kv.kv_allocated_len = req.kv.kv_committed_len = pos + 1


def finish(cache, req: sgl.Req) -> None:
    sgl.release_kv_cache(req, cache, checkpoint=True)


def serve(cache, pools: Pools, prompt: list[int], output: list[int] = ()) -> Served:
    req = start(cache, pools, prompt)
    prefix_len = req.prefix_len
    for token in output:
        decode(cache, pools, req, token)
    finish(cache, req)
    return Served(prefix_len, req)


def _alloc(cache, pools: Pools, n: int) -> torch.Tensor:
    slots = pools.allocator.alloc(n)
    if slots is None:
        cache.evict(sgl.EvictParams(num_tokens=n - pools.allocator.available_size()))
        slots = pools.allocator.alloc(n)
    assert slots is not None, f"pool exhausted: need {n}, free {pools.allocator.available_size()}"
    return slots
