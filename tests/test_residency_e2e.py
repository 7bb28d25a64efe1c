"""The residency service inside the real server: chunks survive a server restart (loaded from disk,
not recomputed), memory (texts + index) persists, and a killed service is restarted while the
server keeps serving."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from amem_sgl.chunks.client import ChunkClient
from amem_sgl.sdk import Amem
from tests.greedy import TOP2, assert_same_greedy
from tests.server import start_readme_server

pytestmark = pytest.mark.slow

FACTS = ["Ingrid Berg keeps a red canoe at the lake house in Bergen.\n",
         "Ingrid's neighbor Hugo Laurent restores old pianos in Porto.\n",
         "Hugo's sister Leila Haddad teaches sailing in Halifax.\n"]
QUESTION = "Where does Hugo's sister teach sailing?"
NAMESPACE = "restart-ns"


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def residency_pids(server) -> list[int]:
    from benchmarks.residency import residency_pids as live

    return live(server)


def test_chunks_survive_a_restart_and_a_killed_residency_service_comes_back(tmp_path):
    disk = tmp_path / "residency"
    server = start_readme_server(tmp_path)
    try:
        client = ChunkClient(server.url)
        chunks = [client.register(fact, NAMESPACE).token_ids for fact in FACTS]
        prompt = client.layout.compose([chunks[i] for i in (2, 0, 1)], QUESTION)
        before = client.generate(prompt, NAMESPACE, max_new_tokens=12, extra=TOP2)
        remembered = Amem(server.url).remember("restart-memory", ["The lighthouse on Skerry Point is painted red.",
                                                                  "The ferry leaves at seven every morning."]).ids
        assert before.amem["spliced_tokens"] == prompt.chunk_tokens and before.amem["loaded_tokens"] == 0
        # Written through to disk in the background: the three chunks and the two memory chunks.
        wait_for(lambda: len(list(disk.glob("*.safetensors"))) == 5, 60, "5 chunk files on disk")
    finally:
        server.stop()

    server = start_readme_server(tmp_path)  # same disk tier, empty device pool
    try:
        client = ChunkClient(server.url)
        # Memory (texts + vector index) persisted too.
        memory = Amem(server.url)
        assert sorted(c.id for c in memory.list("restart-memory")) == sorted(remembered)
        assert memory.search("restart-memory", "When does the boat depart?", k=1)[0].id == remembered[1]
        after = client.generate(prompt, NAMESPACE, max_new_tokens=12, extra=TOP2)
        # Every chunk came from the disk tier: loaded, spliced, nothing registered or recomputed anew;
        # the preamble (not cached on a fresh server) was computed in the blend pass.
        assert after.amem["loaded_tokens"] == prompt.chunk_tokens == after.amem["spliced_tokens"]
        assert after.amem["gap_tokens"] == len(client.layout.preamble)
        assert after.amem["recomputed_tokens"] == before.amem["recomputed_tokens"]  # the same blend policy
        assert after.cached_tokens >= len(client.layout.preamble) + prompt.chunk_tokens
        # The same chunk KV, but another blend pass (the preamble is a gap now): the same greedy
        # answer up to a near-tie, not the same bits.
        assert assert_same_greedy(after, before) >= 4
        stats = server.amem_state()["stats"]
        assert stats["chunks_restored"] == 3 and stats["chunks_registered"] == 3 and stats["chunks_stored"] == 0

        # kill -9 the residency service: serving goes on, the launcher's supervisor restarts it.
        (pid,) = residency_pids(server)
        os.kill(pid, signal.SIGKILL)
        again = client.generate(prompt, NAMESPACE, max_new_tokens=12, extra=TOP2)  # device hit, no service
        assert assert_same_greedy(again, after) >= 4 and again.cached_tokens >= after.cached_tokens
        new_pid = wait_for(lambda: [p for p in residency_pids(server) if p != pid], 60, "a restarted service")[0]
        client.register("A brand new fact about Halifax harbours.\n", NAMESPACE)
        wait_for(lambda: len(list(disk.glob("*.safetensors"))) == 6, 60, "the new chunk stored by the new service")
        assert psutil.pid_exists(new_pid) and server.proc.poll() is None
    finally:
        server.stop()
    assert not residency_pids_alive(pid_list=[pid])


def residency_pids_alive(pid_list: list[int]) -> bool:
    return any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pid_list)
