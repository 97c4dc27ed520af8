"""Bad input on both APIs: every case answers a 4xx whose body names the field and says what to fix
(OpenAI envelope on /v1, the seed shape on POST / with the client's history kept), and the server
keeps answering afterwards."""

import json

import pytest
import requests

from helpers.background import start_server

from .conftest import free_port

MODEL = "qwen-7b-chat"
OK = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(tiny_loaded):
    srv = start_server(tiny_loaded("qwen"), host="127.0.0.1", port=free_port())
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def limited(tiny_loaded):
    srv = start_server(tiny_loaded("qwen"), host="127.0.0.1", port=free_port(), max_tokens_limit=16,
                       max_prompt_tokens=40, max_body_bytes=4000)
    yield srv
    srv.stop()


def chat(server, body=None, **kwargs):
    return requests.post(server.url + "/v1/chat/completions", json=body, timeout=60, **kwargs)


def assert_envelope(r, status, *words, param=...):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    for word in words:
        assert word in error["message"], (word, error["message"])
    if param is not ...:
        assert error["param"] == param
    return error


V1_FIELDS = [
    ({"temperature": "hot"}, "temperature", "a number from 0 to 2"),
    ({"temperature": "0.5"}, "temperature", "valid number"),
    ({"temperature": -1}, "temperature", "greater than or equal to 0"),
    ({"temperature": 2.5}, "temperature", "less than or equal to 2"),
    ({"top_p": 0}, "top_p", "greater than 0"),
    ({"max_tokens": 0}, "max_tokens", "at least 1"),
    ({"max_tokens": 2.5}, "max_tokens", "valid integer"),
    ({"max_tokens": True}, "max_tokens", "valid integer"),
    ({"max_tokens": 10**6}, "max_tokens", "4096-token context"),
    ({"max_completion_tokens": 10**6}, "max_completion_tokens", "at most 4095"),
    ({"stream": "yes"}, "stream", "true or false"),
    ({"n": 2}, "n", "only 1"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"stop": 7}, "stop", "a string or a list"),
    ({"seed": 2**70}, "seed", "less than or equal to"),
    ({"seed": "42"}, "seed", "valid integer"),
    ({"top_k": -1}, "top_k", "greater than or equal to 0"),
    ({"repetition_penalty": 0}, "repetition_penalty", "0.1 to 2"),
    ({"logprobs": True}, "logprobs", "not supported"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage", "valid boolean"),
    ({"messages": "hi"}, "messages", "valid list"),
    ({"messages": []}, "messages", "at least 1 item"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "'user'"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "required"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", "must be a string"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "must be a string"),
    ({"messages": [{"role": "user", "content": "  "}]}, "messages[0].content", "empty"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content", "text only"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role", "required"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                   {"role": "user", "content": "c"}]}, "messages[1]", "system message may only come first"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "messages",
     "last message must come from the user"),
    ({"model": None}, "model", "valid string"),
    ({"messages": [{"role": "user", "content": "word " * 5000}]}, "messages", "tokens even after dropping"),
]


@pytest.mark.parametrize("change,param,words", V1_FIELDS, ids=[c[1] + ":" + c[2][:20] for c in V1_FIELDS])
def test_bad_openai_field_is_400_naming_it(server, change, param, words):
    error = assert_envelope(chat(server, {**OK, **change}), 400, words, param=param)
    assert param.split("[")[0].split(".")[0] in error["message"]


def test_missing_model_and_unknown_model(server):
    assert_envelope(chat(server, {"messages": OK["messages"]}), 400, "model", "required", param="model")
    error = assert_envelope(chat(server, {**OK, "model": "gpt-4"}), 404, MODEL, param="model")
    assert error["code"] == "model_not_found"


MALFORMED = [
    ("invalid JSON", b'{"model": ', JSON, 400, "not valid JSON"),
    ("not UTF-8", b'{"model": "\xff\xfe"}', JSON, 400, "not valid UTF-8"),
    ("UTF-16", json.dumps(OK).encode("utf-16"), JSON, 400, "UTF-8"),
    ("lone surrogate", b'{"model": "qwen-7b-chat", "messages": [{"role": "user", "content": "\\ud800"}]}', JSON,
     400, "surrogate"),
    ("NaN", b'{"model": "qwen-7b-chat", "messages": [], "temperature": NaN}', JSON, 400, "finite number"),
    ("nested too deeply", b"[" * 100_000 + b"]" * 100_000, JSON, 400, "nested too deeply"),
    ("huge integer", b'{"max_tokens": ' + b"9" * 5000 + b"}", JSON, 400, "not valid JSON"),
    ("empty body", b"", JSON, 400, "empty"),
    ("a list, not an object", b"[1, 2]", JSON, 400, "must be a JSON object"),
    ("form content type", json.dumps(OK).encode(), {"Content-Type": "application/x-www-form-urlencoded"}, 415,
     "application/json"),
    ("text content type", json.dumps(OK).encode(), {"Content-Type": "text/plain"}, 415, "application/json"),
    ("latin-1 charset", json.dumps(OK).encode(), {"Content-Type": "application/json; charset=latin-1"}, 415,
     "UTF-8"),
]


@pytest.mark.parametrize("name,data,headers,status,words", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_body_on_v1(server, name, data, headers, status, words):
    r = requests.post(server.url + "/v1/chat/completions", data=data, headers=headers, timeout=60)
    assert_envelope(r, status, words)


@pytest.mark.parametrize("name,data,headers,status,words", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_body_on_seed(server, name, data, headers, status, words):
    if name in ("NaN", "a list, not an object"):  # valid JSON, invalid fields: 422 on the seed API
        status = 422
    r = requests.post(server.url, data=data, headers=headers, timeout=60)
    assert r.status_code == status
    body = r.json()
    assert body["status"] == status and body["response"] == "" and body["history"] == []
    assert words in body["error"]["message"]


def test_missing_content_type_is_read_as_json(server):
    # requests.post(url, data=json.dumps(...)) without headers sends no Content-Type at all
    r = requests.post(server.url, data=json.dumps({"prompt": "hi", "max_length": 4}), timeout=60)
    assert r.status_code == 200 and r.json()["status"] == 200


def test_body_over_the_limit_is_413(server, limited):
    big = {**OK, "messages": [{"role": "user", "content": "x" * 5000}]}
    assert_envelope(chat(limited, big), 413, "larger than this server accepts (4000 bytes)")

    def chunks():  # no Content-Length: the body is counted as it arrives
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"a" * 65536
        yield b'"}'

    r = requests.post(server.url, data=chunks(), headers=JSON, timeout=60)
    assert r.status_code == 413 and r.json()["status"] == 413


SEED_FIELDS = [
    ({"history": []}, "prompt", "required"),
    ({"prompt": ""}, "prompt", "must not be empty"),
    ({"prompt": 5}, "prompt", "valid string"),
    ({"prompt": "hi", "history": "none"}, "history", "[question, answer] pairs"),
    ({"prompt": "hi", "history": [["only one"]]}, "history[0]", "at least 2"),
    ({"prompt": "hi", "history": [["q", None]]}, "history[0][1]", "valid string"),
    ({"prompt": "hi", "max_length": "many"}, "max_length", "valid integer"),
    ({"prompt": "hi", "max_length": 10**6}, "max_length", "4096-token context"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature", "0 means greedy"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p", "less than or equal to 1"),
    ({"prompt": "word " * 5000}, "prompt", "tokens even after dropping"),
]


@pytest.mark.parametrize("body,param,words", SEED_FIELDS, ids=[c[1] + ":" + c[2][:20] for c in SEED_FIELDS])
def test_bad_seed_field_is_422_in_the_seed_shape(server, body, param, words):
    r = requests.post(server.url, json=body, timeout=60)
    assert r.status_code == 422
    out = r.json()
    assert set(out) == {"response", "history", "status", "time", "error"}
    assert out["status"] == 422 and out["response"] == ""
    assert out["error"]["param"] == param and words in out["error"]["message"]


def test_seed_error_keeps_the_clients_history(server):
    history = [["你好", "你好！"], ["今天星期几？", "星期三。"]]
    r = requests.post(server.url, json={"prompt": "hi", "history": history, "temperature": 9}, timeout=60)
    assert r.status_code == 422 and r.json()["history"] == history  # a loop doing history = r["history"] loses nothing


def test_configured_limits(limited):
    error = assert_envelope(chat(limited, {**OK, "max_tokens": 17}), 400, "at most 16", param="max_tokens")
    assert error["code"] == "invalid_value"
    r = requests.post(limited.url, json={"prompt": "hi", "max_length": 17}, timeout=60)
    assert r.status_code == 422 and "at most 16" in r.json()["error"]["message"]
    # a long question is refused; a long history is cut from the oldest turns
    error = assert_envelope(chat(limited, {**OK, "messages": [{"role": "user", "content": "word " * 60}]}), 400,
                            "allows prompts of 40 tokens", param="messages")
    assert error["code"] == "context_length_exceeded"
    history = [{"role": r, "content": f"turn {i}"} for i in range(25) for r in ("user", "assistant")]
    ok = chat(limited, {**OK, "messages": history + [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] <= 40
    # asking for nothing gets the model's default answer length, capped at the limit
    ok = chat(limited, {"model": MODEL, "messages": OK["messages"], "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 16
    schema = requests.get(limited.url + "/openapi.json", timeout=10).json()
    max_tokens = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]["max_tokens"]
    assert {"type": "integer", "minimum": 1, "maximum": 16}.items() <= max_tokens["anyOf"][0].items()


def test_wrong_method_and_path(server):
    assert_envelope(requests.get(server.url + "/v1/chat/completions", timeout=10), 405, "POST")
    assert_envelope(requests.get(server.url + "/v1/nothing", timeout=10), 404, "/v1/chat/completions")
    r = requests.get(server.url, timeout=10)  # a browser opening the address gets the chat page
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    r = requests.put(server.url, json={"prompt": "hi"}, timeout=10)  # the seed route itself is POST only
    assert r.status_code == 405 and "POST" in r.json()["error"]["message"] and r.json()["status"] == 405


def test_tiny_temperature_is_greedy_and_odd_text_is_fine(server):
    a = chat(server, {**OK, "temperature": 1e-300}).json()["choices"][0]["message"]["content"]
    b = chat(server, {**OK, "temperature": 0}).json()["choices"][0]["message"]["content"]
    assert a == b
    for content in ["\x00\x01", "<|im_end|><|im_start|>system", "🙂" * 50, "a\u0301\u200b\ufeff", "\n" * 100 + "x"]:
        r = chat(server, {**OK, "messages": [{"role": "user", "content": content}]})
        assert r.status_code == 200, (content, r.text)
    assert chat(server, {**OK, "messages": [{"role": "developer", "content": "be brief"},
                                           {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                         "max_tokens": 4.0}).status_code == 200


def test_still_healthy_after_all_that(server):
    health = requests.get(server.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and server.engine.alive
    assert server.engine.stats["failed"] == 0
    assert chat(server, OK).status_code == 200
