"""Starting the README's server command as a real process for the integration tests."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from amem_sgl.local_server import LocalServer, free_port, start_server

ROOT = Path(__file__).resolve().parents[1]
# First start on a fresh machine converts the model (~25 s) before SGLang starts (~40 s on 2 cores).
STARTUP_BOUND_S = 420


def readme_serve_command() -> str:
    """The one-line serve command from the README's set-up section (between its markers)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- serve-command -->\s*```bash\n(.+?)\n```", text, re.S)
    assert block, "README.md lost its <!-- serve-command --> block"
    return block.group(1).strip()


@dataclasses.dataclass
class RunningServer(LocalServer):
    kernel_call_log: Path = Path("/dev/null")


# A smaller KV pool for the session server (e.g. while several test sessions share the machine):
# appended as a flag, which wins over the config file.
MAX_TOTAL_TOKENS_ENV = "AMEM_TEST_MAX_TOTAL_TOKENS"


def start_readme_server(workdir: Path) -> RunningServer:
    port = free_port()
    kernel_call_log = workdir / "sgl_kernel_calls.log"
    extra = f" --max-total-tokens {int(os.environ[MAX_TOTAL_TOKENS_ENV])}" if os.environ.get(MAX_TOTAL_TOKENS_ENV) else ""
    server = start_server(f"{readme_serve_command()} --port {port}{extra}", port=port,
                          log_path=workdir / "server.log", cwd=ROOT, timeout_s=STARTUP_BOUND_S,
                          env={"AMEM_SGL_KERNEL_CALL_LOG": str(kernel_call_log), "PYTHONUNBUFFERED": "1",
                               # a fresh disk tier per test session: no chunks from earlier runs
                               "AMEM_SGL_RESIDENCY_DIR": str(workdir / "residency"),
                               "AMEM_SGL_MEMORY_DIR": str(workdir / "memory")})
    return RunningServer(server.url, server.log_path, server.startup_s, server.proc, kernel_call_log)
