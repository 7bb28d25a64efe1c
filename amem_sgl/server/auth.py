"""Who may use a namespace: API keys scoped to namespaces, and the per-server secret.

**Keys file** (``amem.auth.keys_file``; auth is on when it is set), JSON, written by ``amem keys add``
(atomically, mode 0600)::

    {"version": 1, "keys": {"<sha256 hex of the key>": {"name": "k-3f9a0c1d", "admin": false,
                                                         "namespaces": ["alice", "team-*"], "created": 1.7e9}}}

Only the SHA-256 of each key is stored. A key is ``amem_`` + 32 random bytes (``secrets``), so a slow
password hash (scrypt, bcrypt) would buy nothing -- there is no dictionary to slow down against a
256-bit random string -- and would cost its CPU on every request; a SHA-256 digest cannot be turned
back into the key, and looking it up by digest leaks no timing about the key itself. ``namespaces``
are names or ``fnmatch`` globs (namespaces cannot contain ``*?[]``); an ``admin`` key covers every
namespace and lists them all.

The server re-reads the file when it changes (``stat`` per guarded request: mtime, size, inode), so
a key added or removed takes effect on the next request. A file that cannot be read or parsed after
start fails closed: guarded requests get 503 until it is fixed (at start, the server refuses to run).

**Principals**: an amem key (its namespaces), SGLang's own ``--api-key`` / ``--admin-api-key`` (the
operator's keys: admin), and the memory layer's internal token (admin; in this process's memory
only, for the requests the layer sends to its own server's ``/generate``).

**Server secret**: 32 random bytes in a 0600 file beside the memory dir (``<memory dir>.secret``),
created at first start and kept, because chunk ids -- which name stored chunks and their KV on disk --
are keyed by it (amem_sgl.chunks.identity).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import fcntl
import fnmatch
import hashlib
import ipaddress
import json
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable

from amem_sgl.chunks.identity import SECRET_FILE_ENV, validate_namespace

logger = logging.getLogger(__name__)

KEY_PREFIX = "amem_"
_PATTERN = re.compile(r"^[A-Za-z0-9_.:@*?\[\]!-]{1,128}$")


class AuthUnavailable(RuntimeError):
    """The keys file cannot be read or parsed: no request is authorized until it is fixed."""


@dataclasses.dataclass(frozen=True)
class Principal:
    name: str
    namespaces: tuple[str, ...] = ()
    admin: bool = False

    def covers(self, namespace: str) -> bool:
        return self.admin or any(fnmatch.fnmatchcase(namespace, p) for p in self.namespaces)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _parse(text: str, where: str) -> dict[str, Principal]:
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("version") != 1 or not isinstance(data.get("keys"), dict):
        raise ValueError(f"{where}: expected {{\"version\": 1, \"keys\": {{...}}}}")
    out = {}
    for digest, entry in data["keys"].items():
        if not re.fullmatch(r"[0-9a-f]{64}", digest) or not isinstance(entry, dict):
            raise ValueError(f"{where}: key entries are sha256 hex digests mapping to objects")
        patterns, admin = entry.get("namespaces", []), entry.get("admin", False)
        if not isinstance(patterns, list) or not all(isinstance(p, str) and _PATTERN.fullmatch(p) for p in patterns):
            raise ValueError(f"{where}: key {entry.get('name', digest[:8])!r}: namespaces must be a list of "
                             "namespace names or glob patterns")
        if type(admin) is not bool:
            raise ValueError(f"{where}: key {entry.get('name', digest[:8])!r}: admin must be true or false")
        out[digest] = Principal(str(entry.get("name") or digest[:8]), tuple(patterns), admin)
    return out


class KeyStore:
    """The keys file, re-read when it changes."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._keys: dict[str, Principal] = {}
        self._error: str | None = None
        self.reloads = 0
        self._refresh()
        if self._error:
            raise ValueError(self._error)

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError as err:
            stamp, failure = None, f"keys file {self.path}: {err.strerror or err}"
        else:
            failure = None
        with self._lock:
            if stamp is not None and stamp == self._stamp:
                return
            if stamp is None:
                if self._error != failure:
                    logger.error("amem auth: %s; refusing every guarded request until it is back", failure)
                self._stamp, self._keys, self._error = None, {}, failure
                return
            try:
                keys = _parse(self.path.read_text(encoding="utf-8"), str(self.path))
            except (OSError, ValueError) as err:
                failure = f"keys file {self.path} is invalid: {err}"
                logger.error("amem auth: %s; refusing every guarded request until it is fixed", failure)
                self._stamp, self._keys, self._error = stamp, {}, failure
                return
            if self.reloads:
                logger.info("amem auth: keys file %s changed: %d key(s)", self.path, len(keys))
            self._stamp, self._keys, self._error = stamp, keys, None
            self.reloads += 1

    def lookup(self, key: str | None) -> Principal | None:
        self._refresh()
        if self._error:
            raise AuthUnavailable(self._error)
        return self._keys.get(key_hash(key)) if key else None


# ---------------------------------------------------------------- this server's authenticator

@dataclasses.dataclass
class Authenticator:
    """Turns a bearer token into a principal. ``keys`` None: auth is off (open, the loopback default)."""

    keys: KeyStore | None = None
    sglang_keys: tuple[str, ...] = ()  # SGLang's --api-key / --admin-api-key: admin
    internal_token: str = dataclasses.field(default_factory=lambda: secrets.token_urlsafe(32))

    @property
    def enabled(self) -> bool:
        return self.keys is not None

    def resolve(self, token: str | None) -> Principal | None:
        if not token:
            return None
        if secrets.compare_digest(token, self.internal_token):
            return Principal("amem-internal", admin=True)
        if any(secrets.compare_digest(token, k) for k in self.sglang_keys):
            return Principal("sglang-api-key", admin=True)
        return self.keys.lookup(token) if self.keys is not None else None

    def internal_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.internal_token}"}


ACTIVE: Authenticator | None = None  # set by the launcher in the HTTP process
_NOT_SET = object()
# The principal of the HTTP request being served (set by the auth guard; read where a request's
# namespaces are finally known: the memory routes and the tokenizer-manager check).
CURRENT: contextvars.ContextVar = contextvars.ContextVar("amem_principal", default=_NOT_SET)


def install(authenticator: Authenticator) -> None:
    global ACTIVE
    ACTIVE = authenticator


def enabled() -> bool:
    return ACTIVE is not None and ACTIVE.enabled


def denial_for(principal, namespaces: Iterable[str]) -> tuple[int, str] | None:
    """(status, message) when ``principal`` (None or unset: no valid key) may not use ``namespaces``;
    None when it may, or when auth is off."""
    if not enabled():
        return None
    if not isinstance(principal, Principal):
        return 401, "a valid amem API key is required (Authorization: Bearer <key>)"
    for namespace in namespaces:
        if not principal.covers(namespace):
            return 403, f"this API key does not cover namespace {namespace!r}"
    return None


def denial(namespaces: Iterable[str]) -> tuple[int, str] | None:
    """(status, message) when the current request may not use ``namespaces``; None when it may."""
    return denial_for(CURRENT.get(), namespaces)


# The guard also records the principal in the request's ASGI state (Starlette: ``request.state``),
# for readers CURRENT does not reach: SGLang converts OpenAI requests in an executor thread.
STATE_KEY = "amem_principal"


def record(scope: dict, principal: Principal | None) -> dict:
    """``scope`` with ``principal`` in a state of its own (a copy: never the server's shared state)."""
    return {**scope, "state": {**(scope.get("state") or {}), STATE_KEY: principal}}


def bearer_token(value: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value (None: none given)."""
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def request_denial(raw_request, namespaces: Iterable[str]) -> tuple[int, str] | None:
    """:func:`denial_for` the principal the guard recorded on ``raw_request`` (a Starlette Request or
    a shim with ``headers``/``state``). Nothing recorded -- a request that did not pass the guard --
    fails closed, but for the memory layer's internal token in its Authorization header."""
    if not enabled():
        return None
    principal = getattr(getattr(raw_request, "state", None), STATE_KEY, _NOT_SET)
    if principal is _NOT_SET:
        headers = getattr(raw_request, "headers", None) or {}
        token = bearer_token(next((v for k, v in headers.items() if k.lower() == "authorization"), None))
        if token and secrets.compare_digest(token, ACTIVE.internal_token):
            principal = Principal("amem-internal", admin=True)
    return denial_for(principal, namespaces)


def visible(namespaces: Iterable[str]) -> list[str]:
    """The namespaces the current request's key covers (all when auth is off)."""
    if not enabled():
        return list(namespaces)
    principal = CURRENT.get()
    if principal is _NOT_SET or principal is None:
        return []
    return [n for n in namespaces if principal.covers(n)]


# The proxy's callers send their amem key here: their Authorization header is the upstream provider's
# (the proxy's check: amem_sgl.proxy.guard).
PROXY_KEY_HEADER = "x-amem-api-key"


# ---------------------------------------------------------------- keys file writing (amem keys add)

def add_key(path: str | os.PathLike, namespaces: list[str], *, admin: bool = False) -> tuple[str, str]:
    """Create a key covering ``namespaces`` (names or globs; ``admin``: all) and store its hash in
    ``path`` (created if missing; rewritten atomically, mode 0600). Returns (key, name)."""
    if not namespaces and not admin:
        raise ValueError("give at least one namespace (or pattern), or --admin")
    for pattern in namespaces:
        if not _PATTERN.fullmatch(pattern):
            raise ValueError(f"not a namespace or glob pattern: {pattern!r}")
        if not any(c in pattern for c in "*?["):
            validate_namespace(pattern)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    name = f"k-{secrets.token_hex(4)}"
    with _editing(path) as data:
        data["keys"][key_hash(key)] = {"name": name, "namespaces": list(namespaces), "admin": bool(admin),
                                       "created": round(time.time(), 3)}
    return key, name


def remove_key(path: str | os.PathLike, name: str) -> bool:
    """Drop the key called ``name`` from ``path``; False when there is none of that name."""
    with _editing(path) as data:
        gone = [digest for digest, entry in data["keys"].items() if entry.get("name") == name]
        for digest in gone:
            del data["keys"][digest]
    return bool(gone)


def list_keys(path: str | os.PathLike) -> list[Principal]:
    return list(_parse(Path(path).expanduser().read_text(encoding="utf-8"), str(path)).values())


@contextlib.contextmanager
def _editing(path: str | os.PathLike):
    """The keys file's data to change in place, written back atomically (0600) after the block; one
    writer at a time (a lock file beside it), and never over a file the server could not read."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = {"version": 1, "keys": {}}
        if path.exists():
            text = path.read_text(encoding="utf-8")
            _parse(text, str(path))
            data = json.loads(text)
        before = json.dumps(data, sort_keys=True)
        yield data
        if json.dumps(data, sort_keys=True) != before:
            write_private(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file, fsync, rename), readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------- start-up

def is_loopback(host: str | None) -> bool:
    host = (host or "").strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname, "" or 0.0.0.0-like: reachable from elsewhere as far as we know


def exposure_error(host: str | None, keys_file: str, allow_open: bool) -> str | None:
    """Why the server must not start on ``host`` (None when it may)."""
    if keys_file or allow_open or is_loopback(host):
        return None
    return (f"refusing to serve on {host or 'all interfaces'!s}, a non-loopback address, without API keys: anyone "
            "who can reach it could read every namespace's memory. Create keys (amem keys add FILE NAMESPACE...) "
            "and set amem.auth.keys_file: FILE in the config, or set amem.auth.allow_open: true to serve "
            "without them (SGLang's --api-key alone does not scope namespaces)")


def secret_path(memory_dir: Path) -> Path:
    memory_dir = Path(memory_dir).expanduser()
    return memory_dir.parent / f"{memory_dir.name}.secret"


def ensure_secret(path: Path, *, data_dir: Path | None = None) -> Path:
    """The server secret file at ``path``: created (32 random bytes, hex, 0600) if missing, kept after.
    ``data_dir``: the memory dir it keys; one that already holds data gets a warning at creation."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            logger.warning("amem auth: %s was readable by others (mode %o); now 0600", path, mode)
            os.chmod(path, 0o600)
    else:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(secrets.token_hex(32) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        logger.info("amem auth: created the server secret %s (chunk ids are keyed by it: keep it with the "
                    "memory dir)", path)
        if data_dir is not None and Path(data_dir).is_dir() and any(Path(data_dir).iterdir()):
            logger.warning("amem auth: the memory in %s predates the server secret: its chunks keep their old "
                           "ids and are served as before, but their KV is computed once more, and remembering "
                           "the same text again stores a second copy (forget and remember a namespace to "
                           "move it to the new ids)", data_dir)
    return path


def publish_secret(path: Path) -> None:
    """Make ``path`` this process's (and its children's) server secret."""
    os.environ[SECRET_FILE_ENV] = str(path)
