"""Faults: kill -9 of the server during a long remember, kill -9 of the residency service under
load, and a full disk tier (its byte budget hit) while chunks are remembered.

What "intact" means after each, checked from the outside:
* text: every acknowledged chunk is listed with its text; index: a search for its text finds it;
* KV: the chunk's tokens (its text tokenized as the memory layer does) spliced on ``/generate``
  under its namespace are served from the tiers (``loaded_tokens``/``spliced_tokens`` = its tokens),
  so the stored KV belongs to the stored text;
* files: every file in the disk tier loads, its SHA-256 over the tensors matches its metadata, its
  token count matches, the tier is within its budget and nothing was quarantined.
"""

from __future__ import annotations

import concurrent.futures as cf
import random
import threading
import time
import uuid
from pathlib import Path

import requests

from amem_sgl.chunks.client import ChunkClient, amem_usage
from amem_sgl.chunks.hints import build_kv_hints
from amem_sgl.local_server import LocalServer, flush_cache
from benchmarks.reliability import servers

COURIERS = ["Anika", "Bruno", "Chiara", "Dmitri", "Elif", "Farid", "Greta", "Hugo", "Ilse", "Jonas"]


def fact_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"Delivery {i}: courier {rng.choice(COURIERS)} left parcel {rng.randrange(10**5, 10**6)} at dock "
            f"{rng.randrange(1, 90)}." for i in range(n)]


def disk_files(residency_dir: Path) -> dict:
    """Every file of the disk tier checked: loads, checksum, token count (see module docstring)."""
    from safetensors.torch import load_file
    from safetensors import safe_open

    from amem_sgl.residency.disk_store import tensors_checksum

    out = {"files": 0, "bytes": 0, "bad": [], "chunk_ids": set(), "temporaries": 0,
           "quarantined": len(list((residency_dir / "quarantine").glob("*"))) if (residency_dir / "quarantine").exists() else 0}
    for path in sorted(residency_dir.glob("*.safetensors")):
        out["files"] += 1
        out["bytes"] += path.stat().st_size
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata()
            tensors = load_file(str(path))
            tokens = tensors["k"].shape[1]
            if tensors_checksum(tensors) != meta["checksum"] or tensors["v"].shape[1] != tokens:
                raise ValueError("checksum or shape mismatch")
            out["chunk_ids"].add(meta["chunk_id"])
        except Exception as err:  # noqa: BLE001 -- a bad file is what this looks for
            out["bad"].append(f"{path.name}: {type(err).__name__}: {err}"[:300])
    out["temporaries"] = len([p for p in residency_dir.glob(".tmp-*")])
    return out


def kv_served(url: str, client: ChunkClient, namespace: str, texts: list[str], headers: dict | None = None,
              per_request: int = 10, attempts: int = 6) -> dict:
    """Splice each chunk (its text's tokens) under ``namespace``; count those whose KV was served.

    A chunk not on the device is fetched from the tiers in the background (the request that asks
    computes it meanwhile), so a group is sent again, under a fresh cache salt (no prefix hit on the
    previous attempt), until its chunks are spliced or ``attempts`` run out."""
    served, loaded, missing = 0, 0, []
    for i in range(0, len(texts), per_request):
        group = texts[i:i + per_request]
        prompt = client.layout.compose([client.layout.tokens(t + "\n") for t in group], "Which courier left the parcel?")
        for attempt in range(attempts):
            # The server's blend policy: a missing chunk is computed in the blend pass and the chunks
            # after it are still looked up (with "none" the splice would stop at the first miss).
            hints = build_kv_hints(namespace, prompt.spans)
            reply = requests.post(f"{url}/generate", headers=headers or {}, timeout=900, json={
                "input_ids": prompt.input_ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0},
                "kv_hints": hints, "cache_salt": f"reliability-{uuid.uuid4().hex}"})
            reply.raise_for_status()
            usage = amem_usage(reply.json()["meta_info"])
            loaded += usage.get("loaded_tokens", 0)
            if usage.get("spliced_tokens", 0) == prompt.chunk_tokens:
                served += len(group)
                break
            time.sleep(1.0)
        else:
            missing.append({"texts": group, "spliced": usage.get("spliced_tokens", 0), "chunk_tokens": prompt.chunk_tokens})
    return {"served": served, "loaded_tokens": loaded, "missing": missing[:5]}


def memory_intact(url: str, namespace: str, expected: dict[str, str], headers: dict | None = None,
                  search_sample: int = 20) -> dict:
    """``expected``: chunk id -> text. Listed with the same text; a sample found by searching its text."""
    reply = requests.get(f"{url}/amem/v1/namespaces/{namespace}/chunks", headers=headers or {}, timeout=300)
    listed = {c["id"]: c for c in reply.json().get("chunks", [])} if reply.status_code == 200 else {}
    lost = [cid for cid in expected if cid not in listed]
    changed = [cid for cid, text in expected.items() if cid in listed and listed[cid]["text"] != text]
    broken = [cid for cid, c in listed.items() if not c["text"].strip() or c["tokens"] <= 0]
    not_found = []
    for cid in sorted(expected)[:search_sample]:
        hits = requests.post(f"{url}/amem/v1/search", headers=headers or {}, timeout=300,
                             json={"namespace": namespace, "query": expected[cid], "k": 3}).json().get("results", [])
        if cid not in [h["id"] for h in hits]:
            not_found.append(cid)
    return {"listed": len(listed), "lost": len(lost), "text_changed": len(changed), "half_written": len(broken),
            "index_misses": len(not_found), "index_checked": min(search_sample, len(expected)),
            "extra": sorted(set(listed) - set(expected))}


def kill_during_remember(workdir: Path, *, serve_command: str = servers.LAUNCHER, chunks: int = 200,
                         per_request: int = 5, kill_at: int = 100, writers: int = 4, seed: int = 3) -> dict:
    """Remember ``chunks`` facts (``writers`` clients, ``per_request`` texts a call); kill -9 the
    server once ``kill_at`` are acknowledged; restart on the same folders and check every
    acknowledged chunk (text, index, KV, files)."""
    namespace, texts = "rel-crash", fact_texts(chunks, seed)
    server = servers.start(workdir, serve_command=serve_command, name="crash")
    first_start = server.startup_s
    acked: dict[str, str] = {}
    lock, killed = threading.Lock(), threading.Event()
    batches = [texts[i:i + per_request] for i in range(0, len(texts), per_request)]

    def writer(index: int) -> None:
        with requests.Session() as s:
            for batch in batches[index::writers]:
                if killed.is_set():
                    return
                try:
                    reply = s.post(f"{server.url}/amem/v1/remember", json={"namespace": namespace, "texts": batch},
                                   timeout=900)
                except requests.RequestException:
                    return  # the server is gone: this batch was not acknowledged
                if reply.status_code == 200:
                    with lock:
                        acked.update({r["id"]: r["text"] for r in reply.json()["chunks"]})
                        if len(acked) >= kill_at and not killed.is_set():
                            killed.set()
                            servers.kill9(server)

    t0 = time.monotonic()
    try:
        with cf.ThreadPoolExecutor(writers) as pool:
            list(pool.map(writer, range(writers)))
    finally:
        if not killed.is_set():
            servers.kill9(server)
    remember_s = time.monotonic() - t0
    before_restart = disk_files(workdir / "residency")
    server = servers.start(workdir, serve_command=serve_command, name="restart")
    try:
        client = ChunkClient(server.url)
        intact = memory_intact(server.url, namespace, acked)
        kv = kv_served(server.url, client, namespace, [acked[c] for c in sorted(acked)])
        files = disk_files(workdir / "residency")
        state = servers.wait_idle(server.url)
        leaks = servers.leak_lines(server.log())
    finally:
        server.stop()
    return {"chunks": chunks, "acknowledged": len(acked), "killed_after_s": round(remember_s, 1),
            "first_start_s": round(first_start, 1), "restart_s": round(server.startup_s, 1), **intact,
            "kv_served": kv["served"], "kv_loaded_tokens": kv["loaded_tokens"], "kv_missing": kv["missing"],
            "files_at_kill": before_restart["files"],
            "files": files["files"], "bad_files": files["bad"], "quarantined": files["quarantined"],
            "acked_without_file": len(set(acked) - files["chunk_ids"]), "idle": state, "leak_lines": leaks}


def residency_kill_under_load(server: LocalServer, run_load, *, after_s: float = 5.0) -> dict:
    """Start ``run_load()`` (which returns load.run's report), flush the device tree first so turns
    need the residency tiers, kill -9 the residency service ``after_s`` into the load."""
    from benchmarks.residency import residency_pids

    flush_cache(server.url)
    (old,) = residency_pids(server)
    with cf.ThreadPoolExecutor(1) as pool:
        future = pool.submit(run_load)
        time.sleep(after_s)
        import os
        import signal

        os.kill(old, signal.SIGKILL)
        killed_at = time.monotonic()
        # Watched while the load runs (after it, the figure would be the load's length, not the restart's).
        while not (new := [p for p in residency_pids(server) if p != old]) and time.monotonic() < killed_at + 120:
            time.sleep(0.5)
        seen = round(time.monotonic() - killed_at, 1) if new else None
        report = future.result()
    return {"load": report, "killed_pid": old, "restarted_pid": new[0] if new else None,
            "restart_seen_s": seen,
            "server_alive": server.proc.poll() is None and servers.answers(server.url)}


def disk_full(server: LocalServer, residency_dir: Path, budget: int, *, chunks: int = 40, seed: int = 5,
              headers: dict | None = None, namespace: str = "rel-ns0") -> dict:
    """Remember ``chunks`` facts into a disk tier of ``budget`` bytes: every call answered (200, or
    a 4xx/5xx with a message: a clear error), the tier within budget, every file sound, memory
    intact, and every chunk's KV still served (from the device, the CPU tier or the disk tier)."""
    texts = fact_texts(chunks, seed)
    answered, errors, acked = 0, [], {}
    for i in range(0, chunks, 5):
        reply = requests.post(f"{server.url}/amem/v1/remember", headers=headers or {}, timeout=900,
                              json={"namespace": namespace, "texts": texts[i:i + 5]})
        if reply.status_code == 200:
            answered += 1
            acked.update({r["id"]: r["text"] for r in reply.json()["chunks"]})
        else:
            errors.append({"status": reply.status_code, "body": reply.text[:300]})
    time.sleep(2)  # write-through is asynchronous
    files = disk_files(residency_dir)
    intact = memory_intact(server.url, namespace, acked, headers=headers, search_sample=10)
    kv = kv_served(server.url, ChunkClient(server.url), namespace, list(acked.values()), headers=headers)
    return {"budget_bytes": budget, "chunks": chunks, "acknowledged": len(acked), "errors": errors,
            "files": files["files"], "disk_bytes": files["bytes"], "within_budget": files["bytes"] <= budget,
            "acked_with_file": len(set(acked) & files["chunk_ids"]),
            "bad_files": files["bad"], "quarantined": files["quarantined"], "lost": intact["lost"],
            "text_changed": intact["text_changed"], "index_misses": intact["index_misses"],
            "kv_served": kv["served"], "kv_missing": kv["missing"]}
