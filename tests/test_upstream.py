"""The same server in front of another generator: ``UpstreamGenerator`` talks to a vLLM-style
``/v1/completions`` (here a small fake that records what it is sent; tests/test_vllm.py runs the real
vLLM). The server does not know which one generates: seed ``POST /``, the openai client (plain and
streamed), ``/health`` and clear errors behave as with the built-in engine, and the upstream gets
the prompt as the family's token ids with its stop ids."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
import requests
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from openai import OpenAI

from helpers.background import BackgroundServer, start_server
from helpers.loading import load_tokenizer_side
from helpers.upstream import UpstreamGenerator

from .conftest import free_port

ANSWER = ["Hel", "lo", " 世界", "!"]


class FakeVLLM:
    """A vLLM-like OpenAI server: records each /v1/completions body and streams ANSWER."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.mode = "ok"        # "ok" | "die" (drop the connection mid-stream) | "refuse" (400)
        self.healthy = True
        self.release = threading.Event()
        self.release.set()
        app = FastAPI()

        @app.get("/health")
        def health():
            return JSONResponse({}, status_code=200 if self.healthy else 500)

        @app.get("/v1/models")
        def models():
            return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            self.bodies.append(body)
            if self.mode == "refuse":
                return JSONResponse({"error": {"message": "This model's maximum context length is 8 tokens",
                                               "type": "BadRequestError", "code": 400}}, status_code=400)

            async def events():
                text = ANSWER[: body["max_tokens"]]
                for i, piece in enumerate(text):
                    while not self.release.is_set():
                        await asyncio.sleep(0.01)
                    if self.mode == "die" and i == 2:
                        raise RuntimeError("the fake vLLM died")
                    last = i == len(text) - 1
                    finish = ("length" if len(text) < len(ANSWER) else "stop") if last else None
                    yield "data: " + json.dumps({"choices": [{"index": 0, "text": piece,
                                                              "finish_reason": finish}]}) + "\n\n"
                yield "data: " + json.dumps({"choices": [], "usage": {
                    "prompt_tokens": len(body["prompt"]), "completion_tokens": len(text),
                    "total_tokens": len(body["prompt"]) + len(text)}}) + "\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        self.server = BackgroundServer(app, "127.0.0.1", free_port(), log_level="critical").start()
        self.url = self.server.url


@pytest.fixture(scope="module")
def fake():
    f = FakeVLLM()
    yield f
    f.server.stop()


@pytest.fixture()
def front(fake, tiny_model_dir):
    fake.mode, fake.healthy = "ok", True
    fake.bodies.clear()
    loaded = load_tokenizer_side(tiny_model_dir("minicpm"))
    generator = UpstreamGenerator(loaded, fake.url)
    srv = start_server(generator, host="127.0.0.1", port=free_port())
    yield srv, generator, loaded
    srv.stop()
    generator.stop()


def test_seed_api_and_openai_client_through_the_upstream(front, fake):
    srv, generator, loaded = front
    assert generator.upstream_model == "fake-model" and loaded.model is None
    history = [["你好", "你好！"]]
    r = requests.post(srv.url, json={"prompt": "讲个笑话", "history": history, "max_length": 50, "temperature": 0},
                      timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["response"] == "Hello 世界!" and r.json()["history"] == history + [["讲个笑话", "Hello 世界!"]]

    sent = fake.bodies[-1]
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                {"role": "user", "content": "讲个笑话"}]
    assert sent["prompt"] == loaded.chat_format.encode(loaded.tokenizer, messages)  # our ids, id for id
    assert sent["stop_token_ids"] == loaded.stop_ids
    assert set(loaded.chat_format.stop_strings) <= set(sent["stop"])  # MiniCPM: <用户> / <AI>
    assert sent["max_tokens"] == 50 and sent["temperature"] == 0 and sent["stream"] is True

    client = OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(model=loaded.name, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=2, top_p=0.5, extra_body={"top_k": 7, "seed": 3})
    assert reply.choices[0].message.content == "Hello" and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 2
    assert (fake.bodies[-1]["top_p"], fake.bodies[-1]["top_k"], fake.bodies[-1]["seed"]) == (0.5, 7, 3)
    stream = client.chat.completions.create(model=loaded.name, messages=[{"role": "user", "content": "hi"}],
                                            stream=True, max_tokens=20)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Hello 世界!"
    client.chat.completions.create(model=loaded.name, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                   extra_body={"ignore_eos": True})
    assert fake.bodies[-1]["ignore_eos"] is True and fake.bodies[-1]["stop_token_ids"] == []  # as the built-in engine
    health = requests.get(srv.url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["device"] == "vllm"
    assert "vLLM server" in generator.batching_note


def test_upstream_dying_mid_stream_is_a_503_and_health_tells(front, fake):
    srv, generator, loaded = front
    fake.mode = "die"
    r = requests.post(srv.url + "/v1/chat/completions", timeout=30,
                      json={"model": loaded.name, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "upstream_unavailable" and "stopped answering" in r.json()["error"]["message"]
    assert generator.running == 0 and generator.waiting == 0

    fake.mode, fake.healthy = "ok", False  # the upstream is down: /health says so, new requests get 503
    end = time.monotonic() + 10
    while generator.status()[0] == "ok" and time.monotonic() < end:
        time.sleep(0.1)
    health = requests.get(srv.url + "/health", timeout=10)
    assert health.status_code == 503 and health.json()["status"] == "failed", health.text
    r = requests.post(srv.url, json={"prompt": "hi"}, timeout=10)
    assert r.status_code == 503 and r.json()["status"] == 503 and "does not answer" in r.json()["error"]["message"]

    fake.healthy = True  # back: served again
    end = time.monotonic() + 10
    while generator.status()[0] != "ok" and time.monotonic() < end:
        time.sleep(0.1)
    assert requests.post(srv.url, json={"prompt": "hi"}, timeout=30).json()["response"] == "Hello 世界!"


def test_upstream_refusal_is_explained(front, fake):
    srv, generator, loaded = front
    fake.mode = "refuse"
    r = requests.post(srv.url + "/v1/chat/completions", timeout=30,
                      json={"model": loaded.name, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error"
    assert "maximum context length" in r.json()["error"]["message"]


def test_cancel_closes_the_upstream_stream(front, fake):
    srv, generator, loaded = front
    fake.release.clear()  # the upstream holds its answer
    try:
        handle = generator.submit([{"role": "user", "content": "hi"}], generator.params(max_new_tokens=4))
        handle.cancel()
        fake.release.set()
        assert handle.result().finish_reason == "cancelled"
    finally:
        fake.release.set()
    assert generator.stats["cancelled"] == 1 and generator.running == 0


def test_an_upstream_that_never_answers_is_loading_then_clear(tiny_model_dir):
    loaded = load_tokenizer_side(tiny_model_dir("qwen"))
    generator = UpstreamGenerator(loaded, f"http://127.0.0.1:{free_port()}").start(timeout=1)
    try:
        status, reason = generator.status()
        assert status == "loading" and "not answering yet" in reason
        with pytest.raises(Exception, match="not answering yet"):
            generator.submit([{"role": "user", "content": "hi"}])
    finally:
        generator.stop()


def test_qwen_v1_converted_to_qwen2_gives_the_same_logits(tiny_model_dir, tmp_path):
    """vLLM has no Qwen v1: its weights map onto Qwen2 (transformers' native class here)."""
    from transformers import AutoModelForCausalLM

    from helpers.convert import convert_qwen
    from helpers.loading import load_model

    src = tiny_model_dir("qwen")
    dst = convert_qwen(src, tmp_path / "qwen2")
    config = json.loads((dst / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and "auto_map" not in config
    original = load_model(src).model
    converted = AutoModelForCausalLM.from_pretrained(str(dst), torch_dtype=torch.float32)
    assert type(converted).__module__.startswith("transformers.models.qwen2")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.inference_mode():
        assert torch.allclose(original(input_ids=ids).logits, converted(input_ids=ids).logits, atol=1e-5)
    with pytest.raises(FileExistsError):
        convert_qwen(src, dst)
    with pytest.raises(ValueError, match="not a Qwen v1 checkpoint"):
        convert_qwen(dst, tmp_path / "again")


def test_vllm_refuses_bluelm_and_unconverted_qwen_with_what_to_do(tiny_model_dir):
    from helpers.vllm import VLLMError, vllm_args

    with pytest.raises(VLLMError, match="built-in engine"):
        vllm_args(tiny_model_dir("bluelm"), "bluelm")
    with pytest.raises(VLLMError, match="convert-qwen"):
        vllm_args(tiny_model_dir("qwen"), "qwen")
    assert "LlamaForCausalLM" in vllm_args(tiny_model_dir("xverse"), "xverse")[1]
    assert vllm_args(tiny_model_dir("internlm2"), "internlm2") == []
