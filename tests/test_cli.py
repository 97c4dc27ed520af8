"""`python -m helpers serve` on every family's stand-in, called with the seed snippets and the
official openai client; `python -m helpers tiny`."""

import json
import os
import signal
import subprocess
import sys

import pytest
import requests
from openai import OpenAI


from .conftest import FAMILIES, free_port, wait_for_server


def _serve(model_dir, port):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "helpers", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _stop(proc):
    proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=30)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_serve_answers_seed_and_openai_clients(tiny_model_dir, family):
    port = free_port()
    proc = _serve(tiny_model_dir(family), port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(proc, url)

        # the seed tutorials' requests snippet
        headers = {'Content-Type': 'application/json'}
        data = {"prompt": "你好", "history": []}
        response = requests.post(url=url, headers=headers, data=json.dumps(data))
        assert response.status_code == 200 and response.json()["status"] == 200
        assert isinstance(response.json()['response'], str)

        client = OpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0)
        model = client.models.list().data[0].id
        messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                    {"role": "user", "content": "Tell me a joke."}]
        out = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
        assert out.choices[0].finish_reason in ("stop", "length")
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=model, messages=messages, max_tokens=8, temperature=0, stream=True) if c.choices)
        assert streamed == out.choices[0].message.content or streamed.strip() == out.choices[0].message.content
    finally:
        output = _stop(proc)
    assert "Traceback" not in output, output


def test_serve_refuses_a_taken_port(tiny_model_dir):
    import socket

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "helpers", "serve", "--model", str(tiny_model_dir("qwen")),
                              "--host", "127.0.0.1", "--port", str(port)], capture_output=True, text=True,
                             timeout=60)
    assert out.returncode == 1
    assert f"port {port} is already in use" in out.stderr


def test_tiny_command_builds_a_loadable_standin(tmp_path):
    out = subprocess.run([sys.executable, "-m", "helpers", "tiny", "minicpm", str(tmp_path / "m")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "m" / "config.json").exists()
    from helpers.loading import detect_family

    assert detect_family(tmp_path / "m") == "minicpm"


def test_unknown_model_name_says_what_exists():
    out = subprocess.run([sys.executable, "-m", "helpers", "serve", "--model", "no-such-model", "--port",
                          str(free_port())], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 1
    assert "qwen-7b-chat" in out.stderr


def test_loading_gate_answers_503_until_ready():
    """/health is 200 only when the server can generate: 503 with the same fields (and
    Retry-After) while loading, 503 with the reason after a failed load."""
    import asyncio

    import httpx
    from fastapi import FastAPI

    from helpers.server import LoadingApp

    gate = LoadingApp("qwen-7b-chat")
    real = FastAPI()

    @real.get("/health")
    def health():
        return {"status": "ok"}

    async def calls(gate):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gate), base_url="http://x") as c:
            loading = await c.get("/health")
            v1 = await c.post("/v1/chat/completions", json={})
            seed = await c.post("/", json={"prompt": "hi"})
            gate.ready(real)
            ready = await c.get("/health")
            return loading, v1, seed, ready

    loading, v1, seed, ready = asyncio.run(calls(gate))
    assert loading.status_code == 503 and int(loading.headers["Retry-After"]) > 0
    assert loading.json() == {"status": "loading", "model": "qwen-7b-chat", "family": None, "device": None,
                              "running": 0, "waiting": 0, "reason": "the model qwen-7b-chat is still loading"}
    assert v1.status_code == 503 and int(v1.headers["Retry-After"]) > 0
    assert v1.json()["error"]["code"] == "model_loading"
    assert seed.status_code == 503 and seed.json()["status"] == 503
    assert ready.status_code == 200 and ready.json() == {"status": "ok"}

    failed = LoadingApp("qwen-7b-chat")
    failed.failed("OSError: no weights in /root/autodl-tmp/qwen")

    async def probe():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=failed), base_url="http://x") as c:
            return await c.get("/health"), await c.post("/v1/chat/completions", json={})

    answer, v1 = asyncio.run(probe())
    assert answer.status_code == 503 and "Retry-After" not in answer.headers
    assert answer.json()["status"] == "failed"
    assert answer.json()["reason"] == "the model failed to load: OSError: no weights in /root/autodl-tmp/qwen"
    assert v1.status_code == 503 and "no weights" in v1.json()["error"]["message"]


def test_wait_until_ready_waits_through_503_and_reports_a_failure(monkeypatch):
    import requests

    from helpers import client

    answers = [(503, {"status": "loading"}), (503, {"status": "loading"}),
               (200, {"status": "ok", "model": "m"})]

    class Response:
        def __init__(self, code, body):
            self.status_code, self._body = code, body

        def json(self):
            return self._body

    monkeypatch.setattr(client.time, "sleep", lambda s: None)
    monkeypatch.setattr(requests, "get", lambda url, timeout: Response(*answers.pop(0)))
    assert client.wait_until_ready("http://x", timeout=10) == {"status": "ok", "model": "m"}
    monkeypatch.setattr(requests, "get", lambda url, timeout: Response(503, {"status": "failed", "reason": "boom"}))
    with pytest.raises(RuntimeError, match="cannot generate \\(failed\\): boom"):
        client.wait_until_ready("http://x", timeout=10)


def test_serve_exits_with_the_reason_when_loading_fails(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    out = subprocess.run([sys.executable, "-m", "helpers", "serve", "--model", str(tmp_path), "--family", "qwen",
                          "--host", "127.0.0.1", "--port", str(free_port())],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "loading failed" in out.stderr
