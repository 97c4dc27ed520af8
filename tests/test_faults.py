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
    model = srv.app.state.engine.loaded.name  # the server's own model, whichever family
    return requests.post(srv.url + "/v1/chat/completions", json={"model": model, "messages": HI, **body},
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


# --------------------------------------------------------------------------- the worker never dies


def assert_no_slot_taken(engine):
    assert wait_for(lambda: engine.running == 0 and engine.waiting == 0), (engine.running, engine.waiting)


@pytest.mark.parametrize("family", ["bluelm", "qwen"])
def test_an_undecodable_id_fails_that_request_and_the_next_is_answered(tiny_loaded, family, monkeypatch):
    """An id above the tokenizer's range forced into a step (BlueLM's SentencePiece raises on it,
    Qwen's decoder drops it): the request ends with a clear error or without that id; the worker
    goes on, nothing stays taken."""
    import helpers.engine as engine_module

    loaded = tiny_loaded(family)
    beyond = len(loaded.tokenizer)  # the first id of the gap between the tokenizer and the output layer
    assert loaded.model.config.vocab_size > beyond, "the stand-in must have the real model's vocabulary gap"
    real_sample = engine_module._sample
    forced = []

    def sample(logits, seqs, seen, limit=None):
        tokens = real_sample(logits, seqs, seen, limit)
        if not forced:
            forced.append(tokens[0])
            tokens = [beyond] + list(tokens[1:])
        return tokens

    srv = start_server(loaded, host="127.0.0.1", port=free_port())
    try:
        monkeypatch.setattr(engine_module, "_sample", sample)
        r = chat(srv, max_tokens=4, temperature=0)
        monkeypatch.setattr(engine_module, "_sample", real_sample)
        assert forced, "the step did not run"
        if family == "bluelm":  # SentencePiece: IndexError: piece id is out of range
            assert r.status_code == 500, r.text
            message = r.json()["error"]["message"]
            assert f"could not decode token {beyond}" in message and "still running" in message
            assert srv.engine.stats["failed"] == 1
        else:
            assert r.status_code == 200, r.text
        assert srv.engine.alive
        assert_no_slot_taken(srv.engine)
        assert_answers(srv)
    finally:
        srv.stop()


def test_ids_beyond_the_tokenizer_are_never_sampled():
    """The output layer may have more ids than the tokenizer (Qwen-7B 151,936 vs 151,851): with
    every probability in that gap, sampling and greedy still pick a decodable id."""
    from helpers.engine import SamplingParams, _sample

    class Row:
        def __init__(self, **params):
            self.params = SamplingParams(**params)
            self.rng = __import__("random").Random(0)

    logits = torch.zeros(3, 12)
    logits[:, 10:] = 50.0  # ids 10 and 11 are beyond a 10-id tokenizer
    logits[:, 4] = 1.0
    seen = torch.zeros(3, 12, dtype=torch.bool)
    rows = [Row(temperature=0), Row(temperature=1.0, top_p=0.9), Row(temperature=0, repetition_penalty=1.3)]
    for _ in range(20):
        greedy, sampled, penalized = _sample(logits, rows, seen, limit=10)
        assert greedy == penalized == 4 and sampled < 10
    assert _sample(logits[:1], rows[:1], seen[:1]) == [10]  # without the limit the gap wins


class StepFault(RuntimeError):
    pass


def test_an_exception_in_a_step_fails_the_requests_it_touched_and_the_worker_goes_on(server, monkeypatch):
    """A fault outside the model call (here: in the cache bookkeeping after the forward pass) ends
    the running requests with a clear error; the worker stays up and serves the next ones."""
    from helpers import kvcache

    engine = server.engine
    real_update = kvcache.BatchCache.update
    calls = {"n": 0}

    def update(self, past, mask):
        calls["n"] += 1
        if calls["n"] == 2:
            raise StepFault("injected fault in a step")
        return real_update(self, past, mask)

    monkeypatch.setattr(kvcache.BatchCache, "update", update)
    results = {}

    def ask(i):
        results[i] = chat(server, max_tokens=40, temperature=0, ignore_eos=True)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    monkeypatch.setattr(kvcache.BatchCache, "update", real_update)
    failed = [r for r in results.values() if r.status_code != 200]
    assert failed, "the fault hit no request"
    for r in failed:
        assert r.status_code == 500 and "StepFault: injected fault in a step" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "generation_failed"
    assert engine.alive and engine.status() == ("ok", None)
    assert_no_slot_taken(engine)
    assert_answers(server)


class WorkerKilled(BaseException):
    """Not an Exception: nothing in the step loop catches it, so the worker thread ends."""


def test_a_dead_worker_is_reported_at_once_and_can_be_restarted(tiny_loaded, monkeypatch):
    loaded = tiny_loaded("qwen")
    engine = Engine(loaded).start()
    srv = start_server(engine, host="127.0.0.1", port=free_port())
    try:
        real_step = Engine._step

        def step(self):
            raise WorkerKilled("the worker was killed")

        monkeypatch.setattr(Engine, "_step", step)
        r = chat(srv, max_tokens=4, timeout=30)  # running when the worker dies: ends, does not hang
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_stopped", r.text
        assert "WorkerKilled: the worker was killed" in r.json()["error"]["message"]
        assert wait_for(lambda: not engine.alive)
        monkeypatch.setattr(Engine, "_step", real_step)

        health = requests.get(srv.url + "/health", timeout=10)
        assert health.status_code == 503
        body = health.json()
        assert body["status"] == "failed" and "WorkerKilled" in body["reason"] and "restart" in body["reason"]
        assert set(body) == {"status", "model", "family", "device", "running", "waiting", "reason"}
        r = chat(srv, max_tokens=4, timeout=10)  # a new request: 503 with the reason, at once
        assert r.status_code == 503 and r.headers["Retry-After"]
        assert "WorkerKilled" in r.json()["error"]["message"]
        seed = requests.post(srv.url, json={"prompt": "hi", "history": [["a", "b"]]}, timeout=10)
        assert seed.status_code == 503 and seed.json()["status"] == 503 and seed.json()["history"] == [["a", "b"]]

        engine.restart()
        assert engine.alive and engine.failure is None
        assert_answers(srv)
        assert requests.get(srv.url + "/health", timeout=10).status_code == 200
    finally:
        srv.stop()
        engine.stop()


def test_health_is_503_stopping_once_the_engine_is_stopped(tiny_loaded):
    engine = Engine(tiny_loaded("qwen")).start()
    srv = start_server(engine, host="127.0.0.1", port=free_port())
    try:
        assert requests.get(srv.url + "/health", timeout=10).status_code == 200
        engine.stop()
        health = requests.get(srv.url + "/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "stopping", health.text
        r = chat(srv, max_tokens=4, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
    finally:
        srv.stop()
