"""Memory chunks: identity (salted stable hash), the request field that declares chunk spans, and
prompt composition helpers for clients."""

from amem_sgl.chunks.hints import ACTION_TYPE, ChunkRequest, ChunkSpan, build_kv_hints, parse_kv_hints
from amem_sgl.chunks.identity import chunk_id, validate_namespace

__all__ = ["ACTION_TYPE", "ChunkRequest", "ChunkSpan", "build_kv_hints", "chunk_id", "parse_kv_hints",
           "validate_namespace"]
