"""Starting the README's server command as a real process for the integration tests."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
# First start on a fresh machine converts the model (~25 s) before SGLang starts (~40 s on 2 cores).
STARTUP_BOUND_S = 420


def readme_serve_command() -> str:
    """The one-line serve command from the README's set-up section (between its markers)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- serve-command -->\s*```bash\n(.+?)\n```", text, re.S)
    assert block, "README.md lost its <!-- serve-command --> block"
    return block.group(1).strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class RunningServer:
    url: str
    log_path: Path
    kernel_call_log: Path
    startup_s: float
    proc: subprocess.Popen

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def amem_state(self) -> dict:
        info = requests.get(f"{self.url}/get_server_info", timeout=30).json()
        (state,) = [s["amem"] for s in info["internal_states"]]
        return state

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


def start_readme_server(workdir: Path, extra_args: str = "") -> RunningServer:
    port = free_port()
    log_path = workdir / "server.log"
    kernel_call_log = workdir / "sgl_kernel_calls.log"
    env = dict(os.environ, AMEM_SGL_KERNEL_CALL_LOG=str(kernel_call_log), PYTHONUNBUFFERED="1")
    command = f"{readme_serve_command()} --port {port} {extra_args}"
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["bash", "-c", command], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    server = RunningServer(f"http://127.0.0.1:{port}", log_path, kernel_call_log, 0.0, proc)
    while time.monotonic() - t0 < STARTUP_BOUND_S:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()[-4000:]}")
        try:
            if requests.get(f"{server.url}/health", timeout=5).status_code == 200:
                server.startup_s = time.monotonic() - t0
                return server
        except requests.RequestException:
            pass
        time.sleep(2)
    server.stop()
    raise TimeoutError(f"server not ready in {STARTUP_BOUND_S}s:\n{server.log()[-4000:]}")
