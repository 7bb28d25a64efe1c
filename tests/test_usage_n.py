"""``usage.amem`` of an OpenAI chat memory turn with ``n > 1`` on the real server.

SGLang serves ``n > 1`` as parallel sampling: a prefix request (``max_new_tokens=0``: it splices or
prefills the prompt; its response never reaches the route) and ``n`` copies with rids of their
own. The turn's ``usage.amem`` still carries its ``memory`` block and timings once, and its token
counters are what the server did for the turn -- the /metrics deltas of that request.
"""

from __future__ import annotations

import json

import pytest
import requests

pytestmark = pytest.mark.slow

FACTS = ["Quentin's boat is named Albatross and is moored in Brest.",
         "Quentin grows lavender on his balcony in Lyon."]


def counters(url: str) -> dict:
    """amem's counters at /metrics: name (with labels) -> value."""
    out = {}
    for line in requests.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("amem:") and "_total" in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def total(values: dict, prefix: str) -> float:
    return sum(v for k, v in values.items() if k.startswith(prefix + "{"))


def chat(url: str, namespace: str, fidelity: str, stream: bool):
    body = {"model": "default", "user": namespace, "n": 2, "temperature": 0.8, "max_tokens": 6,
            "messages": [{"role": "user", "content": "What is the name of Quentin's boat?"}]}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    headers = {"X-Amem-Fidelity": fidelity}
    reply = requests.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=300)
    assert reply.status_code == 200, reply.text
    if not stream:
        data = reply.json()
        assert len(data["choices"]) == 2
        return reply.headers, data["usage"]
    events = [json.loads(line[len("data: "):]) for line in reply.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert {c["index"] for e in events for c in e.get("choices", [])} == {0, 1}
    usages = [e["usage"] for e in events if e.get("usage")]
    assert len(usages) == 1, usages
    return reply.headers, usages[0]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("fidelity", ["exact", "fast"])
def test_n2_memory_turn_reports_its_memory_timings_and_what_the_server_did(amem_server, fidelity, stream):
    url = amem_server.url
    namespace = f"usage-n-{fidelity}-{'stream' if stream else 'json'}"
    done = requests.post(f"{url}/amem/v1/remember", json={"namespace": namespace, "texts": FACTS}, timeout=300)
    assert done.status_code == 200, done.text
    before = counters(url)
    headers, usage = chat(url, namespace, fidelity, stream)
    after = counters(url)
    amem = usage["amem"]
    used = headers["x-amem-chunks"].split(",")
    assert used and amem["memory"]["chunks"] == used, amem
    assert amem["memory"]["fidelity"] == fidelity and amem["memory"]["namespace"] == namespace, amem
    assert amem["timings"] and "total_s" in amem["timings"], amem
    # The token counters are the server's for this turn: the /metrics deltas of the request.
    for key in ("spliced_tokens", "recomputed_tokens", "probed_tokens", "extended_tokens"):
        delta = total(after, f"amem:{key}_total") - total(before, f"amem:{key}_total")
        assert amem.get(key, 0) == delta, (key, amem, delta)
    if fidelity == "fast":
        assert amem["spliced_tokens"] > 0, amem
        # The one spliced request of the turn (the prefix request) is counted under its policy.
        grown = {k for k in after if k.startswith("amem:spliced_requests_total{") and after[k] > before.get(k, 0)}
        assert len(grown) == 1 and f'blend_policy="{amem["blend_policy"]}"' in grown.pop(), (amem, grown)
    else:
        assert amem["spliced_tokens"] == 0, amem
