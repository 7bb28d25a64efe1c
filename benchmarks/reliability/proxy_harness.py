"""The proxy fuzz's processes and checks (benchmarks/reliability/proxy_fuzz.py).

:class:`ProxyHarness` starts two proxy processes in front of one amem server (the chat upstream,
and the ``remote`` proxy's ``--memory``): ``remote`` and ``local`` (``--store``), both with one keys
file (an admin key, a key for the target namespace and ``unknown-fuzz-*``, a key for another
namespace), and gives each mode the target's secret and the other tenant's. :meth:`tenancy` is the
fixed tenancy table (every route that touches a namespace: 401 without a valid key, 403 with the
other tenant's, the right answer with the target's own); :meth:`stop` stops the proxies and says
whether any of their processes is left.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import time
from pathlib import Path

import requests

from amem_sgl.chunks.client import ChunkClient
from amem_sgl.local_server import LocalServer, free_port, start_server
from amem_sgl.server.auth import add_key
from benchmarks.reliability import fuzz, servers
from benchmarks.reliability.proxy_fuzz import KEY, MODES, PROVIDER, api_of, in_shape

ROOT = Path(__file__).resolve().parents[2]
SECRET, QUESTION = "The vault code of the fuzz target is 4417.", "Tell me the vault code, please."
OTHER_SECRET = "The locker code of the other tenant is 9052."
FILLER = "The fuzz target waters the garden on Tuesdays."
MAX_REQUEST_BYTES = 4 * 1024 * 1024  # the amem server's own limit (amem.server.max_request_bytes)


def start_proxy(workdir: Path, upstream: str, mode: str, keys_file: Path) -> LocalServer:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    where = f"--memory {upstream}" if mode == "remote" else f"--store {workdir / 'store'}"
    return start_server(f"{sys.executable} -m amem_sgl.proxy --upstream {upstream} --port {port} {where} "
                        f"--state-dir {workdir / 'state'} --keys-file {keys_file} "
                        f"--max-request-bytes {MAX_REQUEST_BYTES} --exit-with-parent", port=port,
                        log_path=workdir / "proxy.log", cwd=ROOT, timeout_s=300,
                        env={"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"})


def left_running(server: LocalServer, wait_s: float = 30.0) -> list[str]:
    """Processes of a stopped server's process group (start_server gives it its own) still alive
    ``wait_s`` after the stop returned (its children may take a moment after their parent): pid and
    command line of each."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.getpgid(int(pid)) == server.proc.pid:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        command = f.read().replace(b"\0", b" ").decode(errors="replace")
                    alive.append(f"{pid} {command[:120]}")
            except OSError:
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


class ProxyHarness:
    def __init__(self, workdir: Path, upstream: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir, self.upstream = workdir, upstream
        tag = secrets.token_hex(3)  # unique namespaces on a shared upstream
        self.namespace, self.other = f"pfz-{tag}", f"pfz-{tag}-other"
        keys_file = workdir / "proxy-keys.json"
        self.keys = {"admin": add_key(keys_file, [], admin=True)[0],
                     "target": add_key(keys_file, [self.namespace, "unknown-fuzz-*"])[0],
                     "other": add_key(keys_file, [self.other])[0]}
        self.proxies: dict[str, LocalServer] = {}
        try:
            for mode in MODES:
                self.proxies[mode] = start_proxy(workdir / mode, upstream, mode, keys_file)
            self.ids = {mode: self._remember(mode) for mode in MODES}
        except BaseException:
            self.stop()
            raise
        self.urls = {mode: p.url for mode, p in self.proxies.items()}

    def _remember(self, mode: str) -> list[str]:
        ids = []
        for ns, key, texts in ((self.namespace, "target", [SECRET, FILLER]), (self.other, "other", [OTHER_SECRET])):
            reply = requests.post(self.proxies[mode].url + "/amem/v1/remember", timeout=600,
                                  json={"namespace": ns, "texts": texts}, headers=self.bearer(key))
            assert reply.status_code == 200, (mode, reply.status_code, reply.text[:300])
            ids = ids or reply.json()["ids"]
        return ids  # the target's: its secret's chunk first

    def bearer(self, who: str) -> dict:
        return {"Authorization": f"Bearer {self.keys[who]}"}

    def stop(self) -> dict:
        """Forget the namespaces made here on the upstream (it may be shared), stop the proxies; the
        pids of any of their processes still alive afterwards."""
        remote = self.proxies.get("remote")
        if remote is not None and remote.proc.poll() is None:
            for ns in (self.namespace, self.other):
                with contextlib.suppress(requests.RequestException):
                    requests.delete(f"{remote.url}/amem/v1/namespaces/{ns}", headers=self.bearer("admin"), timeout=300)
        for proxy in self.proxies.values():
            proxy.stop()
        return {mode: left_running(p) for mode, p in self.proxies.items()}

    def targets(self) -> dict[str, fuzz.Target]:
        client = ChunkClient(self.upstream)
        vocab = servers.model_vocab(client)
        tokens = client.layout.tokens(SECRET + "\n")
        return {mode: fuzz.Target(self.namespace, self.ids[mode], tokens, vocab, self.keys["target"], self.keys["other"])
                for mode in MODES}

    def snapshot(self, mode: str) -> dict:
        """Every namespace's chunks (id -> text) as the admin key sees them through ``mode``'s proxy."""
        return servers.memory_snapshot(self.proxies[mode].url, self.bearer("admin"))

    def ask(self, mode: str, api: str) -> dict:
        """A memory turn for the target through ``mode``'s proxy: its answer and the chunks it used."""
        body = {"model": "default", "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": QUESTION}]}
        headers = {"Authorization": PROVIDER, KEY: self.keys["target"]}
        if api == "openai":
            reply = requests.post(self.proxies[mode].url + "/v1/chat/completions", timeout=900, headers=headers,
                                  json={**body, "user": self.namespace})
            text = reply.json()["choices"][0]["message"]["content"] if reply.status_code == 200 else reply.text
        else:
            reply = requests.post(self.proxies[mode].url + "/v1/messages", timeout=900, headers=headers,
                                  json={**body, "metadata": {"user_id": self.namespace}})
            text = ("".join(b.get("text", "") for b in reply.json()["content"]) if reply.status_code == 200
                    else reply.text)
        chunks = reply.json().get("usage", {}).get("amem", {}).get("chunk_ids", []) if reply.status_code == 200 else []
        return {"status": reply.status_code, "text": text, "chunks": chunks,
                "secret_recalled": self.ids[mode][0] in chunks}

    def state(self) -> dict:
        """What the fuzz must leave unchanged: each mode's memory and its answers (OpenAI, Anthropic)."""
        return {mode: {"memory": self.snapshot(mode), "openai": self.ask(mode, "openai"),
                       "anthropic": self.ask(mode, "anthropic")} for mode in MODES}

    def tenancy(self) -> dict:
        """Each route that touches the target's namespace, with no key, an invalid key, the other
        tenant's key and (where it changes no memory) the target's own: statuses and error shapes."""
        rows = []
        for mode in MODES:
            for method, path, body, extra, own in self._tenancy_requests(mode):
                named = " (X-Amem-Namespace)" if extra else " (user)" if "user" in (body or {}) else \
                    " (metadata.user_id)" if "metadata" in (body or {}) else ""
                label = path.replace(self.namespace, "{ns}").replace(self.ids[mode][0], "{id}")
                label = label.rsplit("/", 1)[0] + "/{sid}" if label.startswith("/amem/v1/sessions/") else label
                row = {"mode": mode, "route": f"{method} {label}{named}"}
                for who, want in (("none", 401), ("invalid", 401), ("other", 403), ("target", 200)):
                    if who == "target" and not own:
                        continue
                    reply = requests.request(method, self.proxies[mode].url + path, json=body, timeout=900,
                                             headers={**extra, **self._key_headers(path, who)})
                    shaped = want == 200 or in_shape(api_of(path), reply.status_code, reply)
                    row[who] = reply.status_code
                    row[f"{who}_ok"] = reply.status_code == want and shaped
                rows.append(row)
            self._list_rows(mode, rows)
        checks = [v for r in rows for k, v in r.items() if k.endswith("_ok")]
        return {"rows": rows, "checks": len(checks), "passed": sum(checks)}

    def _key_headers(self, path: str, who: str) -> dict:
        key = {"none": None, "invalid": "amem-not-a-key", "other": self.keys["other"], "target": self.keys["target"]}[who]
        if path.startswith("/v1/"):  # chat: Authorization is the provider's
            return {"Authorization": PROVIDER, **({KEY: key} if key else {})}
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _tenancy_requests(self, mode: str) -> list[tuple]:
        ns, cid = self.namespace, self.ids[mode][0]
        chat = {"model": "default", "max_tokens": 2, "temperature": 0, "messages": [{"role": "user", "content": QUESTION}]}
        named = {"x-amem-namespace": ns}
        out = [("POST", "/v1/chat/completions", {**chat, "user": ns}, {}, True),
               ("POST", "/v1/chat/completions", chat, named, True),
               ("POST", "/v1/messages", {**chat, "metadata": {"user_id": ns}}, {}, True),
               ("POST", "/v1/messages", chat, named, True),
               ("POST", "/amem/v1/remember", {"namespace": ns, "texts": ["Tenancy: this is never stored."]}, {}, False),
               ("POST", "/amem/v1/search", {"namespace": ns, "query": "vault code", "k": 2}, {}, True),
               ("GET", f"/amem/v1/namespaces/{ns}/chunks", None, {}, True),
               ("GET", f"/amem/v1/namespaces/{ns}/chunks/{cid}", None, {}, True),
               ("DELETE", f"/amem/v1/namespaces/{ns}/chunks/{cid}", None, {}, False),
               ("DELETE", f"/amem/v1/namespaces/{ns}", None, {}, False)]
        if mode == "remote":
            started = requests.post(self.proxies[mode].url + "/amem/v1/sessions", headers=self.bearer("target"),
                                    json={"namespace": ns, "chunk_ids": [cid]}, timeout=900)
            assert started.status_code == 200, started.text[:300]
            out += [("POST", "/amem/v1/sessions", {"namespace": ns, "chunk_ids": [cid]}, {}, False),
                    ("DELETE", f"/amem/v1/sessions/{started.json()['session_id']}", None, {}, True)]
        return out

    def _list_rows(self, mode: str, rows: list) -> None:
        """The namespace list: 401 without a valid key; each key sees only what it covers."""
        url = self.proxies[mode].url + "/amem/v1/namespaces"
        row = {"mode": mode, "route": "GET /amem/v1/namespaces"}
        for who, want in (("none", 401), ("invalid", 401)):
            reply = requests.get(url, headers=self._key_headers("/amem/v1/namespaces", who), timeout=300)
            row[who], row[f"{who}_ok"] = reply.status_code, reply.status_code == want and in_shape("memory", want, reply)
        for who, sees in (("other", False), ("target", True)):
            reply = requests.get(url, headers=self.bearer(who), timeout=300)
            row[who] = reply.status_code
            row[f"{who}_ok"] = reply.status_code == 200 and (self.namespace in reply.json()["namespaces"]) == sees
        rows.append(row)
