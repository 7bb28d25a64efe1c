"""Run an amem server as a child process on this machine (tests, benchmarks, the CLI).

The command is a shell line (so the README's own command can be run as written); the child gets its
own process group, so stopping it stops SGLang's scheduler and detokenizer processes too.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import requests


# Servers this process started and has not stopped (pid -> process), for :func:`kill_started`.
_STARTED: dict[int, subprocess.Popen] = {}


def kill_started() -> None:
    """SIGKILL the process group of every server this process started and has not stopped: for a
    signal handler that has no time for a graceful stop (a benchmark step past its timeout)."""
    for proc in list(_STARTED.values()):
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    _STARTED.clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class LocalServer:
    url: str
    log_path: Path
    startup_s: float
    proc: subprocess.Popen

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def amem_state(self) -> dict:
        """The amem tree's report from /get_server_info (internal_states[0].amem)."""
        return amem_state(self.url)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        _STARTED.pop(self.proc.pid, None)

    def __enter__(self) -> "LocalServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def flush_cache(url: str, *, tries: int = 50, wait_s: float = 0.2) -> None:
    """SGLang's ``/flush_cache`` (the radix tree emptied); it refuses while requests run, so retry."""
    for _ in range(tries):
        if requests.post(f"{url}/flush_cache", timeout=60).status_code == 200:
            return
        time.sleep(wait_s)
    raise RuntimeError(f"{url}/flush_cache kept refusing (requests still running?)")


def amem_state(url: str) -> dict:
    """The amem tree's report from the server at ``url``'s /get_server_info (internal_states[0].amem)."""
    info = requests.get(f"{url}/get_server_info", timeout=30).json()
    (state,) = [s["amem"] for s in info["internal_states"]]
    return state


def start_server(command: str, *, port: int, log_path: Path, cwd: Path | None = None,
                 env: dict | None = None, timeout_s: float = 420) -> LocalServer:
    """Run ``command`` (which must serve on ``port``) and wait until /health answers 200."""
    t0 = time.monotonic()
    # A server runs compiled Triton or none: the interpreter switch of a CPU test session stays out.
    child_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child_env.update(env or {})
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=child_env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    _STARTED[proc.pid] = proc
    server = LocalServer(f"http://127.0.0.1:{port}", Path(log_path), 0.0, proc)
    try:
        while time.monotonic() - t0 < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()[-4000:]}")
            try:
                if requests.get(f"{server.url}/health", timeout=5).status_code == 200:
                    server.startup_s = time.monotonic() - t0
                    return server
            except requests.RequestException:
                pass
            time.sleep(2)
        raise TimeoutError(f"server not ready in {timeout_s:.0f}s:\n{server.log()[-4000:]}")
    except BaseException:  # not ready, exited, or interrupted while starting: nothing left running
        server.stop()
        raise
