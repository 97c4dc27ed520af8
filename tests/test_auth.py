"""API keys for a workshop: every route but /health and the docs needs `Authorization: Bearer <key>`;
401 in the OpenAI envelope without it; keys are never printed."""

import os
import signal
import subprocess
import sys

import pytest
import requests
from openai import AuthenticationError, OpenAI

from helpers.auth import APIKeys, InvalidAPIKey, bearer_token, keys_from, new_key
from helpers.background import start_server
from helpers.client import wait_until_ready

from .conftest import free_port

GROUP_A, GROUP_B = new_key(), new_key()


@pytest.fixture(scope="module")
def server(tiny_loaded):
    srv = start_server(tiny_loaded("qwen"), host="127.0.0.1", port=free_port(), api_keys=[GROUP_A, GROUP_B])
    yield srv
    srv.stop()


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def test_start_server_says_how_many_keys_never_which(tiny_loaded, capsys):
    srv = start_server(tiny_loaded("qwen"), host="127.0.0.1", port=free_port(), api_keys=[GROUP_A, GROUP_B])
    srv.stop()
    out = capsys.readouterr().out
    assert "API keys: 2 active" in out
    assert GROUP_A not in out and GROUP_B not in out
    assert GROUP_A not in repr(srv.app.state.api_keys)


@pytest.mark.parametrize("method,path", [("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                                         ("POST", "/"), ("GET", "/v1/nothing")])
@pytest.mark.parametrize("headers", [{}, bearer("sk-wrong"), {"Authorization": GROUP_A},
                                     {"Authorization": f"Basic {GROUP_A}"}, bearer(GROUP_A + "x")],
                         ids=["none", "wrong", "no scheme", "basic", "prefix"])
def test_without_a_valid_key_is_401(server, method, path, headers):
    body = {"model": "qwen-7b-chat", "messages": [{"role": "user", "content": "hi"}], "prompt": "hi",
            "history": [["q", "a"]]}
    r = requests.request(method, server.url + path, json=body, headers=headers, timeout=10)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == "Bearer"
    error = r.json()["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    assert "Authorization: Bearer" in error["message"] or "not valid" in error["message"]
    if path == "/":  # seed clients still find their fields (the body of a stranger is not even read)
        assert r.json()["status"] == 401 and r.json()["response"] == ""
    assert GROUP_A not in r.text


def test_every_group_key_works(server):
    for key in (GROUP_A, GROUP_B):
        client = OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["qwen-7b-chat"]
        out = client.chat.completions.create(model="qwen-7b-chat", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=4)
        assert out.choices[0].finish_reason in ("stop", "length")
    r = requests.post(server.url, json={"prompt": "hi", "max_length": 4},
                      headers={**bearer(GROUP_B), "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 200 and r.json()["status"] == 200
    r = requests.post(server.url, json={"prompt": "hi", "max_length": 4},
                      headers={"authorization": f"bearer  {GROUP_A} "}, timeout=30)
    assert r.status_code == 200  # scheme and spacing as HTTP allows


def test_openai_client_without_the_key(server):
    client = OpenAI(base_url=server.url + "/v1", api_key="EMPTY", max_retries=0)
    with pytest.raises(AuthenticationError) as info:
        client.chat.completions.create(model="qwen-7b-chat", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["code"] == "invalid_api_key"


def test_health_and_docs_stay_open(server):
    assert requests.get(server.url + "/health", timeout=10).json()["status"] == "ok"
    assert requests.get(server.url + "/docs", timeout=10).status_code == 200
    schema = requests.get(server.url + "/openapi.json", timeout=10).json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert schema["paths"]["/v1/chat/completions"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in schema["paths"]["/health"]["get"]


def test_no_keys_means_open(tiny_loaded):
    srv = start_server(tiny_loaded("qwen"), host="127.0.0.1", port=free_port())
    try:
        assert requests.get(srv.url + "/v1/models", timeout=10).status_code == 200
        schema = requests.get(srv.url + "/openapi.json", timeout=10).json()
        assert "securitySchemes" not in schema.get("components", {})
    finally:
        srv.stop()


def test_api_keys_object():
    keys = APIKeys([" k1 ", "k2", "k1"])
    assert len(keys) == 2 and keys.enabled and "k1" not in repr(keys)
    assert keys.check("Bearer k1") and keys.check("Bearer k2") and not keys.check("Bearer k3")
    assert not keys.check(None) and not keys.check("k1") and not keys.check("Bearer ")
    assert APIKeys(None).check(None) and not APIKeys([]).enabled
    assert APIKeys("single").check("Bearer single")
    for bad in ["", "  ", "two words"]:
        with pytest.raises(InvalidAPIKey):
            APIKeys([bad])
    assert bearer_token("Bearer abc") == "abc" and bearer_token("Token abc") is None
    assert len(new_key()) > 40 and new_key() != new_key()


def test_keys_from_arguments_file_and_environment(tmp_path, monkeypatch):
    f = tmp_path / "keys.txt"
    f.write_text("# group keys\nkey-a\n\nkey-b  # group B\n", encoding="utf-8")
    monkeypatch.setenv("API_KEYS", "key-c, key-d,")
    assert keys_from(["key-x"], [f]) == ["key-x", "key-a", "key-b", "key-c", "key-d"]


def test_cli_serve_with_keys_never_prints_them(tiny_model_dir, tmp_path):
    file_keys, env_key = [new_key(), new_key()], new_key()
    keyfile = tmp_path / "keys.txt"
    keyfile.write_text("\n".join(file_keys) + "\n", encoding="utf-8")
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", API_KEYS=env_key)
    proc = subprocess.Popen([sys.executable, "-m", "helpers", "serve", "--model", str(tiny_model_dir("qwen")),
                             "--host", "127.0.0.1", "--port", str(port), "--api-key-file", str(keyfile),
                             "--log-level", "info"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, timeout=90)
        assert requests.get(url + "/v1/models", headers=bearer("sk-nope"), timeout=10).status_code == 401
        for key in file_keys + [env_key]:
            assert requests.get(url + "/v1/models", headers=bearer(key), timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=30)[0]
    assert "API keys: 3 active" in out
    for key in file_keys + [env_key]:
        assert key not in out
    assert "401" in out  # the access log is on, and shows no key
