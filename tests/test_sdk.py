"""The SDK as the original product's users call it: session objects or ids, str(answer), and
client-side mistakes reported as TypeError/ValueError, not as network failures."""

from __future__ import annotations

import socket

import pytest
import requests

from amem_sgl.sdk import Amem, AmemError, Session


def closed_port_url() -> str:
    with socket.socket() as s:  # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("call, error", [
    (lambda a: a.ask("alice", 5), TypeError),
    (lambda a: a.ask(3, "q"), TypeError),
    (lambda a: a.ask("alice", "q", session=3), TypeError),
    (lambda a: a.ask("alice", "q", session=Session(a, "s1", "bob", [])), ValueError),
    (lambda a: a.ask("alice", "q", history="hi"), TypeError),
    (lambda a: a.ask("alice", "q", history=[{"role": "user"}]), ValueError),
    (lambda a: a.ask("alice", "q", max_tokens=0), ValueError),
    (lambda a: a.ask("alice", "q", temperature="hot"), TypeError),
    (lambda a: a.search("alice", "q", k=True), TypeError),
    (lambda a: a.remember("alice", ["ok", 7]), TypeError),
    (lambda a: a.remember("alice", "ok", prefill="later"), ValueError),
    (lambda a: a.start_session("alice", chunk_ids="abc"), TypeError),
    (lambda a: a.forget(None), TypeError),
    (lambda a: a.ask("alice", "q", fidelity=1), TypeError),
    (lambda a: a.ask("alice", "q", fidelity="perfect"), ValueError),
    (lambda a: a.start_session("alice", fidelity="perfect"), ValueError),
])
def test_client_side_mistakes_raise_before_anything_is_sent(call, error):
    amem = Amem(closed_port_url())  # were anything sent, this would be an AmemError instead
    with pytest.raises(error):
        call(amem)


def test_cannot_reach_is_said_only_for_a_connection_failure():
    amem = Amem(closed_port_url())
    with pytest.raises(AmemError) as caught:
        amem.ask("alice", "Where does my sister live?")
    assert caught.value.status == 0 and str(caught.value).startswith("cannot reach")
    with pytest.raises(ValueError):
        Amem("127.0.0.1:30000")  # no scheme


@pytest.mark.slow
def test_start_session_then_ask_with_the_session_object_or_its_id(amem_server):
    amem = Amem(amem_server.url)
    amem.remember("sdk-shape", ["Nadia's brother Omar lives in Lisbon.", "Nadia keeps a parrot named Kiwi."])
    session = amem.start_session("sdk-shape")
    by_object = amem.ask("sdk-shape", "Which city does Nadia's brother Omar live in?", session=session,
                         max_tokens=12)
    by_id = amem.ask("sdk-shape", "Which city does Nadia's brother Omar live in?", session=session.session_id,
                     max_tokens=12)
    assert str(by_object) == by_object.text and f"{by_id}" == by_id.text
    assert by_object.text == by_id.text  # the same session, the same greedy answer
    assert by_object.namespace == "sdk-shape" and by_object.chunk_ids == session.chunk_ids
    with pytest.raises(AmemError) as caught:
        amem.ask("sdk-shape", "q", session="no-such-session")
    assert caught.value.status == 404 and "unknown or expired session" in caught.value.message
    session.end()
    # The fidelity knob per turn (the server's X-Amem-Fidelity): what the server says it served.
    for level in ("exact", "fast"):
        answer = amem.ask("sdk-shape", "Which pet does Nadia keep?", max_tokens=8, fidelity=level)
        assert answer.usage["memory"]["fidelity"] == level, answer.usage
    # A session's level (default: the server's) applies to its turns; a turn's own level wins.
    fast = amem.start_session("sdk-shape", fidelity="fast")
    # its set spliced, or already in the tree as the fast turn above left it
    assert fast.warm["amem"].get("spliced_tokens", 0) > 0 or fast.warm["cached_tokens"] > 0, fast.warm
    assert fast.ask("Which pet does Nadia keep?", max_tokens=8).usage["memory"]["fidelity"] == "fast"
    assert fast.ask("Which pet does Nadia keep?", max_tokens=8, fidelity="exact").usage["memory"]["fidelity"] == "exact"
    fast.end()
    assert amem.start_session("sdk-shape").ask("Which pet?", max_tokens=4).usage["memory"]["fidelity"] == "exact"
    bad = requests.post(f"{amem_server.url}/amem/v1/sessions", json={"namespace": "sdk-shape", "fidelity": "perfect"},
                        timeout=60)
    assert bad.status_code == 400 and "fidelity" in bad.text, bad.text
