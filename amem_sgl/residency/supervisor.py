"""Start the residency service as its own process and keep it running.

:class:`Supervisor` launches ``python -m amem_sgl.residency.service`` and waits until its socket is
bound; a watcher thread restarts it (with a short back-off) whenever it exits unexpectedly, so a
crashed service costs chunk misses for a moment, never the server. ``launch_server`` owns one.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)


class Supervisor:
    def __init__(self, *, root: str | os.PathLike, address: str, cpu_bytes: int, disk_bytes: int,
                 policy: str = "value", weights: dict | None = None, shm_dir: str | None = None,
                 log_path: str | os.PathLike | None = None) -> None:
        self.root, self.address = Path(root).expanduser(), address
        self.args = ["--dir", str(self.root), "--address", address, "--cpu-bytes", str(cpu_bytes),
                     "--disk-bytes", str(disk_bytes), "--policy", policy, "--weights", json.dumps(weights or {})]
        if shm_dir:
            self.args += ["--shm-dir", shm_dir]
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self, timeout: float = 60.0) -> "Supervisor":
        self._spawn(timeout)
        self._watcher = threading.Thread(target=self._watch, name="amem-residency-supervisor", daemon=True)
        self._watcher.start()
        return self

    def _spawn(self, timeout: float) -> None:
        ready = Path(tempfile.mkdtemp(prefix="amem-residency-")) / "ready"
        out = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115 -- owned by the child
        self.process = subprocess.Popen([sys.executable, "-m", "amem_sgl.residency.service", *self.args,
                                         "--ready-file", str(ready), "--parent-pid", str(os.getpid())],
                                        stdout=out, stderr=out or None)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"amem residency service exited with {self.process.returncode} at start"
                                   + (f"; see {self.log_path}" if self.log_path else ""))
            if time.monotonic() > deadline:
                self.process.kill()
                raise TimeoutError(f"amem residency service not ready in {timeout:.0f}s")
            time.sleep(0.05)
        logger.info("amem residency service pid %d on %s (disk tier %s)", self.process.pid, self.address, self.root)

    def _watch(self) -> None:
        while not self._stopping.is_set():
            proc = self.process
            # Exit status 0 is a deliberate stop (SIGTERM from whoever shuts the server down): not restarted.
            if proc is not None and proc.poll() not in (None, 0) and not self._stopping.is_set():
                logger.error("amem residency service (pid %d) exited with %s; restarting", proc.pid, proc.returncode)
                self.restarts += 1
                time.sleep(min(0.2 * self.restarts, 2.0))
                try:
                    self._spawn(60.0)
                except Exception:  # noqa: BLE001 -- keep trying; the server keeps serving meanwhile
                    logger.exception("amem residency service restart failed")
            self._stopping.wait(0.2)

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
