"""Fuzz: generated bad requests on every route; each must get a 4xx with a message, never a 5xx.

Cases are built from a valid request per route and one mutation (malformed JSON, a wrong type, bad
chunk spans, an unknown field where the API forbids them, invalid unicode, an oversized body,
out-of-vocabulary token ids, a bad value, a wrong method, a bad API key when auth is on), drawn
from a seeded ``random.Random``: the same seed gives the same requests. No case is a valid request
that could change memory (destructive routes only ever name unknown namespaces, chunks, sessions).

SGLang's ``/generate`` and OpenAI routes ignore unknown *top-level* fields (by design; SGLang's
request models allow extras), so unknown fields are fuzzed where a schema forbids them: amem's
memory bodies, the ``amem.chunks`` payload, ``sampling_params``, a blend object.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import copy
import dataclasses
import json
import random
import time
from urllib.parse import quote

import requests

from amem_sgl.chunks.client import error_message
from amem_sgl.chunks.hints import build_kv_hints

OVERSIZE = 4 * 1024 * 1024 + 1024  # over amem.server.max_request_bytes (4 MiB)
WRONG = [123, -1.5, "text", [], {}, True, [1, "a"], {"a": 1}]
CATEGORIES = {"malformed_json": 3, "wrong_type": 3, "bad_spans": 2, "unknown_field": 2, "invalid_unicode": 2,
              "oversized": 0.4, "oov_token": 2, "bad_value": 3, "wrong_method": 0.2, "bad_key": 2, "reserved_key": 1}


@dataclasses.dataclass
class Case:
    route: str
    category: str
    method: str
    path: str
    body: bytes | None
    headers: dict


@dataclasses.dataclass
class Target:
    """What the cases aim at: a namespace with memory (never changed by a case), its chunk ids and
    the token ids of one of its chunks, the model's vocabulary size, and the keys when auth is on."""

    namespace: str
    chunk_ids: list[str]
    chunk_tokens: list[int]
    vocab_size: int
    api_key: str | None = None  # a valid key for the namespace (auth on), or None (auth off)
    other_key: str | None = None  # a valid key for another namespace only (403 here)

    @property
    def headers(self) -> dict:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def _bases(t: Target) -> dict:
    """A valid body per JSON route (the mutations make each invalid)."""
    ids = [1, 2, 3] + t.chunk_tokens + [4, 5]
    hints = build_kv_hints(t.namespace, [(3, 3 + len(t.chunk_tokens))])
    hints["message_id"], hints["actions"][0]["action_id"] = "fuzz-m", "fuzz-a"  # ids fixed: same seed, same bytes
    return {
        "POST /generate": {"input_ids": ids, "sampling_params": {"max_new_tokens": 2, "temperature": 0}, "kv_hints": hints},
        "POST /v1/chat/completions": {"model": "default", "max_tokens": 2, "temperature": 0, "user": t.namespace,
                                      "messages": [{"role": "user", "content": "What is the vault code?"}]},
        "POST /v1/completions": {"model": "default", "max_tokens": 2, "temperature": 0, "user": t.namespace,
                                 "prompt": "Q: What is the vault code?\nA:"},
        "POST /amem/v1/remember": {"namespace": t.namespace, "texts": ["A fact that must never be stored."]},
        "POST /amem/v1/search": {"namespace": t.namespace, "query": "vault code", "k": 2},
        "POST /amem/v1/sessions": {"namespace": t.namespace, "chunk_ids": t.chunk_ids[:1]},
    }


# Per route: (field path, wrong-typed values) and (field path, bad values) -- each invalid there.
TYPES = {
    "POST /generate": [(("input_ids",), ["12", {"a": 1}, 3.5, [[1], "x"]]), (("sampling_params",), ["x", 5, True]),
                       (("sampling_params", "max_new_tokens"), ["many", [2], 2.5]),
                       (("sampling_params", "temperature"), ["hot", [0]]), (("kv_hints",), ["hints", 7, [1]]),
                       (("kv_hints", "actions"), ["x", 5]), (("stream",), [[1], {"a": 1}])],
    "POST /v1/chat/completions": [(("messages",), ["hello", 5, {"a": 1}, [1, 2]]), (("max_tokens",), ["ten", [2], {}]),
                                  (("temperature",), ["hot", [0]]), (("user",), [123, ["a"], {}]),
                                  (("messages", 0, "content"), [5, {"a": 1}]), (("stream",), [[1], {"a": 1}])],
    "POST /v1/completions": [(("prompt",), [{"a": 1}, 5.5, [None]]), (("max_tokens",), ["ten", [2]]),
                             (("user",), [123, ["a"]]), (("temperature",), ["hot"])],
    "POST /amem/v1/remember": [(("namespace",), [123, None, ["a"], {}]), (("texts",), ["one text", 5, [1, 2], [None]]),
                               (("metadata",), ["m", 5, [1]]), (("documents",), ["d", [5], [{"text": 5}]]),
                               (("prefill",), [5, True])],
    "POST /amem/v1/search": [(("namespace",), [123, None, []]), (("query",), [5, None, ["q"]]), (("k",), ["two", [2], 2.5, None])],
    "POST /amem/v1/sessions": [(("namespace",), [123, None, []]), (("chunk_ids",), ["id", [5], 5]), (("k",), ["two", 1.5]),
                               (("query",), [5, ["q"]])],
}
VALUES = {
    "POST /generate": [(("sampling_params", "max_new_tokens"), [-1, -100]), (("sampling_params", "temperature"), [-1.0]),
                       (("sampling_params", "top_p"), [1.5, -0.1]), (("input_ids",), [[]])],
    "POST /v1/chat/completions": [(("max_tokens",), [-1, 0 - 10**6]), (("temperature",), [-1.0, -50]),
                                  (("top_p",), [1.5, -0.1]), (("messages",), [[]]),
                                  (("messages", 0, "role"), ["wizard", ""]), (("user",), ["bad ns!", "-x", "a" * 200, "ns/../x"]),
                                  (("messages", 0, "content"), ["word " * 20000])],
    "POST /v1/completions": [(("max_tokens",), [-1]), (("temperature",), [-1.0]), (("user",), ["bad ns!", "a" * 200]),
                             (("prompt",), ["word " * 20000]), (("n",), [0, -1])],
    "POST /amem/v1/remember": [(("namespace",), ["", "bad ns!", "-x", "a" * 200]), (("texts",), [[], [""], ["   "]]),
                               (("prefill",), ["sometimes", ""]), (("texts",), [["x"] * 1100])],
    "POST /amem/v1/search": [(("k",), [0, -1, 101, 10**9]), (("namespace",), ["", "bad ns!", "unknown-fuzz-ns"])],
    "POST /amem/v1/sessions": [(("chunk_ids",), [["zz"], ["a" * 64], ["A" * 64]]), (("k",), [0, 101]),
                               (("namespace",), ["", "bad ns!", "unknown-fuzz-ns"])],
}
UNKNOWN = {
    "POST /generate": [("sampling_params",), ("kv_hints", "actions", 0, "payload")],
    "POST /amem/v1/remember": [(), ("documents", 0)],
    "POST /amem/v1/search": [()], "POST /amem/v1/sessions": [()],
}
STRINGS = {  # string fields that invalid unicode goes into
    "POST /generate": [("text",)], "POST /v1/chat/completions": [("messages", 0, "content"), ("user",)],
    "POST /v1/completions": [("prompt",), ("user",)], "POST /amem/v1/remember": [("texts", 0), ("namespace",)],
    "POST /amem/v1/search": [("query",), ("namespace",)], "POST /amem/v1/sessions": [("query",), ("namespace",)],
}
PATH_ROUTES = ["GET /amem/v1/namespaces", "GET /amem/v1/namespaces/{ns}/chunks", "GET /amem/v1/namespaces/{ns}/chunks/{id}",
               "DELETE /amem/v1/namespaces/{ns}/chunks/{id}", "DELETE /amem/v1/namespaces/{ns}",
               "DELETE /amem/v1/sessions/{id}", "POST /v1/chat/completions (session header)"]


def _set(body, path, value):
    node = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def _dumps(body) -> bytes:
    return json.dumps(body).encode()


def _json_case(rng: random.Random, t: Target, route: str, category: str) -> tuple[bytes, dict] | None:
    body = copy.deepcopy(_bases(t)[route])
    headers = {"content-type": "application/json", **t.headers}
    if category == "malformed_json":
        raw = _dumps(body)
        choice = rng.randrange(5)
        if choice == 0:
            raw = raw[:rng.randrange(1, len(raw) - 1)]
        elif choice == 1:
            raw = raw + rng.choice([b"}", b"]]", b",", b"garbage"])
        elif choice == 2:
            raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        elif choice == 3:
            raw = rng.choice([b"", b"[]", b"null", b"5", b'"text"', b"[{}]"])
        else:
            raw = raw.replace(b'"', b"'", rng.randrange(1, 4))
        try:
            if isinstance(json.loads(raw), dict):
                return None  # still a valid object: not a malformed-JSON case
        except ValueError:
            pass
        return raw, headers
    if category == "wrong_type":
        path, values = rng.choice(TYPES[route])
        _set(body, path, rng.choice(values))
    elif category == "bad_value":
        path, values = rng.choice(VALUES[route])
        _set(body, path, rng.choice(values))
    elif category == "unknown_field":
        if route not in UNKNOWN:
            return None
        path = rng.choice(UNKNOWN[route])
        if path == ("documents", 0):
            body["documents"] = [{"text": body.pop("texts")[0]}]
        node = body
        for key in path:
            node = node[key]
        node[f"bogus_{rng.randrange(10**6)}"] = rng.choice(WRONG)
    elif category == "invalid_unicode":
        path = rng.choice(STRINGS[route])
        if path == ("text",):
            body.pop("input_ids"), body.pop("kv_hints")
        if route == "POST /amem/v1/sessions":
            body.pop("chunk_ids")  # with chunk ids the query is not used
        marker = f"FUZZ{rng.randrange(10**9)}"
        _set(body, path, f"before {marker} after")
        raw = _dumps(body)
        bad = rng.choice([b"\\ud800", b"\\udcff\\ud800", b"\xff\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"\x80abc"])
        return raw.replace(marker.encode(), bad), headers
    elif category == "oversized":
        key = {"POST /generate": ("text",), "POST /amem/v1/remember": ("texts", 0)}.get(route)
        body[key[-1] if key and len(key) == 1 else "padding"] = "x" * OVERSIZE
        if key and len(key) == 2:
            body["texts"] = ["x" * OVERSIZE]
        return _dumps(body), headers
    elif category == "oov_token":
        bad = rng.choice([-1, t.vocab_size, 10**12, 2**63, -(2**40)])
        ids = [1, 2, 3] + t.chunk_tokens[:4]
        ids.insert(rng.randrange(len(ids) + 1), bad)
        if route == "POST /generate":
            body.pop("kv_hints")
            body["input_ids"] = rng.choice([ids, [ids[:3], ids]])
        elif route == "POST /v1/completions":
            body.pop("user")
            body["prompt"] = rng.choice([ids, [ids[:3], ids]])
        elif route == "POST /v1/chat/completions":
            body.pop("user")  # a memory turn replaces input_ids with its own prompt (see the report's findings)
            body["input_ids"] = ids
        else:
            return None
    elif category == "bad_spans":
        if route != "POST /generate":
            return None
        _bad_spans(rng, body, t)
    elif category == "bad_key":
        if t.api_key is None:
            return None
        headers["authorization"] = rng.choice(["Bearer ", "Bearer not-a-key", f"Bearer {t.api_key}x",
                                               f"Basic {t.api_key}", "Bearer " + "z" * 300, t.api_key,
                                               f"Bearer {t.other_key}", f"Bearer {t.other_key}"])
    elif category == "reserved_key":
        if route not in ("POST /generate", "POST /v1/chat/completions", "POST /v1/completions"):
            return None
        body[rng.choice(["extra_key", "cache_salt"])] = rng.choice(
            [f"amem:ns:{t.namespace}", "amem:chunk:" + "0" * 64, f"x-amem:{t.namespace}", "amem:"])
    elif category == "wrong_method":
        return None
    return _dumps(body), headers


def _bad_spans(rng: random.Random, body: dict, t: Target) -> None:
    payload = body["kv_hints"]["actions"][0]["payload"]
    n = len(body["input_ids"])
    choice = rng.randrange(12)
    if choice < 7:
        payload["spans"] = rng.choice([
            [[-1, 3]], [[5, 3]], [[2, 2]], [[0, n + 1]], [[0, 10**12]], [[-(10**12), 2]], [[1, 4], [3, 6]],
            [[4, 6], [1, 3]], [[1.0, 3]], [["1", "3"]], [[1, 2, 3]], [1, 3], "0-3", [[None, 3]], [[0, 2**64]],
            [[True, 3]], [],
        ])
    elif choice == 7:
        payload.update(register=True, spans=[[1, 3], [3, 5]])
    elif choice == 8:
        payload["blend"] = rng.choice(["fast", "hkvd:2", "edges:-1", {"policy": "none", "bogus": 1}, {"ratio": 0.1},
                                       5, "sink:", "hkvd:0.1@999"])
    elif choice == 9:
        body["kv_hints"]["actions"][0]["action_version"] = rng.choice(["2", 1, None])
    elif choice == 10:
        payload["namespace"] = rng.choice(["", "bad ns!", 5, None, "a" * 200])
    else:
        payload.update(forget=rng.choice(["*", [], [5]]), spans=rng.choice([[], [[1, 3]]]))


def _path_case(rng: random.Random, t: Target, route: str, category: str) -> Case | None:
    unknown_ns = f"unknown-fuzz-{rng.randrange(10**6)}"
    bad_ns = rng.choice(["bad ns!", "-x", "a" * 200, "%ff%fe", "%ED%A0%80", "..", "%00"])
    unknown_id = "".join(rng.choice("0123456789abcdef") for _ in range(64))
    bad_id = rng.choice(["zz", "a" * 63, "A" * 64, "g" * 64, "%ff", "1" * 65])
    headers = dict(t.headers)
    if route == "POST /v1/chat/completions (session header)":
        if category not in ("bad_value", "invalid_unicode"):
            return None
        body = {"model": "default", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        sid = unknown_id if category == "bad_value" else "\xff\xfe-session"
        return Case(route, category, "POST", "/v1/chat/completions", _dumps(body),
                    {**headers, "content-type": "application/json", "x-amem-session": sid.encode("latin-1")})
    method, template = route.split(" ")
    if template == "/amem/v1/namespaces" and category != "wrong_method" and category != "bad_key":
        return None
    if category == "bad_value":
        ns, cid = rng.choice([(unknown_ns, unknown_id), (t.namespace, unknown_id), (t.namespace, bad_id), (bad_ns, unknown_id)])
    elif category == "invalid_unicode":
        ns, cid = rng.choice([("%ED%A0%80", unknown_id), (t.namespace, "%C0%AF" * 32), ("%ff%ff", bad_id)])
    elif category == "wrong_method":
        method = "PATCH"
        ns, cid = t.namespace, t.chunk_ids[0]
    elif category == "bad_key" and t.api_key is not None:
        ns, cid = t.namespace, t.chunk_ids[0]
        if method == "DELETE":
            ns, cid = unknown_ns, unknown_id  # even a bad key never aims at real memory
        keys = ["Bearer nope", "Bearer ", f"Bearer {t.api_key}x"]
        if template != "/amem/v1/namespaces":  # there another tenant's key is valid: it lists that tenant's own
            keys.append(f"Bearer {t.other_key}")
        headers["authorization"] = rng.choice(keys)
    else:
        return None
    if "{id}" not in template and ns == t.namespace and category != "bad_key":
        ns = unknown_ns  # the namespace itself is valid: aim at an unknown one (and never forget it)
    if "{ns}" not in template and cid == t.chunk_ids[0] and method == "DELETE":
        cid = unknown_id
    path = template.replace("{ns}", ns if "%" in ns else quote(ns, safe="")).replace("{id}", cid)
    return Case(route, category, method, path, None, headers)


def generate(n: int, seed: int, target: Target) -> list[Case]:
    """``n`` cases, deterministic from ``seed``, spread over every route and category."""
    rng = random.Random(seed)
    routes = list(_bases(target)) + PATH_ROUTES
    cases: list[Case] = []
    while len(cases) < n:
        route = routes[len(cases) % len(routes)]
        category = rng.choices(list(CATEGORIES), weights=list(CATEGORIES.values()))[0]
        if route == "POST /generate" and rng.random() < 0.35:
            category = "bad_spans"  # the chunk-span validation is /generate's own
        if route in PATH_ROUTES:
            case = _path_case(rng, target, route, category)
        elif category == "wrong_method":
            method = "PATCH"  # SGLang serves /generate on PUT as well as POST
            case = Case(route, category, method, route.split(" ")[1], _dumps(_bases(target)[route]),
                        {"content-type": "application/json", **target.headers})
        else:
            built = _json_case(rng, target, route, category)
            case = built and Case(route, category, "POST", route.split(" ")[1], built[0], built[1])
        if case is not None:
            cases.append(case)
    return cases


def send(url: str, case: Case, session: requests.Session) -> dict:
    t0 = time.monotonic()
    try:
        reply = session.request(case.method, url + case.path, data=case.body, headers=case.headers, timeout=600)
        status, message = reply.status_code, error_message(reply) if reply.status_code != 200 else ""
    except requests.RequestException as err:
        status, message = 0, f"{type(err).__name__}: {err}"
    ok = 400 <= status < 500 and isinstance(message, str) and len(message.strip()) >= 3
    return {"route": case.route, "category": case.category, "status": status, "ok": ok, "known_bug": known_bug(case),
            "message": (message or "")[:200], "s": time.monotonic() - t0,
            "request": f"{case.method} {case.path[:120]} {(case.body or b'')[:160]!r}"}


def run(url: str, cases: list[Case], workers: int = 4) -> dict:
    """Send every case; outcomes per route and status, and the failures (not a 4xx with a message)."""
    sessions = [requests.Session() for _ in range(workers)]
    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(workers) as pool:
        rows = list(pool.map(lambda ic: send(url, ic[1], sessions[ic[0] % workers]), enumerate(cases)))
    per_route = collections.defaultdict(collections.Counter)
    per_category = collections.defaultdict(collections.Counter)
    for r in rows:
        per_route[r["route"]][str(r["status"])] += 1
        per_category[r["category"]][str(r["status"])] += 1
    failures = [r for r in rows if not r["ok"]]
    known = collections.Counter(r["known_bug"] for r in failures if r["known_bug"])
    return {"cases": len(rows), "four_xx_with_message": sum(r["ok"] for r in rows),
            "unexplained_failures": sum(not r["known_bug"] for r in failures), "known_bugs": dict(known),
            "five_xx": sum(r["status"] >= 500 for r in rows), "no_answer": sum(r["status"] == 0 for r in rows),
            "two_xx": sum(200 <= r["status"] < 300 for r in rows), "wall_s": round(time.monotonic() - t0, 1),
            "per_route": {k: dict(v) for k, v in sorted(per_route.items())},
            "per_category": {k: dict(v) for k, v in sorted(per_category.items())},
            "failures": [r for r in failures if not r["known_bug"]][:40] + [r for r in failures if r["known_bug"]][:10]}


# Bugs the fuzz found that are not fixed yet: name -> which cases they explain (a predicate on the
# case). The suite marks a test per bug xfail(strict=True), so each flips once fixed. Fixed so far: a chat body
# that is JSON but not an object (500 in SGLang's before-validator) and n < 0 (served as one choice):
# amem's OpenAI memory middleware answers both with a 400 now.
KNOWN_BUGS: dict = {}


def known_bug(case: Case) -> str | None:
    return next((name for name, matches in KNOWN_BUGS.items() if matches(case)), None)
