"""Chunk identity: a SHA-256 over (namespace salt, model id, token ids).

Stable across processes and restarts (never Python's ``hash()``). The namespace is part of the key,
so the same text in two namespaces is two chunks and KV is never shared across namespaces; the
model id is part of it, so KV is never served to another model. The id only locates a chunk: a hit
still compares the stored token ids, so a collision cannot serve wrong KV.
"""

from __future__ import annotations

import hashlib
import re
from array import array
from typing import Sequence

_NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")
_DOMAIN = b"amem-chunk-v1\x00"


def validate_namespace(namespace: object) -> str:
    if not isinstance(namespace, str) or not _NAMESPACE.match(namespace):
        raise ValueError(f"namespace must be 1-128 characters of letters, digits and _.:@- starting "
                         f"with a letter or digit, got {namespace!r}")
    return namespace


def chunk_id(namespace: str, model_id: str, token_ids: Sequence[int]) -> str:
    validate_namespace(namespace)
    digest = hashlib.sha256(_DOMAIN)
    for part in (namespace, model_id):
        encoded = part.encode("utf-8")
        digest.update(len(encoded).to_bytes(4, "little") + encoded)
    tokens = array("q", token_ids)
    digest.update(len(tokens).to_bytes(8, "little") + tokens.tobytes())
    return digest.hexdigest()
