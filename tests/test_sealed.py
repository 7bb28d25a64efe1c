"""Sealed key space on the real (session) server: a client cannot name amem's radix keys, and amem's
chunk ids are keyed by the server's own secret (a 0600 file beside its memory dir).

The issue's finding: a plain ``/generate`` with ``extra_key: "amem:ns:alice"`` landed in alice's
namespace-salted subtree, and its ``cached_tokens`` confirmed guesses of her memory."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
import requests

pytestmark = pytest.mark.slow

NS = "sealed-zoe"
TEXT = "Zoe keeps her spare key under the blue flowerpot."


def post(server, path, body):
    return requests.post(f"{server.url}{path}", json=body, timeout=300)


@pytest.fixture(scope="module")
def zoe(amem_server):
    reply = post(amem_server, "/amem/v1/remember", {"namespace": NS, "texts": [TEXT]})
    assert reply.status_code == 200, reply.text
    return reply.json()["ids"]


@pytest.mark.parametrize("fields", [{"extra_key": f"amem:ns:{NS}"}, {"cache_salt": "amem:chunk:" + "0" * 64},
                                    {"extra_key": f"tenant|amem:ns:{NS}"}, {"cache_salt": "amem:"}])
def test_native_generate_refuses_reserved_keys(amem_server, zoe, fields):
    body = {"input_ids": [1, 2, 3, 4], "sampling_params": {"max_new_tokens": 1}, **fields}
    reply = post(amem_server, "/generate", body)
    assert reply.status_code == 400, reply.text
    assert "reserved" in reply.json()["error"]["message"]


def test_batched_generate_refuses_a_reserved_key_in_any_item(amem_server, zoe):
    body = {"input_ids": [[1, 2, 3], [1, 2, 4]], "sampling_params": {"max_new_tokens": 1},
            "extra_key": ["tenant-1", f"amem:ns:{NS}"]}
    reply = post(amem_server, "/generate", body)
    assert reply.status_code == 400 and "reserved" in reply.text, reply.text


@pytest.mark.parametrize("route, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Where is the key?"}], "extra_key": f"amem:ns:{NS}"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Where is the key?"}], "cache_salt": f"amem:ns:{NS}"}),
    ("/v1/completions", {"prompt": "Zoe keeps her spare key", "extra_key": f"amem:ns:{NS}"}),
])
def test_openai_routes_refuse_reserved_keys(amem_server, zoe, route, body):
    reply = post(amem_server, route, {"model": "default", "max_tokens": 2, **body})
    assert reply.status_code == 400, reply.text
    data = reply.json()
    assert data["object"] == "error" and "reserved" in data["message"]


def test_ordinary_extra_keys_still_work(amem_server):
    for fields in ({"extra_key": "tenant-1"}, {"cache_salt": "team:blue"}):
        reply = post(amem_server, "/generate", {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 1},
                                                **fields})
        assert reply.status_code == 200, reply.text
    chat = {"model": "default", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}], "cache_salt": "s1"}
    assert post(amem_server, "/v1/chat/completions", chat).status_code == 200


def test_chunk_ids_are_keyed_by_the_servers_secret_file(amem_server, zoe):
    """The server's ids are the HMAC under its secret file (beside the memory dir, 0600), not the
    unkeyed SHA-256 a client could compute from a guessed text."""
    from amem_sgl.chunks.identity import SECRET_FILE_ENV

    secret = amem_server.log_path.parent / "memory.secret"
    assert secret.is_file() and stat.S_IMODE(secret.stat().st_mode) == 0o600
    info = requests.get(f"{amem_server.url}/get_server_info", timeout=30).json()
    model_id = str(info.get("served_model_name") or info["model_path"])
    tokenizer = str(info.get("tokenizer_path") or info["model_path"])
    code = ("import sys; from transformers import AutoTokenizer; from amem_sgl.chunks.identity import chunk_id; "
            "t = AutoTokenizer.from_pretrained(sys.argv[1]); "
            "print(chunk_id(sys.argv[3], sys.argv[2], t(sys.argv[4] + '\\n', add_special_tokens=False).input_ids))")
    args = [sys.executable, "-c", code, tokenizer, model_id, NS, TEXT]
    env = {k: v for k, v in os.environ.items() if k != SECRET_FILE_ENV}
    unkeyed = subprocess.check_output(args, env=env, text=True, timeout=300).strip()
    keyed = subprocess.check_output(args, env={**env, SECRET_FILE_ENV: str(secret)}, text=True, timeout=300).strip()
    assert zoe == [keyed] and keyed != unkeyed
    # ... and the scheduler keys them the same way: a turn over the chunk reuses its KV (a fast turn:
    # the chunk spliced where the registered node is found).
    chat = {"model": "default", "max_tokens": 8, "temperature": 0, "user": NS, "amem_fidelity": "fast",
            "messages": [{"role": "user", "content": "Where does Zoe keep her spare key?"}]}
    reply = post(amem_server, "/v1/chat/completions", chat)
    assert reply.status_code == 200, reply.text
    usage = reply.json()["usage"]
    assert usage["amem"]["memory"]["chunks"] == zoe
    assert usage["amem"]["spliced_tokens"] > 0 or usage["prompt_tokens_details"]["cached_tokens"] > 0, usage
