"""The residency service's wire format: one msgpack map per message, over a ZeroMQ REQ/ROUTER pair.

Requests carry ``op`` and the op's fields; replies carry ``ok`` (and ``error`` when false). KV
tensors never travel through the socket: they are safetensors files in a shared-memory folder
(``/dev/shm`` where there is one), named in ``path``; whoever receives a file owns and deletes it.

Where a request names chunks it may add ``tp_rank``, ``tp_size`` (default 0 of 1) and ``layout``
({dtype, layers, kv_heads, head_dim}; default: any): the stored key (amem_sgl.residency.keys). A
``put`` takes them from the staged file's metadata.

ops (request fields -> reply fields):
* ``ping`` -> ``pid``, ``version``
* ``put`` chunk_id, namespace, model_id, path, relevance? -> ``cpu``, ``disk`` (which tiers took it;
  ``disk`` true means the file is durable: the acknowledgement a crash cannot take back), ``key``
* ``get`` chunk_id, namespace, model_id, [rank] -> ``found``, ``tier`` ("cpu"|"disk"), ``path``, ``key``
* ``contains`` chunk_ids, model_id, [rank] -> ``tiers`` {chunk_id: "cpu"|"disk"|null} (the first tier
  holding it), ``on_disk`` [ids the disk tier holds: durable], ``put_answered`` [ids whose put this
  service answered since it started: on disk then, or refused by the disk tier]
* ``hit`` chunk_ids, relevance? [score per id] -> (counts device hits toward reuse; records scores)
* ``relevance`` scores {chunk_id: score 0..1} -> ``updated`` (stored keys reached; kept for later puts)
* ``prefetch`` chunk_ids, namespace, model_id, [rank] -> ``loaded`` (disk -> CPU), ``missing``
* ``delete`` chunk_ids | namespace -> ``deleted``
* ``list`` namespace? -> ``chunks`` [{chunk_id, namespace, tiers, nbytes, hits, relevance}]
* ``stats`` -> tier bytes, budgets, counters
"""

from __future__ import annotations

import msgpack

VERSION = 1
OPS = ("ping", "put", "get", "contains", "hit", "relevance", "prefetch", "delete", "list", "stats")


class ProtocolError(ValueError):
    pass


def encode(message: dict) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def decode(data: bytes) -> dict:
    try:
        message = msgpack.unpackb(data, raw=False)
    except Exception as err:  # noqa: BLE001 -- any malformed frame is a protocol error
        raise ProtocolError(f"undecodable message: {err}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"a message must be a map, got {type(message).__name__}")
    return message


def require(message: dict, **types) -> list:
    """The named fields of ``message``, type-checked."""
    values = []
    for name, kind in types.items():
        if name not in message:
            raise ProtocolError(f"{message.get('op')}: missing field {name!r}")
        if not isinstance(message[name], kind):
            raise ProtocolError(f"{message.get('op')}: field {name!r} must be {kind}")
        values.append(message[name])
    return values
