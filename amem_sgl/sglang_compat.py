"""The one module that imports SGLang internals (pinned: sglang 0.5.23).

Everything else in amem_sgl imports SGLang names from here, so a version bump is a change to this
file alone. Names are re-exported unchanged; the few helpers below wrap seams whose shape is
version-specific (plugin hooks, the FastAPI app, the launcher).
"""

from __future__ import annotations

import sglang
from sglang.launch_server import run_server
from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.layers.logits_processor import LogitsProcessor, should_apply_lm_head_quant_method
from sglang.srt.layers.quantization.unquant import UnquantizedEmbeddingMethod, UnquantizedLinearMethod
from sglang.srt.layers.rotary_embedding.factory import get_rope
from sglang.srt.managers.io_struct import GenerateReqInput
from sglang.srt.managers.schedule_batch import FINISH_LENGTH, Req
from sglang.srt.managers.scheduler_components.output_streamer import SchedulerOutputStreamer
from sglang.srt.entrypoints.openai import protocol as _openai_protocol
from sglang.srt.entrypoints.openai.usage_processor import UsageProcessor
from sglang.srt.managers.tokenizer_manager import TokenizerManager
from sglang.srt.managers.tp_worker import TpModelWorker
from sglang.srt.managers.scheduler_components.internal_state import (
    SchedulerInternalStateController,
)
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import (
    CacheRequestHandle,
    EvictParams,
    EvictResult,
    InitLoadBackParams,
    InsertParams,
    InsertResult,
    MatchPrefixParams,
    MatchResult,
    TreeLock,
)
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.common import release_kv_cache
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey, TreeNode
from sglang.srt.mem_cache.registry import (
    TreeCacheBuildContext,
    get_radix_cache_factory,
    register_radix_cache_backend,
    registered_radix_cache_backends,
)
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardBatch, ForwardMode
from sglang.srt.plugins import load_plugins
from sglang.srt.plugins.hook_registry import HookRegistry, HookType
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.runtime_context import publish as _publish_runtime_context
from sglang.srt.server_args import ServerArgs, prepare_server_args
from sglang.srt.utils import kill_process_tree

SGLANG_VERSION = sglang.__version__
SUPPORTED_SGLANG_VERSION = "0.5.23"

# Whether a req.customized_info key is reported once per request (not sliced per output token).
REQUEST_LEVEL_INFO_TARGET = (
    f"{SchedulerOutputStreamer.__module__}.{SchedulerOutputStreamer.__qualname__}"
    ".is_request_level_customized_info_key"
)

# Dotted path of the OpenAI routes' non-streaming usage builder (responses carry meta_info).
RESPONSE_USAGE_TARGET = f"{UsageProcessor.__module__}.{UsageProcessor.__qualname__}.calculate_response_usage"


def allow_usage_extension_fields() -> None:
    """Let OpenAI ``usage`` objects carry extra fields (``usage.amem``) through serialisation."""
    usage = _openai_protocol.UsageInfo
    if usage.model_config.get("extra") == "allow":
        return
    usage.model_config["extra"] = "allow"
    usage.model_rebuild(force=True)
    for model in vars(_openai_protocol).values():
        if isinstance(model, type) and issubclass(model, _openai_protocol.BaseModel) and "usage" in getattr(
                model, "model_fields", {}):
            model.model_rebuild(force=True)


# Dotted paths of the OpenAI routes' request conversion (where a memory turn's prompt is composed).
CHAT_CONVERSION_TARGET = (
    "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat._convert_to_internal_request")
COMPLETION_CONVERSION_TARGET = (
    "sglang.srt.entrypoints.openai.serving_completions.OpenAIServingCompletion._convert_to_internal_request")


# Dotted path of the worker's forward of one batch (where a blend pass runs first).
WORKER_FORWARD_TARGET = f"{TpModelWorker.__module__}.{TpModelWorker.__qualname__}.forward_batch_generation"
# Dotted paths of the unquantized linear and embedding (LM head) methods' ``apply(layer, x, bias)``,
# where amem_sgl.cpu_linear serves CPU bf16 linears from pre-packed weights.
UNQUANTIZED_APPLY_TARGETS = tuple(
    f"{cls.__module__}.{cls.__qualname__}.apply" for cls in (UnquantizedLinearMethod, UnquantizedEmbeddingMethod)
)
# Dotted path of the logits processor's LM head matmul (``_compute_lm_head(hidden_states, lm_head,
# embedding_bias=None, *, out=None)``): an unquantized LM head -- SmolLM2's tied embedding -- is a
# plain ``torch.matmul(hidden, weight.T)`` there, not the embedding method's ``apply``.
LM_HEAD_TARGET = f"{LogitsProcessor.__module__}.{LogitsProcessor.__qualname__}._compute_lm_head"
# Dotted path of ``GenerateReqInput.regenerate_rid`` (HTTP process): parallel sampling (n > 1) gives
# the prefix request and every copy a fresh rid there; amem_sgl.memory.timings maps them to the turn.
REGENERATE_RID_TARGET = f"{GenerateReqInput.__module__}.{GenerateReqInput.__qualname__}.regenerate_rid"
# Dotted path of the tokenizer manager's per-request validation (HTTP process, before the scheduler):
# where amem_sgl.server.validation checks token ids against the vocabulary. (Owned by the lead; keep.)
TOKENIZER_VALIDATE_TARGET = (
    f"{TokenizerManager.__module__}.{TokenizerManager.__qualname__}._validate_one_request"
)

# Dotted path of the scheduler's internal-state readback (served by /get_server_info).
INTERNAL_STATE_TARGET = (
    f"{SchedulerInternalStateController.__module__}."
    f"{SchedulerInternalStateController.__qualname__}.get_internal_state"
)


def check_sglang_version() -> None:
    if SGLANG_VERSION != SUPPORTED_SGLANG_VERSION:
        raise RuntimeError(
            f"amem_sgl is built against sglang=={SUPPORTED_SGLANG_VERSION}, found {SGLANG_VERSION}; "
            "run install/install.sh to install the supported version"
        )


def add_internal_state_hook(contribute) -> None:
    """Add ``contribute(scheduler, state_dict)`` to the scheduler's internal-state readback.

    ``contribute`` runs in the scheduler process each time ``/get_server_info`` is served; what it
    writes into the dict appears under ``internal_states`` in that endpoint's answer.
    """

    def _after(result, controller, *args, **kwargs):
        contribute(controller.scheduler, result.internal_state)
        return result

    HookRegistry.register(INTERNAL_STATE_TARGET, _after, HookType.AFTER)


def publish_scheduler_context(server_args: ServerArgs) -> None:
    """Publish ``server_args`` as this process's scheduler runtime context (SGLang does this at
    scheduler start; code running the tree outside a scheduler, e.g. tests, must do it too)."""
    _publish_runtime_context(server_args, role="scheduler")


def add_around_hook(target: str, hook) -> None:
    """``hook(original, *args, **kwargs)`` wraps ``target`` in every SGLang process that loads plugins."""
    HookRegistry.register(target, hook, HookType.AROUND)


def apply_hooks() -> None:
    """Apply hooks registered after SGLang's own plugin load (already-patched targets are skipped)."""
    HookRegistry.apply_hooks()


def served_context_len() -> int | None:
    """The context length this HTTP process's tokenizer manager serves (None outside a server)."""
    from sglang.srt.entrypoints.http_server import get_global_state

    try:
        return int(get_global_state().tokenizer_manager.context_len)
    except Exception:  # noqa: BLE001 -- no server state in this process (a test, a client)
        return None


def http_app():
    """SGLang's FastAPI application object (middleware and routes may be added before start)."""
    from sglang.srt.entrypoints.http_server import app

    return app


__all__ = [
    "CacheInitParams",
    "CaptureHiddenMode",
    "ForwardBatch",
    "ForwardMode",
    "CacheRequestHandle",
    "EvictParams",
    "FINISH_LENGTH",
    "EvictResult",
    "InitLoadBackParams",
    "HookRegistry",
    "HookType",
    "InsertParams",
    "InsertResult",
    "MHATokenToKVPool",
    "MatchPrefixParams",
    "MatchResult",
    "REQUEST_LEVEL_INFO_TARGET",
    "RESPONSE_USAGE_TARGET",
    "CHAT_CONVERSION_TARGET",
    "COMPLETION_CONVERSION_TARGET",
    "allow_usage_extension_fields",
    "RadixCache",
    "RadixKey",
    "Req",
    "ReqToTokenPool",
    "SamplingParams",
    "TOKENIZER_VALIDATE_TARGET",
    "UNQUANTIZED_APPLY_TARGETS",
    "LM_HEAD_TARGET",
    "REGENERATE_RID_TARGET",
    "LogitsProcessor",
    "should_apply_lm_head_quant_method",
    "ATTENTION_BACKENDS",
    "register_attention_backend",
    "TorchNativeAttnBackend",
    "TpModelWorker",
    "WORKER_FORWARD_TARGET",
    "ServerArgs",
    "SGLANG_VERSION",
    "TokenToKVPoolAllocator",
    "TreeCacheBuildContext",
    "TreeLock",
    "TreeNode",
    "add_around_hook",
    "apply_hooks",
    "add_internal_state_hook",
    "check_sglang_version",
    "get_radix_cache_factory",
    "get_rope",
    "http_app",
    "served_context_len",
    "kill_process_tree",
    "load_plugins",
    "prepare_server_args",
    "publish_scheduler_context",
    "register_radix_cache_backend",
    "registered_radix_cache_backends",
    "release_kv_cache",
    "run_server",
]
