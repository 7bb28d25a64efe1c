"""One in-process SGLang model worker per test process (SGLang builds its parallel groups once per
process): a random-init Llama built by SGLang's own TpModelWorker on CPU, shared by the seam tests."""

from __future__ import annotations

import os
import socket

import torch

from amem_sgl import sglang_compat as sgl
from amem_sgl.blend.backend import wrap_attention_factories

LAYERS = 4
_WORKER = None


def _tiny_llama(folder):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, max_position_embeddings=512,
                architectures=["LlamaForCausalLM"]).save_pretrained(folder)


def tiny_worker(tmp_path_factory):
    """The process's worker (built on first use)."""
    global _WORKER
    if _WORKER is None:
        _WORKER = _build(tmp_path_factory)
    return _WORKER


def _build(tmp_path_factory):
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.distributed import bootstrap
    from sglang.srt.managers.tp_worker import TpModelWorker
    from sglang.srt.runtime_context import SpawnRanks, publish

    os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
    folder = tmp_path_factory.mktemp("tiny-llama")
    _tiny_llama(folder)
    args = sgl.prepare_server_args(["--model-path", str(folder), "--device", "cpu", "--load-format", "dummy",
                                    "--skip-tokenizer-init", "--attention-backend", "torch_native",
                                    "--max-total-tokens", "1024", "--dtype", "float32", "--disable-cuda-graph"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    publish(args, role="scheduler", ranks=SpawnRanks(world_rank=0, dp_rank=None, gpu_id=0))
    bootstrap.init_parallel_runtime(server_args=args, device="cpu", dist_port=port)
    bootstrap.init_layer_runtime(model_config=ModelConfig.from_server_args(args))
    wrap_attention_factories(linear_extend=True)  # what amem_sgl.plugin.load does in amem's servers
    w = TpModelWorker(args, gpu_id=0, nccl_port=port)
    w.model_runner.account_preloaded_weights(w.preloaded_weights_bytes)
    w.alloc_memory_pool()
    w.init_attention_backends()
    w.init_cuda_graphs()  # none here (--disable-cuda-graph): sets up the eager runner
    # Dummy weights are tiny (near-uniform attention); give them a scale where positions matter.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in w.model_runner.model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen) if "norm" in name
                    else 0.3 * torch.randn(p.shape, generator=gen))
    return w
