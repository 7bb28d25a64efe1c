"""Real SGLang CPU pools and a one-request driver that walks the scheduler's steps.

The driver uses SGLang's own functions for every step a scheduler takes with a request's KV:
``Req.init_next_round_input`` (prefix match through ``match_kv_cache``), the tree lock the prefill
adder takes, a ``ReqToTokenPool`` row, slots from ``TokenToKVPoolAllocator``, one slot per decoded
token, and ``release_kv_cache(..., checkpoint=True)`` (the tree's ``checkpoint`` + freeing the
rest). Only the model forward is left out; in its place the driver writes, for every slot it fills:

* K = SGLang's own RotaryEmbedding applied at the token's position to a fixed random vector per
  token id -- what a model's K projection + RoPE would store, so re-rotated keys can be checked;
* V = a signature of (token id, position) in channel 0 (then the per-token vector), so a test sees
  exactly which token's KV, computed at which position, sits in a slot.
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
                    architectures=["LlamaForCausalLM"]).save_pretrained(folder)
    return folder


def kv_signature(token_ids, positions) -> torch.Tensor:
    """The value V's channel 0 holds for (token, position): easy to recognise later."""
    t = torch.as_tensor(list(token_ids), dtype=torch.float32)
    p = torch.as_tensor(list(positions), dtype=torch.float32)
    return t * 1000.0 + p


@dataclasses.dataclass
class Pools:
    kv: sgl.MHATokenToKVPool
    allocator: sgl.TokenToKVPoolAllocator
    req_to_token: sgl.ReqToTokenPool
    size: int
    rope: torch.nn.Module

    HEADS = 2
    HEAD_DIM = 8

    @classmethod
    def create(cls, size: int = 512, rows: int = 16, max_context: int = 256) -> "Pools":
        publish_cpu_context()
        kv = sgl.MHATokenToKVPool(size=size, page_size=1, dtype=torch.float32, head_num=cls.HEADS,
                                  head_dim=cls.HEAD_DIM, layer_num=2, device="cpu", enable_memory_saver=False)
        allocator = sgl.TokenToKVPoolAllocator(size=size, dtype=torch.float32, device="cpu",
                                               kvcache=kv, need_sort=False)
        rows_pool = sgl.ReqToTokenPool(size=rows, max_context_len=max_context, device="cpu",
                                       enable_memory_saver=False)
        rope = sgl.get_rope(cls.HEAD_DIM, cls.HEAD_DIM, 4096, 10000, True, None, torch.float32)
        return cls(kv, allocator, rows_pool, size, rope)

    def init_params(self) -> sgl.CacheInitParams:
        return sgl.CacheInitParams(disable=False, req_to_token_pool=self.req_to_token,
                                   token_to_kv_pool_allocator=self.allocator, page_size=1)

    def raw_k(self, tokens) -> torch.Tensor:
        """[n, heads*head_dim]: a fixed random key per token id (before RoPE)."""
        return torch.stack([torch.randn(self.HEADS * self.HEAD_DIM,
                                        generator=torch.Generator().manual_seed(int(t))) for t in tokens])

    def expected_k(self, tokens, positions) -> torch.Tensor:
        """The key a model stores for ``tokens`` at ``positions``: [n, heads, head_dim]."""
        raw = self.raw_k(tokens)
        _, k = self.rope.forward_native(torch.as_tensor(list(positions)), torch.zeros_like(raw), raw)
        return k.view(len(raw), self.HEADS, self.HEAD_DIM)

    def write_kv(self, slots: torch.Tensor, tokens, positions) -> None:
        if len(slots) == 0:
            return
        k = self.expected_k(tokens, positions)
        v = torch.zeros_like(k)
        v[:, 0, 0] = kv_signature(tokens, positions)
        for layer in range(self.kv.layer_num):
            self.kv.k_buffer[layer][slots] = k
            self.kv.v_buffer[layer][slots] = v

    def k_at(self, slots: torch.Tensor, layer: int = 0) -> torch.Tensor:
        return self.kv.k_buffer[layer][slots.long()]

    def v_at(self, slots: torch.Tensor, layer: int = 0) -> torch.Tensor:
        return self.kv.v_buffer[layer][slots.long(), 0, 0]


@dataclasses.dataclass
class Served:
    prefix_len: int  # tokens the tree served
    req: sgl.Req


def make_req(prompt, kv_hints=None) -> sgl.Req:
    return sgl.Req(rid=f"r{next(_rid)}", origin_input_text="", origin_input_ids=array("q", prompt),
                   sampling_params=sgl.SamplingParams(max_new_tokens=64), kv_hints=kv_hints)


def match(cache, req) -> None:
    """The scheduler's prefix match for a waiting request (may run several times per request)."""
    req.init_next_round_input(cache)


def load_back(cache, req) -> int:
    """What SGLang's PrefillAdder does at admission for a match that reported ``host_hit_length``:
    ``init_load_back`` once, then the prefix grows by what it loaded (the cache owns it, or not)."""
    if not req.needs_host_load_back():
        return 0
    loaded, req.last_node = cache.init_load_back(sgl.InitLoadBackParams(
        best_match_node=req.best_match_node, host_hit_length=req.host_hit_length, req=req))
    assert loaded in (0, req.host_hit_length), "load-back commits all promised tokens or none"
    req.host_loaded_length = loaded
    req.prefix_len += loaded
    if cache.load_back_is_cache_owned():
        req.kv.cache_protected_len = req.prefix_len
    return loaded


def admit(cache, pools: Pools, req) -> sgl.Req:
    """Admission after a match: load-back, lock, take a row and slots for the uncached part, write 'KV'."""
    prompt = list(req.origin_input_ids)
    load_back(cache, req)
    req.lock = cache.lock(req.last_node)
    prefix = cache.prefix_device_indices(req) if req.prefix_len else torch.empty(0, dtype=torch.int64)
    assert pools.req_to_token.alloc([req]) is not None, "no free request row"
    new = _alloc(cache, pools, len(prompt) - req.prefix_len)
    row = req.kv.req_pool_idx
    pools.req_to_token.write((row, slice(0, req.prefix_len)), prefix.to(torch.int32))
    pools.req_to_token.write((row, slice(req.prefix_len, len(prompt))), new.to(torch.int32))
    pools.write_kv(new, prompt[req.prefix_len:], range(req.prefix_len, len(prompt)))
    req.kv.kv_allocated_len = req.kv.kv_committed_len = len(prompt)
    return req


def start(cache, pools: Pools, prompt: list[int], kv_hints=None) -> sgl.Req:
    req = make_req(prompt, kv_hints)
    match(cache, req)
    return admit(cache, pools, req)


def row_slots(pools: Pools, req, start: int, end: int) -> torch.Tensor:
    return pools.req_to_token.req_to_token[req.kv.req_pool_idx, start:end].long()


def decode(cache, pools: Pools, req: sgl.Req, token: int) -> None:
    """One decode step: a slot for the new token, its 'KV' written, committed."""
    slot = _alloc(cache, pools, 1)
    pos = req.kv.kv_committed_len
    pools.req_to_token.write((req.kv.req_pool_idx, slice(pos, pos + 1)), slot.to(torch.int32))
    pools.write_kv(slot, [token], [pos])
    req.output_ids.append(token)
    req.kv.kv_allocated_len = req.kv.kv_committed_len = pos + 1


def finish(cache, req: sgl.Req) -> None:
    req.finished_reason = sgl.FINISH_LENGTH(len(req.output_ids))
    sgl.release_kv_cache(req, cache, checkpoint=True)


def serve(cache, pools: Pools, prompt: list[int], output: list[int] = (), kv_hints=None) -> Served:
    req = start(cache, pools, prompt, kv_hints)
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
