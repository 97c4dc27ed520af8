"""Faults: out of GPU memory in one request, clients that hang up or read slowly, a shutdown while
requests run, a taken port, start/stop in a row, unloading. After each, the server still answers."""

import gc
import json
import socket
import subprocess
import sys
import threading
import time
import weakref

import pytest
import requests
import torch
from openai import APIError, OpenAI

from helpers.background import ServerError, port_is_free, start_server
from helpers.engine import Engine

from .conftest import free_port

MODEL = "qwen-7b-chat"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture()
def server(tiny_loaded):
    srv = start_server(tiny_loaded("qwen"), host="127.0.0.1", port=free_port())
    yield srv
    srv.stop()


def chat(srv, timeout=60, **body):
    return requests.post(srv.url + "/v1/chat/completions", json={"model": MODEL, "messages": HI, **body},
                         timeout=timeout)


def wait_for(predicate, seconds=20):
    """Poll until ``predicate()`` (a guard against hanging, not a timing assertion)."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def assert_answers(srv):
    assert requests.get(srv.url + "/health", timeout=10).json()["status"] == "ok"
    r = chat(srv, max_tokens=4)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


class OutOfMemoryOnce:
    """Makes the model's next forward pass raise CUDA out-of-memory, as a GPU does (on the CPU too)."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        def forward(*args, **kwargs):
            del self.model.forward  # once: the next forward is the real one
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

        self.model.forward = forward
        return self

    def __exit__(self, *exc):
        self.model.__dict__.pop("forward", None)


def test_out_of_memory_fails_that_request_only(server):
    model = server.engine.loaded.model
    with OutOfMemoryOnce(model):
        r = chat(server, max_tokens=8)
    assert r.status_code == 503 and r.headers["Retry-After"]
    error = r.json()["error"]
    assert error["code"] == "out_of_memory" and error["type"] == "server_error"
    assert "out of memory" in error["message"] and "shorter prompt" in error["message"]
    assert server.engine.stats["failed"] == 1
    assert_answers(server)

    history = [["你好", "你好！"]]
    with OutOfMemoryOnce(model):
        r = requests.post(server.url, json={"prompt": "hi", "history": history}, timeout=60)
    assert r.status_code == 503 and r.json()["status"] == 503 and r.json()["history"] == history

    client = OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    with OutOfMemoryOnce(model):
        stream = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=8, stream=True)
        with pytest.raises(APIError, match="out of memory"):
            for _ in stream:
                pass
    with OutOfMemoryOnce(model), requests.post(server.url + "/v1/chat/completions", stream=True, timeout=60,
                                               json={"model": MODEL, "messages": HI, "stream": True}) as r:
        lines = [line for line in r.iter_lines(decode_unicode=True) if line]
    assert json.loads(lines[-2][6:])["error"]["code"] == "out_of_memory" and lines[-1] == "data: [DONE]"
    assert server.engine.stats["failed"] == 4
    assert_answers(server)


def test_client_that_hangs_up_cancels_its_generation(server):
    engine = server.engine
    with pytest.raises(requests.Timeout):  # requests closes the connection on timeout
        chat(server, timeout=0.5, max_tokens=3000, temperature=0)
    assert wait_for(lambda: engine.stats["cancelled"] == 1 and engine.running == 0)
    assert engine.stats["completion_tokens"] < 3000
    assert_answers(server)


def test_a_slow_reader_holds_up_nobody(server):
    request = json.dumps({"model": MODEL, "messages": HI, "max_tokens": 1500, "temperature": 0, "stream": True})
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)  # a small window, and nobody reading it
    slow.connect(("127.0.0.1", server.port))
    slow.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Connection: close\r\nContent-Length: {len(request)}\r\n\r\n{request}").encode())
    try:
        assert wait_for(lambda: server.engine.running >= 1)
        assert_answers(server)  # served while the slow stream waits
        slow.settimeout(60)
        data = b""
        while chunk := slow.recv(65536):
            data += chunk
    finally:
        slow.close()
    text = data.decode("utf-8", "replace")
    assert text.startswith("HTTP/1.1 200") and '"finish_reason": "length"' in text
    assert '"completion_tokens": 1500' in text  # all of it, nothing dropped while it was not reading
    assert text.endswith("data: [DONE]\n\n\r\n0\r\n\r\n")  # then the last chunk of the chunked body
    assert_answers(server)


def _run_requests(srv, results):
    """Two streams and two plain requests, long enough to be running when the server stops."""

    def plain(i):
        try:
            r = chat(srv, max_tokens=3000, temperature=0, ignore_eos=True, timeout=60)
            results[f"plain{i}"] = (r.status_code, r.json())
        except Exception as exc:  # pragma: no cover - reported by the assertions
            results[f"plain{i}"] = ("exception", repr(exc))

    def stream(i):
        try:
            with requests.post(srv.url + "/v1/chat/completions", stream=True, timeout=60,
                               json={"model": MODEL, "messages": HI, "max_tokens": 3000, "stream": True,
                                     "ignore_eos": True}) as r:  # still running when the server stops
                results[f"stream{i}"] = (r.status_code, [x for x in r.iter_lines(decode_unicode=True) if x])
        except Exception as exc:  # pragma: no cover
            results[f"stream{i}"] = ("exception", repr(exc))

    threads = [threading.Thread(target=f, args=(i,)) for i in range(2) for f in (plain, stream)]
    for t in threads:
        t.start()
    return threads


def _assert_ended_with_errors(results):
    assert len(results) == 4, results
    for name, (status, body) in results.items():
        if name.startswith("plain"):
            assert status == 503 and body["error"]["code"] == "shutting_down", (name, status, body)
        else:
            assert status == 200, (name, status, body)
            assert json.loads(body[-2][6:])["error"]["code"] == "shutting_down" and body[-1] == "data: [DONE]"


@pytest.mark.parametrize("engine_owned", [True, False], ids=["start_server(loaded)", "start_server(engine)"])
def test_stopping_while_requests_run(tiny_loaded, engine_owned):
    loaded = tiny_loaded("qwen")
    engine = None if engine_owned else Engine(loaded).start()
    srv = start_server(loaded if engine_owned else engine, host="127.0.0.1", port=free_port())
    served = srv.app.state.engine
    results: dict = {}
    threads = _run_requests(srv, results)
    assert wait_for(lambda: served.running >= 1 and served.running + served.waiting == 4)  # batched or queued
    srv.stop()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a client still waits after the server stopped"
    _assert_ended_with_errors(results)
    print(f"\nstop with 4 requests in flight took {srv.stop_seconds:.2f} s")
    assert port_is_free(srv.port, "127.0.0.1")
    assert served.alive == (not engine_owned)  # an engine you passed in keeps running
    if engine is not None:
        again = start_server(engine, host="127.0.0.1", port=srv.port)
        try:
            assert_answers(again)
        finally:
            again.stop()
            engine.stop()


def test_second_server_on_a_taken_port_says_so(tiny_loaded, tmp_path):
    port = free_port()
    other = subprocess.Popen(  # another kernel serving on the port
        [sys.executable, "-c", "import sys; from fastapi import FastAPI; from helpers.background import "
         f"BackgroundServer; BackgroundServer(FastAPI(), '0.0.0.0', {port}).start(); print('ready', flush=True); "
         "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "ready"
        started = time.monotonic()
        with pytest.raises(ServerError, match=f"port {port} is already in use"):
            start_server(tiny_loaded("qwen"), host="0.0.0.0", port=port, timeout=30)
        seconds = time.monotonic() - started
    finally:
        other.stdin.close()
        other.wait(30)
    print(f"\ntaken port reported in {seconds:.2f} s")
    assert seconds < 10  # "within seconds", not after the 30 s start-up deadline


def test_start_stop_ten_times_in_a_row(tiny_loaded):
    port = free_port()
    threads_before = threading.active_count()
    for i in range(10):
        srv = start_server(tiny_loaded("qwen"), host="127.0.0.1", port=port)
        r = requests.post(srv.url, json={"prompt": f"round {i}", "max_length": 2}, timeout=30)
        assert r.status_code == 200
        srv.stop()
        assert port_is_free(port, "127.0.0.1") and not srv.engine.alive
    assert wait_for(lambda: threading.active_count() <= threads_before)  # no thread left behind


def test_stop_with_unload_frees_the_model(tiny_model_dir):
    from helpers.loading import load_model

    loaded = load_model(tiny_model_dir("qwen"))  # its own copy: the shared one stays loaded
    weight = loaded.model.get_input_embeddings().weight  # as if a notebook variable still held it
    model_ref = weakref.ref(loaded.model)
    srv = start_server(loaded, host="127.0.0.1", port=free_port())
    assert_answers(srv)
    srv.stop(unload=True)
    gc.collect()
    assert loaded.model is None and loaded.unloaded
    assert model_ref() is None
    assert weight.numel() == 0  # the memory is back even though `weight` is still referenced
    with pytest.raises(ServerError, match="unloaded"):
        start_server(loaded, host="127.0.0.1", port=free_port())

    loaded = load_model(tiny_model_dir("qwen"))
    engine = Engine(loaded).start()
    srv = start_server(engine, host="127.0.0.1", port=free_port())
    srv.stop(unload=True)  # an engine passed in is stopped too: it cannot run without its model
    assert not engine.alive and loaded.model is None
