"""The radix-tree layer: ChunkRadixCache and its registration as SGLang's ``amem`` cache backend."""

from amem_sgl.cache.chunk_radix_cache import CacheStats, ChunkRadixCache

__all__ = ["CacheStats", "ChunkRadixCache"]
