"""The memory store (real sentence-transformers model from its package, real hnswlib) and the
sentence splitter."""

from __future__ import annotations

import pytest

from amem_sgl.memory.store import MemoryStore, UnknownChunk, UnknownNamespace


def test_recall_ranks_by_meaning_persists_across_restarts_and_forgets(tmp_path):
    store = MemoryStore(tmp_path)
    facts = {"a": "Alice's sister Maria lives in Denver.", "b": "Alice works at Boeing in Seattle.",
             "c": "Lisbon has mild winters and many hills."}
    assert store.add("alice", [(cid, text, [1, 2, 3], {"k": cid}) for cid, text in facts.items()]) == ["a", "b", "c"]
    assert store.add("alice", [("a", facts["a"], [1, 2, 3], {})]) == []  # already there
    assert store.search("alice", "Where does Alice's sister live?", 1)[0][0].chunk_id == "a"
    assert store.search("alice", "Alice's employer", 1)[0][0].chunk_id == "b"

    again = MemoryStore(tmp_path)  # a restart: texts, ids and the index come back from disk
    hits = again.search("alice", "hilly city with mild winters", 3)
    assert hits[0][0].chunk_id == "c" and hits[0][0].metadata == {"k": "c"} and hits[0][0].token_ids == [1, 2, 3]
    again.forget("alice", ["c"])
    assert [c.chunk_id for c, _ in MemoryStore(tmp_path).search("alice", "hilly city with mild winters", 3)] != ["c"]
    assert "c" not in {c.chunk_id for c in MemoryStore(tmp_path).list("alice")}
    with pytest.raises(UnknownChunk):
        again.forget("alice", ["zzz"])
    again.forget("alice")
    assert again.namespaces() == [] and not (tmp_path / "alice").exists()
    with pytest.raises(UnknownNamespace):
        again.list("alice")


def test_a_custom_retriever_replaces_vector_search(tmp_path):
    calls = []

    def retriever(namespace, query, k):
        calls.append((namespace, query, k))
        return [("b", 0.9)]

    store = MemoryStore(tmp_path, retriever=retriever)
    store.add("ns", [("a", "first", [1], {}), ("b", "second", [2], {})])
    assert [(c.chunk_id, s) for c, s in store.search("ns", "anything", 2)] == [("b", 0.9)]
    assert calls == [("ns", "anything", 2)]


def test_namespaces_are_validated(tmp_path):
    with pytest.raises(ValueError, match="namespace"):
        MemoryStore(tmp_path).add("../escape", [("a", "x", [1], {})])


def test_long_documents_split_on_sentence_boundaries_within_the_token_budget(tmp_path, monkeypatch):
    import dataclasses

    from amem_sgl.config import AmemConfig, MemoryConfig
    from amem_sgl.memory.layer import MemoryLayer
    from amem_sgl.models import ensure_embedded_model

    monkeypatch.setenv("AMEM_SGL_MEMORY_DIR", str(tmp_path))
    config = dataclasses.replace(AmemConfig(), memory=MemoryConfig(chunk_tokens=40))
    layer = MemoryLayer(config, base_url="http://unused", model_id="m", tokenizer_path=str(ensure_embedded_model()))
    sentences = [f"Sentence number {i} talks about the weather in city {i}." for i in range(30)]
    chunks = layer.split(" ".join(sentences) + "\n\nA final paragraph stands alone!")
    assert len(chunks) > 5
    assert all(len(layer.encode(c)) <= 40 for c in chunks)
    assert " ".join(chunks).split() == (" ".join(sentences) + " A final paragraph stands alone!").split()
    long_sentence = "word " * 200
    pieces = layer.split(long_sentence)
    assert len(pieces) >= 5 and all(len(layer.encode(p)) <= 40 for p in pieces)


def test_hybrid_recall_finds_a_name_buried_in_a_long_fact_chunk(tmp_path):
    """Chunks of 16 facts each (the cost curve's memory): the embedding of a whole chunk barely moves
    with one name in it, so embeddings alone often miss the asked person's chunk in the top 4 (0.70 of 20 asks here vs 0.95); the lexical
    part of hybrid recall (IDF-weighted query words) does."""
    from benchmarks.cost_curve import make_memory, turn_questions

    texts, questions, gold = make_memory(60, facts_per_chunk=16, seed=3)
    asks = turn_questions(questions, 20, seed=4)

    def hit_rate(store: MemoryStore) -> float:
        hits = 0
        for ask in asks:
            name = ask.split("city is ")[1].split(" connected")[0]
            top = store.search("facts", ask, 4)
            hits += any(name in c.text and any(city in c.text for city in gold[ask]) for c, _ in top)
        return hits / len(asks)

    hybrid = MemoryStore(tmp_path)
    hybrid.add("facts", [(f"c{i}", text, [i], {}) for i, text in enumerate(texts)])
    dense = MemoryStore(tmp_path, lexical_weight=0.0)
    assert hit_rate(hybrid) >= 0.9 and hit_rate(hybrid) > hit_rate(dense) + 0.15, (hit_rate(hybrid), hit_rate(dense))


def test_embedder_dtypes_agree_and_bad_ones_are_refused():
    """bf16 autocast (amem.memory.embed_dtype) gives nearly the fp32 vectors -- but not the same
    bits, so the autocast did apply -- unit length, fp32; an unknown dtype is refused, in the
    class and in the config."""
    import numpy as np

    from amem_sgl.config import AmemConfig
    from amem_sgl.memory.store import Embedder

    texts = ["Where does Alice's sister live now?", "Lisbon has mild winters and many hills.", "x"]
    fp32, bf16 = Embedder(dtype="float32"), Embedder(dtype="bfloat16")
    a, b = fp32.encode(texts), bf16.encode(texts)
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape == (3, fp32.dim)
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    cosines = (a * b).sum(axis=1)
    assert cosines.min() > 0.999 and not np.array_equal(a, b)
    assert fp32.encode([]).shape == (0, fp32.dim)
    with pytest.raises(ValueError, match="embedder dtype"):
        Embedder(dtype="fp8")
    with pytest.raises(ValueError, match="embed_dtype"):
        AmemConfig.from_dict({"memory": {"embed_dtype": "half"}})


def test_memory_and_kv_folders_are_private_and_must_be_ours(tmp_path, monkeypatch):
    """Memory texts and staged/disk KV live in folders created 0700; a folder at the path that
    another user owns (a predictable /dev/shm/amem-<uid>) is refused, never written into."""
    import os
    import stat

    from amem_sgl.residency.disk_store import DiskStore
    from amem_sgl.residency.keys import private_dir

    store = MemoryStore(tmp_path / "memory", embedder=object())
    disk = DiskStore(tmp_path / "disk", 1 << 20)
    for folder in (store.root, disk.root, private_dir(tmp_path / "shm" / "amem-1")):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    real = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real + 4242)  # the folders now belong to "someone else"
    with pytest.raises(PermissionError, match="refusing"):
        private_dir(tmp_path / "shm" / "amem-1")
    with pytest.raises(PermissionError):
        MemoryStore(tmp_path / "memory", embedder=object())


def test_a_namespace_differing_only_in_case_never_reaches_anothers_folder(tmp_path, monkeypatch):
    """On a case-insensitive filesystem (macOS, Windows) ``Alice``'s folder *is* ``alice``'s: the store
    must not read or write it as ``Alice``. Simulated here: paths under the memory folder resolve
    case-insensitively, as there (this Linux filesystem tells them apart)."""
    import pathlib

    store = MemoryStore(tmp_path / "memory")
    store.add("alice", [("a" * 64, "Alice's PIN is 7391.", [1, 2, 3], {})])
    real_exists = pathlib.Path.exists
    root = str(store.root)

    def folded(self, *args, **kwargs):
        text = str(self)
        if text.startswith(root + "/"):
            self = pathlib.Path(root + "/" + text[len(root) + 1:].lower())
        return real_exists(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "exists", folded)
    assert (store.root / "Alice").exists()  # the filesystem, as a case-insensitive one answers
    with pytest.raises(UnknownNamespace):
        store.list("Alice")
    with pytest.raises(ValueError, match="differs only in case"):
        store.add("Alice", [("b" * 64, "Bob's note.", [4, 5], {})])
    assert not store.has_namespace("Alice") and store.has_namespace("alice")
    assert [c.text for c in store.list("alice")] == ["Alice's PIN is 7391."]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_texts_vector_is_encodes_bit_for_bit(dtype):
    """A recall query (one text) is embedded by the model's forward alone, without
    SentenceTransformer.encode's per-call bookkeeping: the very vector encode gives, for short,
    long and odd texts, at both dtypes (packed linears on for bf16); batches still go through
    encode, and a text's vector does not depend on which path embedded it."""
    import numpy as np
    import torch

    from amem_sgl.memory.store import Embedder

    embedder = Embedder(dtype=dtype)
    texts = ["x", "Where does Alice's sister live now?", "Zürich — 3 items; ünïcode & emoji 🚀 " * 3,
             "A long fact about a cat named Miso who lives in Porto and likes sardines. " * 20]
    for text in texts:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=embedder.bf16):
            want = embedder.model.encode([text], convert_to_tensor=True, show_progress_bar=False)
        want = torch.nn.functional.normalize(want.float(), dim=-1).numpy()
        assert np.array_equal(embedder.encode([text]), want), text[:40]
    batch = embedder.encode(texts[:2])
    # A padded batch is another computation (in bf16 its components move by a few ulps): the same
    # direction, not the same bits; a wrong pooling or prompt lands far below this cosine.
    assert batch.shape == (2, embedder.dim) and float(batch[1] @ embedder.encode([texts[1]])[0]) > 0.9999
