"""Blend: recompute inside the model forward, and the attention that serves extends over cached or spliced KV."""
