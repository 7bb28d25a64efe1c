"""The proxy's reliability (benchmarks/reliability/proxy_fuzz.py): generated bad requests on every
route of both proxy modes (``--memory``: remote, ``--store``: local), auth on, each a 4xx with a
message in the route's own error shape, never a 5xx, and afterwards the same answers from the same
memory; tenancy (401 / 403) on every route that touches a namespace; no proxy process outlives the
process that started it. The session's amem server is the upstream (and the remote proxy's memory).
CI sends 300 cases; the report (``python -m benchmarks.reliability.proxy_fuzz``) 2,000."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from starlette.routing import Route

from amem_sgl.proxy import guard
from amem_sgl.proxy.server import ProxyConfig, create_app
from benchmarks.reliability import fuzz, proxy_fuzz

CASES = 300
NO_INPUT = {"/health", "/openapi.json"}  # GET routes that read nothing from the request


def _routes(mode: str, tmp_path) -> list[Route]:
    app = create_app(ProxyConfig(upstream="http://127.0.0.1:9", state_dir=str(tmp_path / mode / "state"),
                                 memory_url="http://127.0.0.1:9" if mode == "remote" else None,
                                 store_dir=str(tmp_path / mode / "store")))
    return [r for r in app.routes if isinstance(r, Route) and r.path not in NO_INPUT]


def test_cases_cover_every_route_the_proxy_serves_in_both_modes(tmp_path):
    target = fuzz.Target("pfz-t", ["a" * 64, "b" * 64], [10, 11, 12], 49152, "key-t", "key-o")
    cases = proxy_fuzz.generate(CASES, 11, {"remote": target, "local": target})
    assert [(c.path, c.body, c.headers) for c in cases] == [
        (c.path, c.body, c.headers) for c in proxy_fuzz.generate(CASES, 11, {"remote": target, "local": target})]
    assert {c.route for c in cases} == {f"{m} {r}" for m in proxy_fuzz.MODES for r in proxy_fuzz.ROUTES[m]}
    assert set(fuzz.CATEGORIES) <= {c.category for c in cases}
    for mode in proxy_fuzz.MODES:  # every route of the app itself (listed from the proxy's code) gets cases
        paths = [c.path.split("?")[0] for c in cases if c.route.startswith(mode + " ")]
        for route in _routes(mode, tmp_path):
            assert any(route.path_regex.match(p) for p in paths), (mode, route.path)
    # The remote proxy's one forwarding route: every scope it tells apart gets cases.
    scopes = collections.Counter()
    for c in cases:
        if c.route.startswith("remote ") and c.path.startswith("/amem/v1/"):
            try:
                body = json.loads(c.body) if c.body else None
                scopes[guard.remote_scope(c.method, c.path[len("/amem/v1/"):].split("?")[0], body)[0]] += 1
            except (ValueError, guard.ProxyError):
                scopes["refused"] += 1
    assert {"namespace", "list", "session", "other", "refused"} <= set(scopes), scopes


@pytest.fixture(scope="module")
def proxies(amem_server, tmp_path_factory):
    from benchmarks.reliability.proxy_harness import ProxyHarness

    harness = ProxyHarness(tmp_path_factory.mktemp("proxy-fuzz"), amem_server.url)
    try:
        yield harness
    finally:
        left = harness.stop()
    assert not any(left.values()), left  # stopping the proxies leaves none of their processes


@pytest.mark.slow
def test_bad_requests_on_every_proxy_route_get_a_4xx_in_its_shape_and_memory_is_intact(proxies):
    report = proxy_fuzz.fuzz_step(proxies, CASES, seed=11)
    assert report["cases"] == CASES
    assert report["unexplained_failures"] == 0, report["failures"]
    assert report["five_xx"] == report["two_xx"] == report["no_answer"] == report["wrong_shape"] == 0
    assert set(report["per_api"]) == {"openai", "anthropic", "memory", "upstream"}
    for mode, after in report["after"].items():
        assert after["memory_unchanged"] and after["health"] == 200, (mode, after)
        assert after["same_openai_answer"] and after["same_anthropic_answer"], (mode, report["answers"][mode])
        assert after["openai_recalls_secret"] and after["anthropic_recalls_secret"], (mode, report["answers"][mode])


@pytest.mark.slow
def test_every_route_that_touches_a_namespace_needs_a_key_that_covers_it(proxies):
    report = proxies.tenancy()
    wrong = [r for r in report["rows"] if not all(v for k, v in r.items() if k.endswith("_ok"))]
    assert report["passed"] == report["checks"], wrong
    routes = collections.Counter(r["mode"] for r in report["rows"])
    assert routes["remote"] == 13 and routes["local"] == 11, routes
    # The target's memory is as it was: the refused deletes deleted nothing.
    for mode in proxy_fuzz.MODES:
        assert set(proxies.ids[mode]) == set(proxies.snapshot(mode)[proxies.namespace]), mode


@pytest.mark.slow
def test_no_proxy_process_outlives_the_process_that_started_it(amem_server, tmp_path):
    """The harness's proxies run with --exit-with-parent: kill -9 of their parent (a test run killed
    outright, which runs no clean-up) still ends them."""
    script = ("import pathlib, sys, time\n"
              "from amem_sgl.server.auth import add_key\n"
              "from benchmarks.reliability.proxy_harness import start_proxy\n"
              "work = pathlib.Path(sys.argv[1]); add_key(work / 'keys.json', ['x'])\n"
              "p = start_proxy(work / 'p', sys.argv[2], 'local', work / 'keys.json')\n"
              "print(p.proc.pid, flush=True); time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), amem_server.url], stdout=subprocess.PIPE,
                              cwd=proxy_fuzz.Path(__file__).resolve().parents[2], text=True)
    try:
        pid = int(parent.stdout.readline())
        os.kill(pid, 0)  # the proxy runs
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=60)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.5)
    assert not _alive(pid), f"proxy {pid} outlived its parent"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # a zombie has ended (its parent, gone, cannot reap it)
    except (FileNotFoundError, IndexError):
        return False
