"""Fuzz the proxy (amem_sgl/proxy): generated bad requests on every route it serves, in both memory
modes (``--memory URL``: ``remote``, ``--store DIR``: ``local``), auth on (``--keys-file``). Each must
get a 4xx with a message in the route's own error shape (OpenAI's, Anthropic's, the memory API's;
the pass-through routes: the upstream's), never a 5xx; afterwards the proxies answer the same turns
from the same memory. A fixed table checks tenancy on every route (401 without a valid amem key, 403
for a namespace the key does not cover).

The cases are benchmarks/reliability/fuzz.py's (same categories and mutations, seeded), with the
proxy's own routes added: the Anthropic route, the chat routes named by ``X-Amem-Namespace`` /
``X-Amem-Session``, ``/amem/v1`` paths no memory route serves, and the pass-through. The amem key goes
where the proxy reads it: ``X-Amem-Api-Key`` on the chat routes (there ``Authorization`` is the
provider's), either header on the memory routes.

``python -m benchmarks.reliability.proxy_fuzz [--fuzz 2000]`` starts an amem server (the upstream and
the remote proxy's memory) and the two proxies, and writes
``benchmarks/results/<date>-<device>-reliability-proxy-fuzz.{json,md}``.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import contextlib
import datetime as dt
import json
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from unittest import mock

import requests

from benchmarks.reliability import fuzz, servers

KEY = "x-amem-api-key"
PROVIDER = "Bearer sk-provider-fuzz"  # the client's upstream key on the chat routes (never an amem key)
MODES = ("remote", "local")
CHAT = ("/v1/chat/completions", "/v1/messages")
ANTHROPIC = "POST /v1/messages"
HEADERS = ["POST /v1/chat/completions (amem headers)", "POST /v1/messages (amem headers)"]
UNSERVED, HEALTH = "ANY /amem/v1/{unserved}", "ANY /health"
PASSTHROUGH = ["POST /v1/completions", "POST /generate"]  # forwarded to the upstream as they came
BODY_ROUTES = ["POST /v1/chat/completions", ANTHROPIC, "POST /amem/v1/remember", "POST /amem/v1/search",
               "POST /amem/v1/sessions"]
ROUTES = {"remote": BODY_ROUTES + fuzz.PATH_ROUTES + HEADERS + [UNSERVED, HEALTH] + PASSTHROUGH,
          "local": BODY_ROUTES + fuzz.PATH_ROUTES + HEADERS + [UNSERVED]}

# The Anthropic route in fuzz.py's tables, and the fields the proxy itself reads on the chat routes.
_MORE_TYPES = {
    ANTHROPIC: [(("messages",), ["hello", 5, {"a": 1}, [1, 2]]), (("max_tokens",), ["ten", [2], {}]),
                (("metadata",), ["m", 5, [1]]), (("metadata", "user_id"), [123, ["a"], {}]),
                (("messages", 0, "content"), [5, {"a": 1}, [5], [{"type": 5}]]),
                (("system",), [5, {"a": 1}, [5], [{"type": "text", "text": 5}], [None]]),
                (("tools",), ["x", 5, {"a": 1}, [5], [None]]), (("temperature",), ["hot", [0]]),
                (("stream",), [[1], {"a": 1}])],
    "POST /v1/chat/completions": [(("tools",), ["x", 5, {"a": 1}, [5], [None]]), (("messages",), [["hi"], [None]]),
                                  (("messages", 0), ["hi", 5, None]), (("model",), [5, ["m"], {}])],
}
_MORE_VALUES = {
    ANTHROPIC: [(("max_tokens",), [-1, 0]), (("temperature",), [-1.0]), (("messages",), [[]]),
                (("messages", 0, "role"), ["wizard", ""]), (("metadata", "user_id"), ["bad ns!", "-x", "a" * 200]),
                (("messages", 0, "content"), ["word " * 20000, []]), (("top_p",), [1.5, -0.1])],
}
_MORE_STRINGS = {ANTHROPIC: [("messages", 0, "content"), ("metadata", "user_id"), ("system",)]}


def _more_bases(t: fuzz.Target) -> dict:
    return {ANTHROPIC: {"model": "default", "max_tokens": 2, "temperature": 0, "metadata": {"user_id": t.namespace},
                        "messages": [{"role": "user", "content": "What is the vault code?"}]}}


@contextlib.contextmanager
def _proxy_tables():
    """fuzz.py's tables with the proxy's routes added, while cases are generated (fuzz._json_case
    reads them as module globals; restored on exit)."""
    def merged(table, more):
        return {route: table.get(route, []) + extra for route, extra in more.items()}

    bases = fuzz._bases
    with mock.patch.object(fuzz, "_bases", lambda t: {**bases(t), **_more_bases(t)}), \
            mock.patch.dict(fuzz.TYPES, merged(fuzz.TYPES, _MORE_TYPES)), \
            mock.patch.dict(fuzz.VALUES, merged(fuzz.VALUES, _MORE_VALUES)), \
            mock.patch.dict(fuzz.STRINGS, merged(fuzz.STRINGS, _MORE_STRINGS)):
        yield


def _header_case(rng: random.Random, t: fuzz.Target, route: str, category: str) -> fuzz.Case | None:
    """A chat turn named by X-Amem-Namespace (no namespace in the body): bad names, bad sessions,
    bytes that are not text, a body that is not an object, a bad amem key."""
    path = route.split(" ")[1]
    body = {"model": "default", "max_tokens": 2, "messages": [{"role": "user", "content": "What is the vault code?"}]}
    raw, headers = fuzz._dumps(body), {"content-type": "application/json", "x-amem-namespace": t.namespace, **t.headers}
    if category == "bad_value":
        name, value = rng.choice([("x-amem-namespace", v) for v in ("", "bad ns!", "-x", "a" * 200, "ns/../x")]
                                 + [("x-amem-session", v) for v in ("", "bad id!", "-x", "s" * 200, "a/b")])
        headers[name] = value
    elif category == "invalid_unicode":
        headers[rng.choice(["x-amem-namespace", "x-amem-session"])] = rng.choice(["\xff\xfe", "ns\xe9\x80", "\xc0\xaf"]).encode("latin-1")
    elif category in ("malformed_json", "wrong_type"):
        raw = rng.choice([b"", b"null", b"[]", b"5", b'"text"', b"{", raw[:-3], b'{"messages": 5}', b'{"messages": []}'])
    elif category == "bad_key":
        headers["authorization"] = rng.choice([None, "Bearer ", "Bearer not-a-key", f"Bearer {t.api_key}x",
                                               f"Bearer {t.other_key}", t.api_key])  # None: no amem key
        if headers["authorization"] is None:
            del headers["authorization"]
    else:
        return None
    return fuzz.Case(route, category, "POST", path, raw, headers)


def _unserved_case(rng: random.Random, t: fuzz.Target, category: str) -> fuzz.Case | None:
    """``/amem/v1`` paths and methods no memory route serves (for a scoped key: refused or unknown)."""
    if category == "wrong_method":
        method, path = rng.choice(["PUT", "PATCH"]), rng.choice(["/amem/v1/remember", "/amem/v1/namespaces",
                                                                  f"/amem/v1/namespaces/{t.namespace}/chunks"])
    elif category in ("bad_value", "bad_key"):
        method = rng.choice(["GET", "POST", "DELETE"])
        path = rng.choice(["/amem/v1/anything", "/amem/v1/", "/amem/v1/namespaces/x/chunks/y/z", "/amem/v1/sessions",
                           "/amem/v1/namespaces//chunks", "/amem/v1/" + "a" * 3000])
    elif category == "invalid_unicode":
        method, path = "GET", rng.choice(["/amem/v1/%ff%fe", "/amem/v1/namespaces/%ED%A0%80/chunks/%C0%AF"])
    else:
        return None
    return fuzz.Case(UNSERVED, category, method, path, None, dict(t.headers))


def _one(rng: random.Random, t: fuzz.Target, route: str, category: str) -> fuzz.Case | None:
    if route in HEADERS:
        return _header_case(rng, t, route, category)
    if route == UNSERVED:
        return _unserved_case(rng, t, category)
    if route == HEALTH:
        method = rng.choice(["POST", "PUT", "DELETE", "PATCH"])
        return fuzz.Case(route, "wrong_method", method, "/health", None, {}) if category == "wrong_method" else None
    if route in fuzz.PATH_ROUTES:
        return fuzz._path_case(rng, t, route, category)
    if category == "wrong_method":
        return fuzz.Case(route, category, rng.choice(["PUT", "PATCH"]), route.split(" ")[1],
                         fuzz._dumps(fuzz._bases(t)[route]), {"content-type": "application/json", **t.headers})
    if category == "bad_key" and route in PASSTHROUGH:
        return None  # the pass-through needs no amem key (it touches no memory here)
    built = fuzz._json_case(rng, t, route, category)
    return built and fuzz.Case(route, category, "POST", route.split(" ")[1], *built)


def _as_proxy_call(rng: random.Random, mode: str, case: fuzz.Case) -> fuzz.Case:
    """The case named for its mode, with the amem key where the proxy reads it."""
    headers = dict(case.headers)
    auth = headers.pop("authorization", None)
    scheme, _, token = (auth or "").partition(" ")
    path = case.path.split("?")[0]
    if path in CHAT or case.route in PASSTHROUGH:
        headers["authorization"] = PROVIDER
        if auth is not None and path in CHAT:
            if scheme == "Bearer":
                headers[KEY] = token
            else:  # an amem key in the provider's header (not read there): no amem key
                headers["authorization"] = auth
    elif auth is not None:
        if scheme == "Bearer" and rng.random() < 0.3:
            headers[KEY] = token
        else:
            headers["authorization"] = auth
    return fuzz.Case(f"{mode} {case.route}", case.category, case.method, case.path, case.body, headers)


def generate(n: int, seed: int, targets: dict[str, fuzz.Target]) -> list[fuzz.Case]:
    """``n`` cases, deterministic from ``seed``, spread over every route of every mode in ``targets``."""
    rng = random.Random(seed)
    routes = [(mode, route) for mode in MODES if mode in targets for route in ROUTES[mode]]
    cases: list[fuzz.Case] = []
    with _proxy_tables():
        while len(cases) < n:
            mode, route = routes[len(cases) % len(routes)]
            category = rng.choices(list(fuzz.CATEGORIES), weights=list(fuzz.CATEGORIES.values()))[0]
            if route == HEALTH and rng.random() < 0.5:
                category = "wrong_method"
            elif route == "POST /generate" and rng.random() < 0.35:
                category = "bad_spans"  # as fuzz.generate: the chunk-span validation is /generate's own
            case = _one(rng, targets[mode], route, category)
            if case is not None:
                cases.append(_as_proxy_call(rng, mode, case))
    return cases


def api_of(path: str) -> str:
    """The error shape a route answers in: the API's (the proxy's own errors, and upstream errors on
    the OpenAI/Anthropic paths, in that shape), or the upstream's on its native pass-through paths."""
    path = path.split("?")[0]
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/v1/"):
        return "openai"
    return "memory" if path.startswith("/amem/v1") else "upstream"


def in_shape(api: str, status: int, reply: requests.Response | None) -> bool:
    """Whether ``reply`` is an error in ``api``'s own shape, with a message."""
    if reply is None:
        return False
    try:
        data = reply.json()
    except ValueError:
        return api == "upstream"
    error = data.get("error") if isinstance(data, dict) else None
    if api == "upstream":
        return True
    if not isinstance(error, dict) or not isinstance(error.get("message"), str) or not error["message"].strip():
        return False
    if api == "anthropic":
        return data.get("type") == "error" and isinstance(error.get("type"), str)
    return isinstance(error.get("type"), str) and (api == "openai" or error.get("code") == status)


class _Keeping(requests.Session):
    """A session that keeps its last reply (fuzz.send reads the message; the shape is checked here)."""

    last: requests.Response | None = None

    def request(self, *args, **kwargs):
        self.last = None
        self.last = super().request(*args, **kwargs)
        return self.last


def run(urls: dict[str, str], cases: list[fuzz.Case], workers: int = 4) -> dict:
    """Send every case to its mode's proxy: fuzz.run's report, with the error shape checked."""
    local = threading.local()

    def one(case: fuzz.Case) -> dict:
        if not hasattr(local, "session"):
            local.session = _Keeping()
        row = fuzz.send(urls[case.route.split(" ", 1)[0]], case, local.session)
        api = api_of(case.path)
        row["api"], row["shape_ok"] = api, in_shape(api, row["status"], local.session.last)
        row["ok"] = row["ok"] and row["shape_ok"]
        return row

    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(workers) as pool:
        rows = list(pool.map(one, cases))
    tally = {k: collections.defaultdict(collections.Counter) for k in ("route", "category", "api")}
    for r in rows:
        for k, counts in tally.items():
            counts[r[k]][str(r["status"])] += 1
    failures = [r for r in rows if not r["ok"]]
    return {"cases": len(rows), "four_xx_with_message": sum(r["ok"] for r in rows),
            "unexplained_failures": len(failures), "known_bugs": {},
            "five_xx": sum(r["status"] >= 500 for r in rows), "no_answer": sum(r["status"] == 0 for r in rows),
            "two_xx": sum(200 <= r["status"] < 300 for r in rows),
            "wrong_shape": sum(400 <= r["status"] < 500 and not r["shape_ok"] for r in rows),
            "wall_s": round(time.monotonic() - t0, 1),
            **{f"per_{k}": {name: dict(c) for name, c in sorted(v.items())} for k, v in tally.items()},
            "failures": failures[:40]}


def fuzz_step(harness, n: int, seed: int) -> dict:
    """The fuzz on a harness (benchmarks.reliability.proxy_harness): the memory and answers before,
    the cases, then the same checks after."""
    before = harness.state()
    report = run(harness.urls, generate(n, seed, harness.targets()))
    after = harness.state()
    report["after"] = {mode: {"memory_unchanged": after[mode]["memory"] == before[mode]["memory"],
                              "namespaces": len(after[mode]["memory"]),
                              "chunks": sum(len(c) for c in after[mode]["memory"].values()),
                              **{f"same_{api}_answer": after[mode][api] == before[mode][api]
                                 for api in ("openai", "anthropic")},
                              **{f"{api}_recalls_secret": after[mode][api]["secret_recalled"]
                                 for api in ("openai", "anthropic")},
                              "health": requests.get(harness.urls[mode] + "/health", timeout=60).status_code}
                       for mode in after}
    report["answers"] = {mode: {api: after[mode][api] for api in ("openai", "anthropic")} for mode in after}
    return report


def _counts(c: dict) -> str:
    return ", ".join(f"{s}: {n}" for s, n in sorted(c.items()))


def markdown(meta: dict, r: dict) -> str:
    fz, ten = r["fuzz"], r["tenancy"]
    lines = [f"# Reliability: proxy fuzz and tenancy ({meta['model']}, {meta['device']})", "",
             f"Command: `{meta['command']}`  ", f"Date: {meta['date']}; {meta['seconds']} s in all. Two proxies "
             "(`--memory` the upstream amem server: remote; `--store`: local), auth on (`--keys-file`), in front of "
             f"one amem server (started in {r['upstream_start_s']} s).", "", "## Fuzz", "",
             f"{fz['cases']} generated bad requests (seeded), {fz['wall_s']} s: **{fz['four_xx_with_message']}** a 4xx "
             f"with a message in the route's error shape, {fz['five_xx']} 5xx, {fz['two_xx']} 2xx, {fz['no_answer']} "
             f"unanswered, {fz['wrong_shape']} 4xx in the wrong shape; failures: **{fz['unexplained_failures']}**.", ""]
    for mode, a in fz["after"].items():
        lines.append(f"* {mode} proxy afterwards: memory unchanged {a['memory_unchanged']} ({a['namespaces']} "
                     f"namespaces, {a['chunks']} chunks); same OpenAI answer {a['same_openai_answer']}, same Anthropic "
                     f"answer {a['same_anthropic_answer']}; the secret's chunk recalled {a['openai_recalls_secret']} / "
                     f"{a['anthropic_recalls_secret']}; /health {a['health']}")
    lines += ["", "| route (proxy mode) | cases | status: count |", "|---|---|---|"]
    lines += [f"| `{route}` | {sum(c.values())} | {_counts(c)} |" for route, c in fz["per_route"].items()]
    lines += ["", "| category | cases | status: count |", "|---|---|---|"]
    lines += [f"| {k} | {sum(c.values())} | {_counts(c)} |" for k, c in fz["per_category"].items()]
    lines += ["", "| error shape expected | cases | status: count |", "|---|---|---|"]
    lines += [f"| {k} | {sum(c.values())} | {_counts(c)} |" for k, c in fz["per_api"].items()]
    lines += ["", "## Tenancy", "", f"{ten['passed']} of {ten['checks']} checks as expected: 401 without a key or "
              "with an invalid one, 403 with the other tenant's key (the namespace list: 200 without the target), "
              "200 with the target's own (routes that change memory are not sent with it).", "",
              "| proxy | route | no key | invalid key | other tenant's key | own key |", "|---|---|---|---|---|---|"]
    for row in ten["rows"]:
        cells = [f"{row[w]}{'' if row[w + '_ok'] else ' ✗'}" if w in row else "-" for w in ("none", "invalid", "other", "target")]
        lines.append(f"| {row['mode']} | `{row['route']}` | " + " | ".join(cells) + " |")
    lines += ["", "Processes left running after the stop (pids, per server's process group): "
              + ", ".join(f"{k} {v or 'none'}" for k, v in r["left_running"].items()) + "."]
    if fz["failures"]:
        lines += ["", "## Failures (first 40)", ""] + [f"* {f['route']} {f['category']} -> {f['status']} "
                                                       f"(shape ok {f['shape_ok']}): {f['message'][:120]!r}; "
                                                       f"`{f['request'][:160]}`" for f in fz["failures"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from benchmarks.fidelity import device_name
    from benchmarks.reliability.proxy_harness import ProxyHarness, left_running

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fuzz", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results")
    args = parser.parse_args(argv)
    # SIGTERM (a timeout, a kill) ends the run through its finally: the servers are stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work, t0, results = Path(tempfile.mkdtemp(prefix="amem-proxy-fuzz-")), time.monotonic(), {}
    upstream = servers.start(work / "upstream", name="upstream")
    results["upstream_start_s"] = round(upstream.startup_s, 1)
    harness = None
    try:
        harness = ProxyHarness(work / "proxies", upstream.url)
        results["tenancy"] = harness.tenancy()
        print(f"tenancy: {results['tenancy']['passed']}/{results['tenancy']['checks']}", flush=True)
        results["fuzz"] = fuzz_step(harness, args.fuzz, args.seed)
        print("fuzz:", {k: results["fuzz"][k] for k in ("cases", "four_xx_with_message", "five_xx", "two_xx",
                                                         "wrong_shape", "unexplained_failures")}, flush=True)
    finally:
        results["left_running"] = harness.stop() if harness else {}
        upstream.stop()
        results["left_running"]["upstream"] = left_running(upstream)
    meta = {"device": device_name(), "model": "SmolLM2-135M-Instruct (bf16)", "seconds": round(time.monotonic() - t0),
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "command": "python -m benchmarks.reliability.proxy_fuzz " + " ".join(argv if argv is not None else sys.argv[1:]),
            "args": {k: str(v) for k, v in vars(args).items()}}
    stem = args.out / f"{dt.date.today().isoformat()}-{meta['device']}-reliability-proxy-fuzz"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, **results}, indent=1))
    stem.with_suffix(".md").write_text(markdown(meta, results))
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
