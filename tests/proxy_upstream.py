"""The proxy tests' upstream: a plain SGLang 0.5.23 server on the embedded model (started once per
test process, stopped at exit), and a recording relay in front of it.

The relay is a byte-level TCP forwarder: it is there only so a test can see the exact request bytes
the proxy sent (SGLang keeps no copy of a request's raw body); it changes nothing on the way.
"""

from __future__ import annotations

import atexit
import socket
import tempfile
import threading
from pathlib import Path

from amem_sgl.local_server import LocalServer, free_port, start_server
from benchmarks.proxy_cost import plain_upstream_command

_UPSTREAM: LocalServer | None = None


def plain_upstream() -> LocalServer:
    global _UPSTREAM
    if _UPSTREAM is None or _UPSTREAM.proc.poll() is not None:
        port = free_port()
        log = Path(tempfile.mkdtemp(prefix="amem-proxy-upstream-")) / "upstream.log"
        _UPSTREAM = start_server(plain_upstream_command(port), port=port, log_path=log)
        atexit.register(_UPSTREAM.stop)
    return _UPSTREAM


def parse_requests(stream: bytes) -> list[tuple[str, dict, bytes]]:
    """(request line, lower-cased headers, body) of each complete HTTP/1.1 request in ``stream``."""
    out = []
    while True:
        head_end = stream.find(b"\r\n\r\n")
        if head_end < 0:
            return out
        line, *fields = stream[:head_end].decode("latin-1").split("\r\n")
        headers = {}
        for field in fields:
            name, _, value = field.partition(":")
            headers[name.strip().lower()] = value.strip()
        size = int(headers.get("content-length", 0))
        body = stream[head_end + 4: head_end + 4 + size]
        if len(body) < size:
            return out
        out.append((line, headers, body))
        stream = stream[head_end + 4 + size:]


class RecordingRelay:
    """Listens on a free port and forwards every connection to ``target`` (host, port), keeping what
    the client side sent."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._streams: list[bytearray] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def requests(self) -> list[tuple[str, dict, bytes]]:
        with self._lock:
            return [r for s in self._streams for r in parse_requests(bytes(s))]

    def clear(self) -> None:
        with self._lock:
            for s in self._streams:
                s.clear()

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            upstream = socket.create_connection(self.target)
            record = bytearray()
            with self._lock:
                self._streams.append(record)
            threading.Thread(target=self._pipe, args=(client, upstream, record), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, None), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, record: bytearray | None) -> None:
        try:
            while data := src.recv(65536):
                if record is not None:
                    with self._lock:
                        record += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
