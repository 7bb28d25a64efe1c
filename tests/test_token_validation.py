"""No request may end the server: token ids outside the model's vocabulary get a 400 naming the
offending value, on every route that embeds ids, and the server keeps answering.

SGLang 0.5.23 alone: ``POST /generate {"input_ids": [-1, 1000000000000]}`` crashed the scheduler
(IndexError in the embedding) and every later request was refused until a restart."""

from __future__ import annotations

import pytest
import requests

from amem_sgl.server.validation import TokenIdError, check_token_ids


def test_check_token_ids_names_the_first_bad_value_and_its_index():
    check_token_ids([0, 5, 99], 100)
    for ids, fragment in (([1, -1], "input_ids[1] = -1"), ([100], "input_ids[0] = 100"),
                          ([3, 10**30], f"= {10**30}"), ([True], "input_ids[0] must be an integer"),
                          ([1.0], "must be an integer"), ("12", "must be a list")):
        with pytest.raises(TokenIdError) as caught:
            check_token_ids(ids, 100)
        assert fragment in str(caught.value)


def answers_normally(url: str) -> None:
    reply = requests.post(f"{url}/generate", json={"text": "The capital of France is",
                                                   "sampling_params": {"max_new_tokens": 4, "temperature": 0}},
                          timeout=120)
    assert reply.status_code == 200 and reply.json()["meta_info"]["completion_tokens"] >= 1


@pytest.mark.slow
def test_out_of_vocabulary_ids_are_refused_on_every_route_and_the_server_keeps_answering(amem_server):
    url = amem_server.url
    bad = [-1, 1000000000000]
    cases = [
        ("/generate", {"input_ids": bad, "sampling_params": {"max_new_tokens": 2}}),
        ("/generate", {"input_ids": [[1, 2], [3, 49152]], "sampling_params": {"max_new_tokens": 2}}),
        ("/generate", {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2},
                       "kv_hints": {"protocol_version": "1", "message_id": "m", "actions": []}} | {"input_ids": [5, -7]}),
        ("/v1/completions", {"model": "default", "prompt": bad, "max_tokens": 2}),
        ("/v1/completions", {"model": "default", "prompt": [[1, 2], [-3]], "max_tokens": 2}),
        ("/v1/chat/completions", {"model": "default", "max_tokens": 2, "input_ids": bad,
                                  "messages": [{"role": "user", "content": "hi"}]}),
    ]
    for path, body in cases:
        reply = requests.post(url + path, json=body, timeout=120)
        assert reply.status_code == 400, (path, body, reply.status_code, reply.text[:300])
        assert "is not a token id of this model" in reply.text, reply.text[:300]
        answers_normally(url)  # the scheduler is alive after each one
    info = requests.get(f"{url}/get_server_info", timeout=30)
    assert info.status_code == 200
