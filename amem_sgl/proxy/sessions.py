"""Per-session state, persisted: the frozen system/tools, the memory block, and the exact text
injected into each turn, so the client's next request (which carries the history without the
injections) is rebuilt with the same bytes and the provider's prompt cache matches its prefix.

A session is named by the ``X-Amem-Session`` header, or derived from (API, namespace, the client's
system prompt, its first user message): the same conversation maps to the same session.
One JSON file per session under ``<state dir>/sessions/``, written atomically after every turn.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import re
import time
from pathlib import Path

from amem_sgl.residency.keys import private_dir, write_private_file

_SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")


def canonical(value) -> str:
    """A deterministic serialisation (sorted keys, no whitespace): equal values, equal strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest(*parts) -> str:
    # surrogatepass: a lone surrogate (a JSON escape a client may send) hashes too; valid text is unchanged
    return hashlib.sha256("\x00".join(canonical(p) for p in parts).encode("utf-8", "surrogatepass")).hexdigest()


def session_key(api: str, namespace: str, header: str | None, system, first_user) -> str:
    if header is not None:
        if not _SESSION_ID.fullmatch(header):
            raise ValueError(f"X-Amem-Session must be 1-128 characters of letters, digits and _.:@-, got {header[:80]!r}")
        return f"{api}-{digest(namespace, header)[:32]}"
    return f"{api}-{digest(namespace, system, first_user)[:32]}"


@dataclasses.dataclass
class Session:
    key: str
    namespace: str
    block_ids: list[str] = dataclasses.field(default_factory=list)
    block_text: str = ""
    frozen: dict = dataclasses.field(default_factory=dict)  # "system" / "tools": the first-seen value
    turns: dict = dataclasses.field(default_factory=dict)  # turn key -> {"ids": [...], "text": str}
    rebuilds: int = 0
    requests: int = 0
    updated: float = 0.0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class SessionStore:
    def __init__(self, root: str | os.PathLike) -> None:
        # Session files hold recalled memory text (block_text, turns): the state dir and its sessions/
        # folder 0700 and ours, each file 0600 (amem_sgl.residency.keys.private_dir).
        self.root = private_dir(private_dir(Path(root).expanduser()) / "sessions")
        self._open: dict[str, Session] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def lock(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    def get(self, key: str, namespace: str) -> Session:
        session = self._open.get(key)
        if session is None:
            path = self.root / f"{key}.json"
            if path.exists():
                session = Session(**json.loads(path.read_text()))
            else:
                session = Session(key, namespace)
            self._open[key] = session
        return session

    def save(self, session: Session) -> None:
        session.updated = time.time()
        path = self.root / f"{session.key}.json"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)  # one a crash left behind
        write_private_file(tmp, json.dumps(session.to_json()).encode("utf-8"))
        os.replace(tmp, path)

    def drop_namespace(self, namespace: str) -> None:
        """Forget every session of a namespace (its memory was deleted)."""
        for key, session in list(self._open.items()):
            if session.namespace == namespace:
                del self._open[key]
        for path in self.root.glob("*.json"):
            try:
                if json.loads(path.read_text()).get("namespace") == namespace:
                    path.unlink()
            except (OSError, ValueError):
                continue
