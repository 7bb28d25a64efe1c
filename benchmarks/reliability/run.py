"""One reliability run on a server of its own (the suite calls these with small numbers).

:class:`Harness` starts the load server -- auth on (a keys file: an admin key, then a key per
namespace), a disk tier of ``disk_budget`` bytes so the budget is hit throughout, a 16K-token pool
-- and gives each of ``n_namespaces`` namespaces its secret. Its steps return plain dicts.
"""

from __future__ import annotations

import time
from pathlib import Path

import requests

from amem_sgl.chunks.client import ChunkClient
from amem_sgl.server.auth import add_key
from benchmarks.reliability import faults, fuzz, load, servers

DISK_BUDGET = 2 * 1024 * 1024  # bytes: a few chunk files of SmolLM2 KV (~23 KB per token)


class Harness:
    def __init__(self, workdir: Path, *, serve_command: str = servers.LAUNCHER, n_namespaces: int = 8,
                 seed: int = 1, disk_budget: int = DISK_BUDGET) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir, self.seed, self.disk_budget = workdir, seed, disk_budget
        self.keys_file = workdir / "keys.json"
        self.admin = {"Authorization": f"Bearer {add_key(self.keys_file, [], admin=True)[0]}"}
        self.server = servers.start(workdir, serve_command=serve_command, name="load",
                                    amem={"auth": {"keys_file": str(self.keys_file)},
                                          "residency": {"disk_bytes": disk_budget}})
        self.url = self.server.url
        self.client = ChunkClient(self.url)
        self.namespaces = load.make_namespaces(n_namespaces, seed)
        load.setup(self.url, self.namespaces, self.client, self.keys_file)

    def stop(self) -> None:
        self.server.stop()

    def health(self) -> dict:
        """Slots once idle, SGLang's leak reports so far, and whether the server answers."""
        return {"idle": servers.wait_idle(self.url), "leak_lines": servers.leak_lines(self.server.log()),
                "answers": servers.answers(self.url), "alive": self.server.proc.poll() is None}

    def load(self, clients: int, per_client: int, seconds: float | None = None,
             progress_s: float | None = None) -> dict:
        report = load.run(self.url, self.namespaces, self.client, clients=clients, per_client=per_client,
                          seed=self.seed, seconds=seconds, progress_s=progress_s)
        return {**report, **self.health(), "memory": load.own_recall(self.url, self.namespaces)}

    def snapshot(self) -> dict:
        """Every namespace's chunks (id -> text), read with the admin key."""
        return servers.memory_snapshot(self.url, self.admin)

    def ask(self, ns: load.Namespace) -> tuple[str, list[str]]:
        reply = requests.post(f"{self.url}/v1/chat/completions", headers=ns.headers, timeout=900, json={
            "model": "default", "user": ns.name, "max_tokens": load.MAX_TOKENS, "temperature": 0,
            "messages": [{"role": "user", "content": ns.question}]}).json()
        return reply["choices"][0]["message"]["content"], reply["usage"]["amem"]["memory"]["chunks"]

    def target(self) -> fuzz.Target:
        vocab = servers.model_vocab(self.client)
        ns, other = self.namespaces[0], self.namespaces[1]
        return fuzz.Target(ns.name, ns.ids, ns.native[0], vocab, ns.key, other.key)

    def fuzz(self, n: int, seed: int | None = None) -> dict:
        before, answer = self.snapshot(), self.ask(self.namespaces[0])
        report = fuzz.run(self.url, fuzz.generate(n, self.seed if seed is None else seed, self.target()))
        after = self.snapshot()
        return {**report, **self.health(), "memory_unchanged": after == before,
                "namespaces": len(after), "chunks": sum(len(c) for c in after.values()),
                "same_answer_after": self.ask(self.namespaces[0]) == answer}

    def residency_kill(self, clients: int, per_client: int, after_s: float = 5.0, seconds: float | None = None) -> dict:
        report = faults.residency_kill_under_load(
            self.server, lambda: load.run(self.url, self.namespaces, self.client, clients=clients,
                                          per_client=per_client, seed=self.seed + 1, seconds=seconds),
            after_s=after_s)
        return {**report, **self.health()}

    def disk_full(self, chunks: int) -> dict:
        key = add_key(self.keys_file, ["rel-disk"])[0]
        report = faults.disk_full(self.server, self.workdir / "residency", self.disk_budget, chunks=chunks,
                                  headers={"Authorization": f"Bearer {key}"}, namespace="rel-disk")
        return {**report, **self.health()}


def timed(step, *args, **kwargs) -> dict:
    t0 = time.monotonic()
    out = step(*args, **kwargs)
    out["step_s"] = round(time.monotonic() - t0, 1)
    return out
