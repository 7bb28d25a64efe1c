"""Chunk identity: a SHA-256 over (namespace salt, model id, token ids).

Stable across processes and restarts (never Python's ``hash()``). The namespace is part of the key,
so the same text in two namespaces is two chunks and KV is never shared across namespaces; the
model id is part of it, so KV is never served to another model. The id only locates a chunk: a hit
still compares the stored token ids, so a collision cannot serve wrong KV.

Sealed key space: a server keeps a per-server secret (a 0600 file beside its memory dir, created at
first start by amem_sgl.server.auth; its path reaches every process in ``$AMEM_SGL_SECRET_FILE``).
With it, chunk ids are an HMAC-SHA256 keyed by the secret and a namespace's radix salt is
``amem:ns:<HMAC of the namespace>``, so no client can compute a chunk id from a guessed text or name
another namespace's salted subtree. Without the variable (a client, a unit test) both are unkeyed.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import re
from array import array
from typing import Sequence

_NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}")  # fullmatch: "$" would allow a final "\n"
_CHUNK_ID = re.compile(r"[0-9a-f]{64}")  # what chunk_id returns: hex SHA-256 / HMAC-SHA256
_DOMAIN = b"amem-chunk-v1\x00"
_SALT_DOMAIN = b"amem-namespace-salt-v1\x00"
SECRET_FILE_ENV = "AMEM_SGL_SECRET_FILE"
# Radix extra_keys amem uses for itself; a client-supplied extra_key/cache_salt containing this is refused.
RESERVED_KEY_PREFIX = "amem:"
NAMESPACE_SALT_PREFIX = "amem:ns:"


@functools.lru_cache(maxsize=8)
def _read_secret(path: str) -> bytes:
    secret = bytes.fromhex(open(path, encoding="ascii").read().strip())
    if len(secret) < 16:
        raise ValueError(f"{path}: the server secret must be at least 16 bytes of hex")
    return secret


def server_secret() -> bytes:
    """This process's server secret (b"" when ``$AMEM_SGL_SECRET_FILE`` is not set)."""
    path = os.environ.get(SECRET_FILE_ENV)
    return _read_secret(path) if path else b""


def validate_namespace(namespace: object) -> str:
    if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
        raise ValueError(f"namespace must be 1-128 characters of letters, digits and _.:@- starting "
                         f"with a letter or digit, got {namespace!r}")
    return namespace


def is_chunk_id(value: object) -> bool:
    """Whether ``value`` has the form of a chunk id (64 lowercase hex characters, checked whole)."""
    return isinstance(value, str) and _CHUNK_ID.fullmatch(value) is not None


def check_text(text: object, what: str = "text") -> str:
    """A ValueError unless ``text`` is a non-empty string that is valid unicode (no lone surrogate: a
    client can send one as a JSON escape, and the tokenizer and embedder fail on it)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"every {what} must be a non-empty string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{what} is not valid unicode ({err.reason} at character {err.start})") from None
    return text


def chunk_id(namespace: str, model_id: str, token_ids: Sequence[int]) -> str:
    validate_namespace(namespace)
    secret = server_secret()
    digest = hmac.new(secret, _DOMAIN, hashlib.sha256) if secret else hashlib.sha256(_DOMAIN)
    for part in (namespace, model_id):
        encoded = part.encode("utf-8")
        digest.update(len(encoded).to_bytes(4, "little") + encoded)
    tokens = array("q", token_ids)
    digest.update(len(tokens).to_bytes(8, "little") + tokens.tobytes())
    return digest.hexdigest()


def namespace_salt(namespace: str) -> str:
    """The radix ``extra_key`` salt of a namespace's chunk requests (keyed by the server secret)."""
    secret = server_secret()
    if not secret:
        return NAMESPACE_SALT_PREFIX + namespace
    mac = hmac.new(secret, _SALT_DOMAIN + namespace.encode("utf-8"), hashlib.sha256)
    return NAMESPACE_SALT_PREFIX + mac.hexdigest()[:32]
