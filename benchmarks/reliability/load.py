"""Load: concurrent clients mixing memory turns, plain and streaming chat, remember and forget over
several namespaces, each holding a secret that no other namespace's answer may ever contain.

Per request it checks: 200; the chunks a memory turn reports (``usage.amem.memory.chunks``, or the
``X-Amem-Chunks`` header when streaming) are the namespace's own; the answer names no other
namespace's secret; spliced tokens never exceed what the reported chunks hold. A ``cross_probe``
declares another namespace's chunk tokens as chunks of its own namespace on ``/generate``: its
chunk KV must not be served (0 spliced, 0 loaded). Everything is deterministic from the seed.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import json
import random
import statistics
import threading
import time
import uuid

import requests

from amem_sgl.chunks.client import ChunkClient, amem_usage
from amem_sgl.chunks.hints import build_kv_hints

PROJECTS = ["Heron", "Basalt", "Juniper", "Quartz", "Lantern", "Meridian", "Saffron", "Tundra",
            "Orchid", "Falcon", "Cobalt", "Willow", "Ember", "Glacier", "Harbor", "Nimbus"]
LEADS = ["Ines Duarte", "Tomas Berg", "Priya Nair", "Kofi Mensah", "Lena Vogel", "Arjun Rao",
         "Mei Tanaka", "Omar Haddad", "Sara Lind", "Yuki Mori", "Ravi Shah", "Nora Field",
         "Emil Kraus", "Ada Quinn", "Luis Ortega", "Hana Sato"]
BLENDS = ["edges:8", "none", "hkvd:0.1", "sink+hkvd:4:0.05"]
# A memory turn's fidelity level (X-Amem-Fidelity): mostly fast (splice + blend), some guarded (the probe,
# escalated when unsure) and exact (the server's default: the working set prefilled in place).
FIDELITY = {"fast": 2, "guarded": 1, "exact": 1}
KINDS = {"memory_chat": 25, "memory_stream": 12, "memory_completion": 8, "native_splice": 10, "cross_probe": 5,
         "plain_chat": 10, "plain_stream": 5, "remember_forget": 12, "search": 6, "session": 7}
MAX_TOKENS = 16
TIMEOUT = 900


@dataclasses.dataclass
class Namespace:
    name: str
    secret: str
    question: str
    texts: list[str]
    ids: list[str] = dataclasses.field(default_factory=list)
    tokens: dict[str, int] = dataclasses.field(default_factory=dict)  # chunk id -> tokens
    native: list[list[int]] = dataclasses.field(default_factory=list)  # chunk token ids on /generate
    key: str | None = None  # its API key when the server has auth on

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}


def make_namespaces(n: int, seed: int) -> list[Namespace]:
    rng = random.Random(seed)
    secrets = rng.sample(range(100000, 1000000), n)
    out = []
    for i in range(n):
        project, lead = PROJECTS[i % len(PROJECTS)], LEADS[i % len(LEADS)]
        out.append(Namespace(f"rel-ns{i}", str(secrets[i]), f"What is the vault code for project {project}?",
                             [f"The vault code for project {project} is {secrets[i]}.",
                              f"Project {project} is led by {lead}.",
                              f"Project {project} ships its first release in month {rng.randint(1, 12)}."]))
    return out


def setup(url: str, namespaces: list[Namespace], client: ChunkClient, keys_file=None) -> None:
    """Give each namespace a key (when ``keys_file``: the server's amem.auth.keys_file), remember its
    texts (memory API) and register them as /generate chunks too (each with its namespace's key)."""
    from amem_sgl.server.auth import add_key

    for ns in namespaces:
        if keys_file is not None:
            ns.key = add_key(keys_file, [ns.name])[0]
        reply = requests.post(f"{url}/amem/v1/remember", json={"namespace": ns.name, "texts": ns.texts},
                              headers=ns.headers, timeout=TIMEOUT)
        _ok(reply)
        rows = reply.json()["chunks"]
        ns.ids, ns.tokens = [r["id"] for r in rows], {r["id"]: r["tokens"] for r in rows}
        ns.native = [client.layout.tokens(text + "\n") for text in ns.texts]
        for tokens in ns.native:
            prompt = client.layout.registration(tokens)
            _ok(requests.post(f"{url}/generate", headers=ns.headers, timeout=TIMEOUT, json={
                "input_ids": prompt.input_ids, "sampling_params": {"max_new_tokens": 0},
                "kv_hints": build_kv_hints(ns.name, prompt.spans, register=True)}))


class Load:
    def __init__(self, url: str, namespaces: list[Namespace], client: ChunkClient, seed: int) -> None:
        self.url, self.namespaces, self.client, self.seed = url, namespaces, client, seed
        self.owner = {cid: ns.name for ns in namespaces for cid in ns.ids}  # chunk id -> namespace
        self.tokens = {cid: t for ns in namespaces for cid, t in ns.tokens.items()}
        self.lock = threading.Lock()
        self.records: list[dict] = []
        self.errors: list[dict] = []
        self.violations: list[dict] = []
        self.unknown: list[tuple[str, str, str]] = []
        self.deferred: list[tuple[str, str, int, list[str]]] = []  # spliced-token checks awaiting a note's size
        self.levels: collections.Counter = collections.Counter()  # memory turns per fidelity level
        self.stop_at: float | None = None  # monotonic time after which no client starts a request

    def resolve_unknown(self) -> None:
        for name, kind, spliced, chunks in self.deferred:
            held = sum(self.tokens.get(c, 0) for c in chunks)
            if spliced > held:
                self.violations.append({"kind": kind, "namespace": name, "spliced_over_own": [spliced, held, chunks]})
        for name, kind, cid in self.unknown:
            if self.owner.get(cid) != name:
                self.violations.append({"kind": kind, "namespace": name, "foreign_chunks": [cid],
                                        "owner": self.owner.get(cid)})

    # ------------------------------------------------------------------ checks

    def _check_memory(self, ns: Namespace, kind: str, chunks: list[str], text: str, usage: dict) -> None:
        with self.lock:  # a chunk remembered a moment ago may not be in the map yet: checked at the end
            foreign = [c for c in chunks if self.owner.get(c, ns.name) != ns.name]
            self.unknown += [(ns.name, kind, c) for c in chunks if c not in self.owner]
        others = [o.secret for o in self.namespaces if o is not ns and o.secret in text]
        spliced = usage.get("spliced_tokens", 0)
        with self.lock:
            self.levels["turns_spliced"] += spliced > 0
            self.levels["turns_escalated"] += bool(usage.get("escalated"))
        with self.lock:
            if any(c not in self.tokens for c in chunks):  # a note remembered a moment ago: checked at the end
                self.deferred.append((ns.name, kind, spliced, list(chunks)))
                spliced = 0
        held = sum(self.tokens.get(c, 0) for c in chunks)
        problems = {}
        if foreign:
            problems["foreign_chunks"] = foreign
        if others:
            problems["foreign_secrets"] = others
        if spliced > held:
            problems["spliced_over_own"] = [spliced, held, chunks]
        if problems:
            with self.lock:
                self.violations.append({"kind": kind, "namespace": ns.name, "text": text[:200], **problems})

    # ------------------------------------------------------------------ request kinds

    def _chat(self, s: requests.Session, ns: Namespace | None, question: str, *, stream: bool = False,
              header: bool = False, fidelity: str | None = None) -> tuple[str, list[str], dict]:
        body = {"model": "default", "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream,
                "messages": [{"role": "user", "content": question}]}
        headers = {"X-Amem-Fidelity": fidelity} if fidelity else {}
        if ns is not None and header:
            headers["X-Amem-Namespace"] = ns.name
        elif ns is not None:
            body["user"] = ns.name
        reply = s.post(f"{self.url}/v1/chat/completions", json=body, headers=headers, timeout=TIMEOUT, stream=stream)
        _ok(reply)
        if not stream:
            data = reply.json()
            usage = (data.get("usage") or {}).get("amem") or {}
            return data["choices"][0]["message"]["content"] or "", (usage.get("memory") or {}).get("chunks", []), usage
        text, done = "", False
        for line in reply.iter_lines():
            if line == b"data: [DONE]":
                done = True
            elif line.startswith(b"data:"):
                event = json.loads(line[5:])
                if "error" in event:
                    raise RequestFailed(500, json.dumps(event)[:300])
                text += "".join((c.get("delta") or {}).get("content") or "" for c in event.get("choices", []))
        if not done:
            raise RequestFailed(reply.status_code, "stream ended without [DONE]")
        chunks = [c for c in reply.headers.get("x-amem-chunks", "").split(",") if c]
        return text, chunks, {}

    def _fidelity(self, rng: random.Random) -> str:
        level = rng.choices(list(FIDELITY), weights=list(FIDELITY.values()))[0]
        with self.lock:
            self.levels[level] += 1
        return level

    def one(self, s: requests.Session, kind: str, ns: Namespace, other: Namespace, rng: random.Random) -> None:
        if kind in ("memory_chat", "memory_stream"):
            text, chunks, usage = self._chat(s, ns, ns.question, stream=kind == "memory_stream",
                                             header=kind == "memory_stream", fidelity=self._fidelity(rng))
            self._check_memory(ns, kind, chunks, text, usage)
        elif kind == "memory_completion":
            reply = s.post(f"{self.url}/v1/completions", timeout=TIMEOUT, headers={"X-Amem-Fidelity": self._fidelity(rng)},
                           json={"model": "default", "user": ns.name, "max_tokens": MAX_TOKENS, "temperature": 0,
                                 "prompt": f"Q: {ns.question}\nA:"})
            _ok(reply)
            data = reply.json()
            usage = (data.get("usage") or {}).get("amem") or {}
            self._check_memory(ns, kind, (usage.get("memory") or {}).get("chunks", []),
                               data["choices"][0]["text"], usage)
        elif kind in ("native_splice", "cross_probe"):
            source = ns if kind == "native_splice" else other
            order = rng.sample(range(len(source.native)), len(source.native))
            prompt = self.client.layout.compose([source.native[i] for i in order], ns.question)
            body = {"input_ids": prompt.input_ids, "sampling_params": {"max_new_tokens": MAX_TOKENS, "temperature": 0},
                    "kv_hints": build_kv_hints(ns.name, prompt.spans)}
            body["kv_hints"]["actions"][0]["payload"]["blend"] = rng.choice(BLENDS)
            reply = s.post(f"{self.url}/generate", json=body, timeout=TIMEOUT)
            _ok(reply)
            data = reply.json()
            usage = amem_usage(data["meta_info"])
            if kind == "native_splice":
                if usage.get("spliced_tokens", 0) > prompt.chunk_tokens:
                    self._violation(kind, ns, spliced_over_own=[usage["spliced_tokens"], prompt.chunk_tokens])
                others = [o.secret for o in self.namespaces if o is not ns and o.secret in data["text"]]
                if others:
                    self._violation(kind, ns, foreign_secrets=others, text=data["text"][:200])
            elif usage.get("spliced_tokens", 0) or usage.get("loaded_tokens", 0):
                self._violation(kind, ns, foreign_kv=usage, source=other.name)
        elif kind in ("plain_chat", "plain_stream"):
            text, chunks, usage = self._chat(s, None, rng.choice(["Say hello.", "Name a colour.", "Count to three."]),
                                             stream=kind == "plain_stream")
            if chunks or usage:
                self._violation(kind, ns, plain_got_memory=[chunks, usage])
        elif kind == "remember_forget":
            note = f"Transient note {uuid.UUID(int=rng.getrandbits(128)).hex[:12]} for {ns.name}."
            reply = s.post(f"{self.url}/amem/v1/remember", json={"namespace": ns.name, "texts": [note]}, timeout=TIMEOUT)
            _ok(reply)
            (cid,) = reply.json()["ids"]
            with self.lock:  # its tokens too: a concurrent memory turn may recall (and splice) it
                self.owner[cid] = ns.name
                self.tokens[cid] = reply.json()["chunks"][0]["tokens"]
            gone = s.delete(f"{self.url}/amem/v1/namespaces/{ns.name}/chunks/{cid}", timeout=TIMEOUT)
            _ok(gone)
            if gone.json()["forgotten"] != [cid]:
                self._violation(kind, ns, forget_answer=gone.json())
        elif kind == "search":
            reply = s.post(f"{self.url}/amem/v1/search", json={"namespace": ns.name, "query": ns.question, "k": 4},
                           timeout=TIMEOUT)
            _ok(reply)
            with self.lock:
                ids = [r["id"] for r in reply.json()["results"]]
                foreign = [c for c in ids if self.owner.get(c, ns.name) != ns.name]
                self.unknown += [(ns.name, kind, c) for c in ids if c not in self.owner]
            if foreign:
                self._violation(kind, ns, foreign_chunks=foreign)
        elif kind == "session":
            reply = s.post(f"{self.url}/amem/v1/sessions", json={"namespace": ns.name, "query": ns.question, "k": 3},
                           timeout=TIMEOUT)
            _ok(reply)
            sid = reply.json()["session_id"]
            body = {"model": "default", "max_tokens": MAX_TOKENS, "temperature": 0,
                    "messages": [{"role": "user", "content": ns.question}]}
            turn = s.post(f"{self.url}/v1/chat/completions", json=body, headers={"X-Amem-Session": sid}, timeout=TIMEOUT)
            _ok(turn)
            data = turn.json()
            usage = (data.get("usage") or {}).get("amem") or {}
            self._check_memory(ns, kind, (usage.get("memory") or {}).get("chunks", []),
                               data["choices"][0]["message"]["content"] or "", usage)
            _ok(s.delete(f"{self.url}/amem/v1/sessions/{sid}", timeout=TIMEOUT))
        else:
            raise ValueError(kind)

    def _violation(self, kind: str, ns: Namespace, **problems) -> None:
        with self.lock:
            self.violations.append({"kind": kind, "namespace": ns.name, **problems})

    # ------------------------------------------------------------------ driver

    def client_run(self, index: int, n: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        ns = self.namespaces[index % len(self.namespaces)]
        with requests.Session() as s:
            s.headers.update(ns.headers)
            for j in range(n):
                if self.stop_at is not None and time.monotonic() >= self.stop_at:
                    break
                kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
                other = rng.choice([o for o in self.namespaces if o is not ns])
                t0 = time.monotonic()
                try:
                    self.one(s, kind, ns, other, rng)
                    ok = True
                except Exception as err:  # noqa: BLE001 -- every failure is a counted, recorded error
                    ok = False
                    with self.lock:
                        self.errors.append({"client": index, "request": j, "kind": kind, "namespace": ns.name,
                                            "error": f"{type(err).__name__}: {err}"[:500]})
                with self.lock:
                    self.records.append({"kind": kind, "ok": ok, "s": time.monotonic() - t0})


class RequestFailed(RuntimeError):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status


def _ok(reply: requests.Response) -> None:
    if reply.status_code != 200:
        raise RequestFailed(reply.status_code, reply.text[:300])


def run(url: str, namespaces: list[Namespace], client: ChunkClient, *, clients: int, per_client: int,
        seed: int, seconds: float | None = None, progress_s: float | None = None) -> dict:
    """``clients`` threads × ``per_client`` requests; returns counts, latencies, errors, violations.
    ``seconds``: no request is started after that long (the report says how many were planned);
    ``progress_s``: print the count so far that often."""
    load = Load(url, namespaces, client, seed)
    t0 = time.monotonic()
    load.stop_at = None if seconds is None else t0 + seconds
    with cf.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(load.client_run, i, per_client) for i in range(clients)]
        while cf.wait(futures, timeout=progress_s)[1]:
            with load.lock:
                done, failed = len(load.records), len(load.errors)
            print(f"load: {done}/{clients * per_client} requests, {failed} errors, {time.monotonic() - t0:.0f} s",
                  flush=True)
        for f in futures:
            f.result()
    wall = time.monotonic() - t0
    load.resolve_unknown()
    by_kind = collections.defaultdict(list)
    for r in load.records:
        by_kind[r["kind"]].append(r)
    kinds = {k: {"requests": len(v), "errors": sum(not r["ok"] for r in v),
                 "p50_s": round(statistics.median(r["s"] for r in v), 3),
                 "max_s": round(max(r["s"] for r in v), 3)} for k, v in sorted(by_kind.items())}
    return {"clients": clients, "per_client": per_client, "namespaces": len(namespaces),
            "planned": clients * per_client, "stopped_at_s": seconds if len(load.records) < clients * per_client
            else None, "requests": len(load.records), "errors": len(load.errors), "violations": len(load.violations),
            "cross_namespace": sum(1 for v in load.violations if v.keys() & {"foreign_chunks", "foreign_secrets",
                                                                             "foreign_kv", "spliced_over_own"}),
            "memory_turns": dict(load.levels), "wall_s": round(wall, 1), "requests_per_s": round(len(load.records) / wall, 2), "kinds": kinds,
            "error_samples": load.errors[:20], "violation_samples": load.violations[:20]}


def own_recall(url: str, namespaces: list[Namespace]) -> dict:
    """After the load: each namespace's memory intact (its chunks listed) and its question answered."""
    out = {"intact": 0, "secret_answered": 0, "namespaces": len(namespaces), "missing": {}}
    for ns in namespaces:
        listed = {c["id"] for c in requests.get(f"{url}/amem/v1/namespaces/{ns.name}/chunks", headers=ns.headers,
                                                timeout=TIMEOUT).json()["chunks"]}
        if listed == set(ns.ids):
            out["intact"] += 1
        else:
            out["missing"][ns.name] = {"missing": sorted(set(ns.ids) - listed), "extra": sorted(listed - set(ns.ids))}
        reply = requests.post(f"{url}/v1/chat/completions", headers=ns.headers, timeout=TIMEOUT, json={
            "model": "default", "user": ns.name, "max_tokens": MAX_TOKENS, "temperature": 0,
            "messages": [{"role": "user", "content": ns.question}]})
        out["secret_answered"] += ns.secret in (reply.json()["choices"][0]["message"]["content"] or "")
    return out
