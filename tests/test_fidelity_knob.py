"""The fidelity knob (exact | guarded | fast) and the guard, on the real server.

* kv_hints ``exact``: the same input_ids with chunk spans answer exactly like a plain full prefill
  (nothing spliced or blended), and never meet the namespace's blended prefixes;
* a guarded turn whose first token is uncertain (here forced: a margin threshold of 1.0) is escalated
  before anything is sampled, served exactly, reported in ``usage.amem.memory`` and counted at /metrics;
* bad knob values get a 400 in the OpenAI error shape."""

from __future__ import annotations

import pytest
import requests

from amem_sgl.chunks.client import ChunkClient
from amem_sgl.chunks.hints import build_kv_hints
from amem_sgl.memory.fidelity import exact_hints, parse_fidelity, parse_margin
from amem_sgl.memory.guard import first_token_margin

FACTS = ["Priya's cousin Tomas runs a bakery in Valencia.\n", "Priya's cat is called Biscuit.\n",
         "Priya rides a blue bicycle to work.\n"]


def test_margin_and_knob_parsing():
    assert first_token_margin({"output_top_logprobs": [[[-0.1, 5, "a"], [-2.5, 7, "b"]]]}) == pytest.approx(
        0.9048 - 0.0821, abs=1e-3)
    assert first_token_margin({}) is None
    assert parse_fidelity("guarded") == "guarded" and parse_margin("0.25") == 0.25
    for bad in ("exactly", "", None):
        with pytest.raises(ValueError):
            parse_fidelity(bad)
    for bad in ("-0.1", "1.5", "x", None):
        with pytest.raises(ValueError):
            parse_margin(bad)
    assert exact_hints("priya", None)["actions"][0]["payload"] == {"namespace": "priya", "register": False,
                                                                   "spans": [], "exact": True}
    hints = exact_hints("priya", build_kv_hints("priya", [(3, 9), (9, 12)], capture=True))
    payload = hints["actions"][0]["payload"]
    assert payload["exact"] is True and payload["spans"] == [[3, 9], [9, 12]] and "blend" not in payload


def generate(url, body):
    reply = requests.post(f"{url}/generate", json=body, timeout=300)
    assert reply.status_code == 200, reply.text[:300]
    return reply.json()


@pytest.mark.slow
def test_exact_hints_answer_like_a_plain_full_prefill_and_splice_nothing(amem_server):
    url = amem_server.url
    client = ChunkClient(url)
    chunks = [client.register(text, namespace="fidelity-exact") for text in FACTS]
    prompt = client.layout.compose([c.token_ids for c in reversed(chunks)],
                                   "Which city is Priya's cousin Tomas's bakery in?")
    params = {"max_new_tokens": 12, "temperature": 0}
    plain = generate(url, {"input_ids": prompt.input_ids, "sampling_params": params})
    spans = prompt.spans
    exact = generate(url, {"input_ids": prompt.input_ids, "sampling_params": params,
                           "kv_hints": build_kv_hints("fidelity-exact", spans, exact=True)})
    assert exact["text"] == plain["text"], (exact["text"], plain["text"])
    usage = exact["meta_info"].get("amem") or [{}]
    assert not usage[0].get("spliced_tokens"), usage
    # The spliced form of the same prompt goes to the blended subtree; an exact request after it
    # still gets exact KV (its cached part is what exact requests computed, never the blend).
    generate(url, {"input_ids": prompt.input_ids, "sampling_params": params,
                   "kv_hints": build_kv_hints("fidelity-exact", spans)})
    again = generate(url, {"input_ids": prompt.input_ids, "sampling_params": params,
                           "kv_hints": build_kv_hints("fidelity-exact", spans, exact=True)})
    assert again["text"] == plain["text"]
    assert again["meta_info"]["cached_tokens"] >= len(prompt.input_ids) - 1  # its own exact prefix


def chat(url, headers=None, **extra):
    body = {"model": "default", "user": "fidelity-guard", "max_tokens": 12, "temperature": 0,
            "messages": [{"role": "user", "content": "Which city is Priya's cousin Tomas's bakery in?"}], **extra}
    return requests.post(f"{url}/v1/chat/completions", json=body, headers=headers or {}, timeout=300)


def escalations(url) -> float:
    text = requests.get(f"{url}/metrics", timeout=30).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("amem:guard_escalations_total"))


@pytest.mark.slow
def test_an_uncertain_first_token_is_escalated_and_served_exactly(amem_server):
    url = amem_server.url
    reply = requests.post(f"{url}/amem/v1/remember", json={"namespace": "fidelity-guard", "texts": FACTS}, timeout=300)
    assert reply.status_code == 200, reply.text
    fast = chat(url, {"X-Amem-Fidelity": "fast"})  # spliced + blended: its sequence is now in the tree
    assert fast.status_code == 200 and fast.json()["usage"]["amem"]["memory"]["escalated"] is False, fast.text
    before = escalations(url)
    forced = chat(url, {"X-Amem-Fidelity": "guarded", "X-Amem-Guard-Margin": "1.0"})
    assert forced.status_code == 200, forced.text
    usage = forced.json()["usage"]
    memory = usage["amem"]["memory"]
    assert memory["fidelity"] == "guarded" and memory["escalated"] is True, memory
    assert memory["guard"]["margin"] is not None and memory["guard"]["margin"] < 1.0
    assert escalations(url) == before + 1
    # Served exactly: it met neither the blended sequence of the fast turn nor the probe's (both under
    # the namespace's blend salt), so almost nothing of its prompt was cached and nothing spliced ...
    assert usage["amem"].get("spliced_tokens", 0) == 0
    assert usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"] // 2, usage
    # ... and an exact turn now reuses exactly that KV (the same prompt, the same answer).
    exact = chat(url, {"X-Amem-Fidelity": "exact"})
    assert exact.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= usage["prompt_tokens"] - 1
    assert forced.json()["choices"][0]["message"]["content"] == exact.json()["choices"][0]["message"]["content"]
    relaxed = chat(url, {"X-Amem-Fidelity": "guarded", "X-Amem-Guard-Margin": "0"})  # never uncertain enough
    assert relaxed.json()["usage"]["amem"]["memory"]["escalated"] is False
    by_body = chat(url, amem_fidelity="exact")  # the OpenAI SDK's extra_body
    assert by_body.json()["usage"]["amem"]["memory"]["fidelity"] == "exact"
    for headers, extra in (({"X-Amem-Fidelity": "perfect"}, {}), ({"X-Amem-Guard-Margin": "2"}, {}),
                           ({}, {"amem_fidelity": 3})):
        bad = chat(url, headers, **extra)
        assert bad.status_code == 400 and "amem" in bad.json()["message"], bad.text
