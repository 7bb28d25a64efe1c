"""Servers for the reliability runs, and what is checked on them between runs.

* :func:`start` -- a server from a serve command (the README's, or the launcher's) with its own
  fresh residency and memory folders, a 16K-token KV pool, and optionally amem settings merged over
  configs/default.yaml into a config file of its own (e.g. a tiny ``amem.residency.disk_bytes``).
* :func:`leak_lines` -- SGLang's own memory-leak reports in a server log. The idle check in SGLang
  0.5.23's scheduler (``Scheduler.self_check_during_idle`` -> ``InvariantChecker``) reports
  ``"<pool> memory leak detected! ..."`` (token pool: available + evictable + protected != total),
  ``"req_to_token_pool memory leak detected!"``, ``"KV double free: ..."`` and ``"KV page
  use-after-free: ..."``; with ``SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE`` (on by default) each
  is raised as a ValueError in the scheduler, so a leak also ends the server.
* :func:`idle` -- the slot counts once nothing runs: SGLang's load report (``GET /v1/loads``:
  ``num_used_tokens`` = max_total - (available_size + evictable_size), running and waiting
  requests) and amem's tree (``protected_tokens``: locked nodes, ``pending_splices``).
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
import time
from pathlib import Path

import requests
import yaml

from amem_sgl.local_server import LocalServer, amem_state, free_port, start_server

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = "configs/default.yaml"
MAX_TOTAL_TOKENS = 16384
LAUNCHER = f"{sys.executable} -m amem_sgl.launch_server --config {DEFAULT_CONFIG}"

LEAK_PATTERNS = re.compile(r"memory leak detected|KV double free|KV page use-after-free")


def write_config(path: Path, amem: dict) -> Path:
    """configs/default.yaml with ``amem`` merged over its ``amem:`` section."""
    config = yaml.safe_load((ROOT / DEFAULT_CONFIG).read_text())
    merged = copy.deepcopy(config)

    def merge(into: dict, extra: dict) -> None:
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    merge(merged.setdefault("amem", {}), amem)
    path.write_text(yaml.safe_dump(merged, sort_keys=False))
    return path


def start(workdir: Path, *, serve_command: str = LAUNCHER, amem: dict | None = None,
          name: str = "server", timeout_s: float = 420) -> LocalServer:
    """Start ``serve_command`` (which names configs/default.yaml) on a free port, with this run's
    folders under ``workdir``; ``amem`` settings go into a config file of its own."""
    workdir.mkdir(parents=True, exist_ok=True)
    command = serve_command
    if amem:
        assert DEFAULT_CONFIG in command, f"the serve command names no {DEFAULT_CONFIG}: {command}"
        command = command.replace(DEFAULT_CONFIG, str(write_config(workdir / f"{name}.yaml", amem)))
    port = free_port()
    return start_server(f"{command} --port {port} --max-total-tokens {MAX_TOTAL_TOKENS}", port=port,
                        log_path=workdir / f"{name}-{int(time.time() * 1000)}.log", cwd=ROOT,
                        timeout_s=timeout_s,
                        env={"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": BENCH_THREADS,
                             "AMEM_SGL_RESIDENCY_DIR": str(workdir / "residency"),
                             "AMEM_SGL_MEMORY_DIR": str(workdir / "memory")})


# One torch thread per server (as benchmarks/fidelity.py): with a spinning thread per core, a loaded
# 2-core machine made this load decode at ~3 tokens/s (16 running requests, 5 s per step).
BENCH_THREADS = os.environ.get("OMP_NUM_THREADS", "1")


def memory_snapshot(url: str, headers: dict) -> dict:
    """Every namespace's chunks (id -> text) on the memory API at ``url``, as ``headers``' key sees them."""
    names = requests.get(f"{url}/amem/v1/namespaces", headers=headers, timeout=300).json()["namespaces"]
    return {ns: {c["id"]: c["text"] for c in requests.get(f"{url}/amem/v1/namespaces/{ns}/chunks", headers=headers,
                                                          timeout=300).json()["chunks"]} for ns in sorted(names)}


def model_vocab(client) -> int:
    """The served model's vocabulary size (its config.json), for out-of-vocabulary cases."""
    info = client._get("/get_model_info")
    return json.loads((Path(info["model_path"]) / "config.json").read_text())["vocab_size"]


def kill9(server: LocalServer) -> None:
    """kill -9 of the whole server (HTTP process, scheduler, detokenizer, residency service)."""
    try:
        os.killpg(server.proc.pid, 9)
    except ProcessLookupError:
        pass
    server.proc.wait(timeout=60)


def leak_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if LEAK_PATTERNS.search(line)]


def idle(url: str) -> dict:
    """SGLang's and amem's slot figures now."""
    load = requests.get(f"{url}/v1/loads", timeout=30).json()["loads"][0]
    tree = amem_state(url)
    return {"num_used_tokens": load["num_used_tokens"], "num_running_reqs": load["num_running_reqs"],
            "num_waiting_reqs": load["num_waiting_reqs"], "max_total_num_tokens": load["max_total_num_tokens"],
            "protected_tokens": tree["protected_tokens"], "pending_splices": tree["pending_splices"],
            "evictable_tokens": tree["evictable_tokens"]}


def is_idle(state: dict) -> bool:
    return not any(state[k] for k in ("num_used_tokens", "num_running_reqs", "num_waiting_reqs",
                                      "protected_tokens", "pending_splices"))


def wait_idle(url: str, timeout_s: float = 60) -> dict:
    """The idle figures once every slot is back (or the last figures after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = idle(url)
        if is_idle(state) or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def answers(url: str) -> bool:
    """A plain greedy request answers 200 with at least one token."""
    reply = requests.post(f"{url}/generate", json={"text": "The capital of France is",
                                                   "sampling_params": {"max_new_tokens": 3, "temperature": 0}},
                          timeout=300)
    return reply.status_code == 200 and reply.json()["meta_info"]["completion_tokens"] >= 1
