"""The real server (README command, SGLang CPU engine, SmolLM2 weights) over real HTTP."""

from __future__ import annotations

import json

import openai
import pytest
import requests

from tests.server import STARTUP_BOUND_S

pytestmark = pytest.mark.slow

SISTER = ("Alice lives in Seattle and works at Boeing. Alice's sister Maria lives in Denver. "
          "Where does Alice's sister live?")


@pytest.fixture(scope="module")
def client(amem_server):
    return openai.OpenAI(base_url=f"{amem_server.url}/v1", api_key="unused", timeout=300)


def test_server_started_from_the_readme_command_within_the_bound(amem_server):
    assert amem_server.startup_s < STARTUP_BOUND_S
    log = amem_server.log()
    assert "Tree cache initialized: source=registered('amem') impl=ChunkRadixCache" in log
    assert "'radix_cache_backend': 'amem'" in log and "'device': 'cpu'" in log


def test_openai_sdk_chat_completion_answers_from_the_prompt(client):
    reply = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": SISTER}], temperature=0, max_tokens=30)
    assert "Denver" in reply.choices[0].message.content
    assert reply.usage.prompt_tokens > 20


def test_repeated_long_prompt_is_served_by_chunk_radix_cache(client, amem_server):
    document = " ".join(f"Record {i}: parcel {i} is kept on shelf {i * 7 % 13}." for i in range(120))
    messages = [{"role": "user", "content": document + " Which shelf holds parcel 5?"}]
    before = amem_server.amem_state()
    assert before["tree_cache"] == "ChunkRadixCache"

    first = client.chat.completions.create(model="default", messages=messages, temperature=0, max_tokens=8)
    second = client.chat.completions.create(model="default", messages=messages, temperature=0, max_tokens=8)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens > 1000
    assert cached >= second.usage.prompt_tokens - 1  # everything but the last prompt token
    assert first.usage.prompt_tokens_details.cached_tokens < cached
    assert second.choices[0].message.content == first.choices[0].message.content

    after = amem_server.amem_state()
    hit = after["stats"]["match_hit_tokens"] - before["stats"]["match_hit_tokens"]
    assert hit >= cached  # the hit was counted by our tree, not some other cache
    assert after["stats"]["inserted_tokens"] > before["stats"]["inserted_tokens"]


def test_streaming_chat_completion(client):
    stream = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": SISTER}], temperature=0, max_tokens=30,
        stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert "Denver" in text


def test_sglang_frontend_program_runs_unchanged(amem_server):
    import sglang as sgl

    @sgl.function
    def where(s, question):
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen("answer", max_tokens=30, temperature=0))

    state = where.run(question=SISTER, backend=sgl.RuntimeEndpoint(amem_server.url))
    assert "Denver" in state["answer"]


def _chat(url: str, body: bytes | str, path: str = "/v1/chat/completions") -> requests.Response:
    return requests.post(url + path, data=body, headers={"content-type": "application/json"}, timeout=120)


BAD_REQUESTS = {
    "malformed JSON": '{"model": "x", "messages": [',
    "missing messages": json.dumps({"model": "x"}),
    "max_tokens -1": json.dumps({"model": "x", "messages": [{"role": "user", "content": "hi"}],
                                 "max_tokens": -1}),
    "messages of the wrong type": json.dumps({"model": "x", "messages": "hello"}),
    "garbage unicode (lone surrogate)": '{"model": "x", "messages": [{"role": "user", "content": "\\udcff\\ud800"}]}',
    "invalid UTF-8 bytes": b'{"model": "x", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
    "prompt longer than the context": json.dumps({"model": "x", "max_tokens": 2,
                                                  "messages": [{"role": "user", "content": "word " * 20000}]}),
    "10 MB prompt": json.dumps({"model": "x", "messages": [{"role": "user", "content": "a " * 5_000_000}]}),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_4xx_with_a_message_and_the_server_keeps_serving(case, amem_server, client):
    reply = _chat(amem_server.url, BAD_REQUESTS[case])
    assert 400 <= reply.status_code < 500, (reply.status_code, reply.text[:300])
    message = reply.json()["message"]
    assert isinstance(message, str) and len(message) > 10
    assert requests.get(f"{amem_server.url}/health", timeout=30).status_code == 200
    ok = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Say hi."}], temperature=0, max_tokens=4)
    assert ok.choices[0].message.content


def test_oversized_body_is_refused_before_parsing(amem_server):
    reply = _chat(amem_server.url, json.dumps({"prompt": "x" * 5_000_000}), path="/v1/completions")
    assert reply.status_code == 413
    assert "amem.server.max_request_bytes" in reply.json()["message"]


def test_cpu_serving_path_never_called_the_sgl_kernel_standin(amem_server, client):
    # Runs after the traffic above (pytest keeps file order); any call would have been recorded.
    client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": SISTER}], temperature=0, max_tokens=8)
    calls = amem_server.kernel_call_log.read_text() if amem_server.kernel_call_log.exists() else ""
    assert calls == "", f"sgl_kernel stand-in was called on the CPU serving path:\n{calls}"
