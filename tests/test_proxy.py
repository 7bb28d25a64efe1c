"""``amem proxy`` against real servers: a plain SGLang 0.5.23 upstream (its radix cache reports the
cached tokens; it serves Anthropic's /v1/messages with cache_read_input_tokens), the proxy as its own
process, and the openai / anthropic SDKs pointed at it. A recording relay between proxy and upstream
(tests/proxy_upstream.py) shows the exact bytes the upstream received."""

from __future__ import annotations

import json
import sys

import anthropic
import openai
import pytest
import requests

from amem_sgl.local_server import free_port, start_server
from amem_sgl.proxy.layout import count_breakpoints
from amem_sgl.sdk import Amem
from benchmarks.proxy_cost import make_memory, session_questions, system_prompt
from tests.proxy_upstream import RecordingRelay, plain_upstream

pytestmark = pytest.mark.slow
NS = "proxy-user"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    upstream = plain_upstream()
    relay = RecordingRelay(("127.0.0.1", int(upstream.url.rsplit(":", 1)[1])))
    work = tmp_path_factory.mktemp("proxy")
    port = free_port()
    proxy = start_server(f"{sys.executable} -m amem_sgl.proxy --upstream {relay.url} --port {port} "
                         f"--store {work}/memory --state-dir {work}/state -k 6 --block-k 12 --exit-with-parent",
                         port=port, log_path=work / "proxy.log", timeout_s=180)
    try:  # stopped however the module ends (set-up failures included); --exit-with-parent: even if pytest is killed
        facts, asks = make_memory(30, 4, unique=True)  # 120 chunks, one fact each, no name or value shared
        done = Amem(proxy.url).remember(NS, facts)  # the SDK against the proxy's memory API
        assert len(done.ids) == 120 and done.new == 120
        yield {"proxy": proxy, "relay": relay, "asks": asks, "upstream": upstream}
    finally:
        proxy.stop()


def _session(asks):
    return session_questions(asks, 10, per_person=4, seed=3)


def _check_cache_and_answers(turns: list[dict]) -> None:
    stable = [t for t in turns[1:] if not t["rebuilt"]]
    assert len(stable) >= 4, turns
    for t in stable:  # the upstream's own count: most of the prompt came from its cache
        assert t["cached"] >= 0.8 * t["prompt"], t
    assert all(t["chunks"] >= 6 for t in turns)
    correct = sum(t["gold"].lower() in t["answer"].lower() for t in turns)
    assert correct >= 5, [(t["gold"], t["answer"]) for t in turns]


def test_openai_sdk_ten_turns_over_120_chunks_mostly_cached(stack):
    client = openai.OpenAI(base_url=stack["proxy"].url + "/v1", api_key="sk-test")
    messages = [{"role": "system", "content": system_prompt(12)}]
    turns = []
    for question, gold in _session(stack["asks"]):
        messages.append({"role": "user", "content": question})
        reply = client.chat.completions.create(model="default", messages=messages, user=NS, max_tokens=16,
                                               temperature=0)
        answer = reply.choices[0].message.content
        messages.append({"role": "assistant", "content": answer})
        usage = reply.usage.model_dump()
        amem = usage["amem"]
        assert amem["prompt_tokens"] == usage["prompt_tokens"] and amem["tokens_injected"] > 0
        assert amem["cost"]["proxy_usd"] <= amem["cost"]["no_cache_usd"] <= amem["cost"]["full_memory_usd"]
        turns.append({"prompt": usage["prompt_tokens"], "cached": usage["prompt_tokens_details"]["cached_tokens"],
                      "rebuilt": amem["block_rebuilt"], "chunks": amem["chunks_used"], "gold": gold, "answer": answer})
    _check_cache_and_answers(turns)
    (line, _, body), = [r for r in stack["relay"].requests() if r[0].startswith("POST /v1/chat")][-1:]
    assert json.loads(body)["prompt_cache_key"]  # a hash of the namespace, for OpenAI's cache routing


def test_anthropic_sdk_ten_turns_mostly_cached_with_at_most_four_breakpoints(stack):
    stack["relay"].clear()
    client = anthropic.Anthropic(base_url=stack["proxy"].url, api_key="sk-ant-test")
    messages, turns = [], []
    for question, gold in _session(stack["asks"]):
        messages.append({"role": "user", "content": question})
        reply = client.messages.create(model="default", system=system_prompt(12), messages=messages,
                                       max_tokens=16, metadata={"user_id": NS},
                                       extra_body={"temperature": 0})  # anthropic 2.15 has no temperature argument
        answer = "".join(b.text for b in reply.content if b.type == "text")
        messages.append({"role": "assistant", "content": answer})
        usage = reply.usage.model_dump()
        amem = usage["amem"]
        read = usage["cache_read_input_tokens"] or 0
        turns.append({"prompt": usage["input_tokens"] + read, "cached": read, "rebuilt": amem["block_rebuilt"],
                      "chunks": amem["chunks_used"], "gold": gold, "answer": answer})
    _check_cache_and_answers(turns)
    sent = [json.loads(body) for line, _, body in stack["relay"].requests() if line.startswith("POST /v1/messages")]
    assert len(sent) == 10
    assert all(1 <= count_breakpoints(b) <= 4 for b in sent)
    assert all(b["system"][-1]["cache_control"] == {"type": "ephemeral"} for b in sent)  # end of the memory block


def test_a_request_with_four_breakpoints_gets_none_added(stack):
    stack["relay"].clear()
    mark = {"type": "ephemeral"}
    body = {"model": "default", "max_tokens": 4, "metadata": {"user_id": NS},
            "system": [{"type": "text", "text": "You are terse.", "cache_control": mark},
                       {"type": "text", "text": "Answer in a word.", "cache_control": mark}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello.", "cache_control": mark}]},
                         {"role": "assistant", "content": [{"type": "text", "text": "Hi.", "cache_control": mark}]},
                         {"role": "user", "content": "What is the employer of someone?"}]}
    reply = requests.post(stack["proxy"].url + "/v1/messages", json=body, timeout=600)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["amem"]["breakpoints"] == {"client": 4, "added": 0}
    (_, _, sent), = [r for r in stack["relay"].requests() if r[0].startswith("POST /v1/messages")]
    assert count_breakpoints(json.loads(sent)) == 4


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", b'{"model":"default",  "messages":[{"role":"user","content":"Say hi \\u00e9"}],'
                             b'\n "max_tokens":3, "temperature":0, "stream": %s}'),
    ("/v1/messages", b'{"max_tokens":3,"model":"default","messages":[{"content":"Say hi","role":"user"}], '
                     b'"stream" : %s}'),
])
@pytest.mark.parametrize("stream", [b"false", b"true"])
def test_a_request_without_a_namespace_reaches_the_upstream_byte_identical(stack, path, body, stream):
    stack["relay"].clear()
    raw = body % stream  # odd spacing, key order and escapes: any re-serialisation would show
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-client", "X-Client-Trace": "abc 123",
               "anthropic-version": "2023-06-01", "User-Agent": "test-client/1.0"}
    reply = requests.post(stack["proxy"].url + path, data=raw, headers=headers, timeout=600, stream=True)
    content = reply.content
    assert reply.status_code == 200, content
    if stream == b"true":
        assert content.rstrip().endswith(b"[DONE]" if "chat" in path else b'{"type":"message_stop"}')
    (line, got, sent), = [r for r in stack["relay"].requests() if r[0].startswith("POST")]
    assert line == f"POST {path} HTTP/1.1" and sent == raw
    # Every header the client sent arrives unchanged; the only ones that differ are Host (it names
    # the upstream) and Connection (hop-by-hop, per RFC 9110).
    mine = {k.lower(): v for k, v in reply.request.headers.items()}
    assert {k: v for k, v in got.items() if k != "host"} == {k: v for k, v in mine.items() if k != "connection"}
    assert "amem" not in content.decode()


def test_streaming_with_memory_works_for_both_apis(stack):
    proxy = stack["proxy"].url
    question, gold = stack["asks"][sorted(stack["asks"])[0]][0]
    chunks = list(openai.OpenAI(base_url=proxy + "/v1", api_key="x").chat.completions.create(
        model="default", messages=[{"role": "user", "content": question}], user=NS, max_tokens=12, stream=True,
        stream_options={"include_usage": True}, temperature=0))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() and chunks[-1].usage.model_dump()["amem"]["chunks_used"] >= 6
    with anthropic.Anthropic(base_url=proxy, api_key="x").messages.stream(
            model="default", max_tokens=12, messages=[{"role": "user", "content": question}],
            metadata={"user_id": NS}) as stream:
        events = list(stream)
        final = stream.get_final_message()
    (delta,) = [e for e in events if e.type == "message_delta"]
    assert delta.usage.model_dump()["amem"]["chunks_used"] >= 6
    assert "".join(b.text for b in final.content if b.type == "text").strip()


def test_bad_input_and_upstream_errors_keep_each_apis_error_shape(stack):
    proxy = stack["proxy"].url
    bad = requests.post(proxy + "/v1/chat/completions", data=b"{not json", headers={"X-Amem-Namespace": NS})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    bad = requests.post(proxy + "/v1/messages", json={"model": "m", "max_tokens": 3}, headers={"X-Amem-Namespace": NS})
    assert bad.status_code == 400 and bad.json()["type"] == "error" and "messages" in bad.json()["error"]["message"]
    bad = requests.post(proxy + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                              "user": "no spaces allowed"})
    assert bad.status_code == 400 and "namespace" in bad.json()["error"]["message"]
    # The upstream's own refusal (Anthropic requires max_tokens), passed on as it came.
    direct = requests.post(stack["upstream"].url + "/v1/messages", json={"model": "default", "messages": [
        {"role": "user", "content": "hi"}]})
    via = requests.post(proxy + "/v1/messages", json={"model": "default", "metadata": {"user_id": NS},
                                                      "messages": [{"role": "user", "content": "hi"}]})
    assert via.status_code == direct.status_code == 400 and via.json() == direct.json()


def test_memory_api_via_the_sdk_and_a_forgotten_chunk_is_never_sent_again(stack):
    amem = Amem(stack["proxy"].url)
    remembered = amem.remember("proxy-forget", ["The locker code of Zed Quill is 7741.", "Zed Quill likes tea."])
    hits = amem.search("proxy-forget", "locker code of Zed Quill", k=1)
    assert hits[0].id == remembered.ids[0] and "7741" in hits[0].text
    body = {"model": "default", "max_tokens": 4, "user": "proxy-forget",
            "messages": [{"role": "user", "content": "What is the locker code of Zed Quill?"}]}
    first = requests.post(stack["proxy"].url + "/v1/chat/completions", json=body, timeout=600).json()
    assert remembered.ids[0] in first["usage"]["amem"]["chunk_ids"]
    assert amem.forget("proxy-forget", remembered.ids[0]) == [remembered.ids[0]]
    stack["relay"].clear()
    again = requests.post(stack["proxy"].url + "/v1/chat/completions", json=body, timeout=600).json()
    assert remembered.ids[0] not in again["usage"]["amem"]["chunk_ids"]
    (_, _, sent), = [r for r in stack["relay"].requests() if r[0].startswith("POST")]
    assert b"7741" not in sent
    assert amem.forget("proxy-forget") and amem.namespaces() == [NS]


def test_memory_from_an_amem_server_with_memory_url(stack, amem_server, tmp_path):
    port = free_port()
    proxy = start_server(f"{sys.executable} -m amem_sgl.proxy --upstream {stack['upstream'].url} --port {port} "
                         f"--memory {amem_server.url} --state-dir {tmp_path}/state --exit-with-parent", port=port,
                         log_path=tmp_path / "proxy.log", timeout_s=180)
    try:
        amem = Amem(proxy.url)  # remember and search are the amem server's own, through the proxy
        done = amem.remember("proxy-remote", ["The boat of Ines Varga is called Albatross.", "Ines Varga rows."])
        assert [c.id for c in Amem(amem_server.url).search("proxy-remote", "boat of Ines Varga", k=1)] == done.ids[:1]
        reply = requests.post(proxy.url + "/v1/chat/completions", timeout=600, json={
            "model": "default", "max_tokens": 4, "user": "proxy-remote",
            "messages": [{"role": "user", "content": "What is the boat of Ines Varga called?"}]})
        assert reply.status_code == 200, reply.text
        assert done.ids[0] in reply.json()["usage"]["amem"]["chunk_ids"]
        assert amem.forget("proxy-remote")
    finally:
        proxy.stop()
