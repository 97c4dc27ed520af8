"""The real vLLM (CPU build, its own venv made by scripts/setup_vllm.sh) behind our front.

Served stand-ins: InternLM2 and MiniCPM (native in vLLM), Qwen v1 through the conversion to Qwen2,
XVERSE as Llama. Through our server: the seed API and the openai client (plain and streamed) answer; vLLM gets
our prompt ids, id for id, and its greedy tokens equal our built-in engine's on the same stand-in
(which equal the stand-in's own remote code: tests/test_batching.py); a stop id ends the answer;
vLLM dying mid-request or not starting gives a clear 503 / error, never a hang.

Each vLLM start takes about a minute on these CPUs: the servers are module-scoped. Without the vLLM
environment the tests skip with what to run (in CI, where scripts/test.sh installs it, they fail).
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import requests
from openai import OpenAI

from helpers.background import start_server
from helpers.engine import Engine, SamplingParams
from helpers.loading import load_model, load_tokenizer_side
from helpers.upstream import UpstreamGenerator
from helpers.vllm import VLLMError, VLLMServer

from .conftest import free_port, vllm_python_or_skip

QUESTION = [{"role": "user", "content": "Tell me a joke, please."}]
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB of KV cache


@pytest.fixture(scope="module")
def python():
    return vllm_python_or_skip()


def _serve(path, family, python, name):
    """vLLM for the folder ``path``, and our front (an UpstreamGenerator) in front of it."""
    loaded = load_tokenizer_side(path, family=family)
    process = VLLMServer(path, family, served_name=name, python=python, max_model_len=1024, dtype="float32",
                         env=CPU_ENV, extra=["--enforce-eager"], log=lambda line: None)
    process.start(timeout=600)
    generator = UpstreamGenerator(loaded, process.url, process=process).start()
    server = start_server(generator, host="127.0.0.1", port=free_port())
    return loaded, process, generator, server


def _greedy_builtin(folder, n=12):
    loaded = load_model(folder)
    engine = Engine(loaded).start()
    try:
        handle = engine.submit(QUESTION, SamplingParams(max_new_tokens=n, temperature=0))
        handle.result()
        return list(handle.output_ids)
    finally:
        engine.stop()


def _greedy_vllm(process, loaded, n=12, stop_ids=None):
    """vLLM's own greedy tokens for our prompt ids (its /v1/completions, token ids back)."""
    ids = loaded.chat_format.encode(loaded.tokenizer, QUESTION)
    body = {"model": process.served_name, "prompt": ids, "max_tokens": n, "temperature": 0,
            "stop_token_ids": loaded.stop_ids if stop_ids is None else stop_ids, "skip_special_tokens": False,
            "return_token_ids": True}
    r = requests.post(process.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return r.json(), choice


@pytest.fixture(scope="module")
def internlm2(python, tiny_model_dir):
    loaded, process, generator, server = _serve(tiny_model_dir("internlm2"), "internlm2", python, "internlm2-chat-7b")
    yield loaded, process, generator, server
    server.stop()
    generator.stop()


def test_seed_api_and_openai_client_through_vllm(internlm2):
    loaded, process, generator, server = internlm2
    r = requests.post(server.url, json={"prompt": "你好", "history": [], "max_length": 8}, timeout=120)
    assert r.status_code == 200 and r.json()["status"] == 200 and r.json()["response"], r.text
    client = OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(model=loaded.name, messages=QUESTION, max_tokens=8, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 8
    stream = client.chat.completions.create(model=loaded.name, messages=QUESTION, max_tokens=8, temperature=0,
                                            stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == reply.choices[0].message.content
    health = requests.get(server.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["device"] == "vllm"


def test_vllm_gets_our_prompt_ids_and_its_greedy_tokens_equal_the_builtin_engine(internlm2, tiny_model_dir):
    loaded, process, generator, server = internlm2
    ours = loaded.chat_format.encode(loaded.tokenizer, QUESTION)
    body, choice = _greedy_vllm(process, loaded)
    assert body["usage"]["prompt_tokens"] == len(ours)
    assert choice["prompt_token_ids"] == ours  # vLLM's own record of the prompt it ran
    builtin = _greedy_builtin(tiny_model_dir("internlm2"))
    assert len(choice["token_ids"]) >= 4 and choice["token_ids"] == builtin[: len(choice["token_ids"])]


def test_a_stop_id_ends_the_answer(internlm2):
    loaded, process, generator, server = internlm2
    _, free = _greedy_vllm(process, loaded, stop_ids=[])
    tokens = free["token_ids"]
    assert len(tokens) >= 4
    third = tokens[2]
    original = list(loaded.stop_ids)
    loaded.stop_ids = original + [third]  # as if the family's stop ids held it
    try:
        handle = generator.submit(QUESTION, SamplingParams(max_new_tokens=12, temperature=0))
        result = handle.result()
    finally:
        loaded.stop_ids = original
    assert result.finish_reason == "stop" and result.completion_tokens <= 3


def test_qwen_v1_served_by_vllm_through_the_conversion(python, tiny_model_dir, tmp_path_factory):
    from helpers.convert import convert_qwen

    folder = convert_qwen(tiny_model_dir("qwen"), tmp_path_factory.mktemp("qwen") / "qwen2")
    loaded, process, generator, server = _serve(folder, "qwen", python, "qwen-7b-chat")
    try:
        _, choice = _greedy_vllm(process, loaded)
        builtin = _greedy_builtin(tiny_model_dir("qwen"))  # the Qwen v1 remote code, not the converted copy
        assert len(choice["token_ids"]) >= 4 and choice["token_ids"] == builtin[: len(choice["token_ids"])]
        client = OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        reply = client.chat.completions.create(model=loaded.name, messages=QUESTION, max_tokens=6, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length")
    finally:
        server.stop()
        generator.stop()


def test_xverse_served_as_llama_gives_the_remote_codes_greedy_tokens(python, tiny_model_dir):
    """vLLM dropped XverseForCausalLM; its layers are Llama's (--hf-overrides architectures)."""
    loaded, process, generator, server = _serve(tiny_model_dir("xverse"), "xverse", python, "xverse-7b-chat")
    try:
        assert "LlamaForCausalLM" in " ".join(process.command())
        _, choice = _greedy_vllm(process, loaded)
        builtin = _greedy_builtin(tiny_model_dir("xverse"))
        assert len(choice["token_ids"]) >= 4 and choice["token_ids"] == builtin[: len(choice["token_ids"])]
    finally:
        server.stop()
        generator.stop()


def test_vllm_dying_gives_a_clear_503_not_a_hang(python, tiny_model_dir):
    loaded, process, generator, server = _serve(tiny_model_dir("minicpm"), "minicpm", python, "minicpm-2b-sft")
    try:
        _, choice = _greedy_vllm(process, loaded)  # native MiniCPM: the same greedy tokens first
        builtin = _greedy_builtin(tiny_model_dir("minicpm"))
        assert len(choice["token_ids"]) >= 4 and choice["token_ids"] == builtin[: len(choice["token_ids"])]
        client = OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        stream = client.chat.completions.create(model=loaded.name, messages=QUESTION, max_tokens=800,
                                                extra_body={"ignore_eos": True}, stream=True)
        next(iter(stream))  # it is generating
        process.proc.kill()
        started = time.monotonic()
        with pytest.raises(Exception):
            for _ in stream:
                pass
        assert time.monotonic() - started < 30
        deadline = time.monotonic() + 30
        while requests.get(server.url + "/health", timeout=10).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        health = requests.get(server.url + "/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert "exited" in health.json()["reason"]
        r = requests.post(server.url, json={"prompt": "hi"}, timeout=10)
        assert r.status_code == 503 and "exited" in r.json()["error"]["message"]
    finally:
        server.stop()
        generator.stop()


def test_vllm_that_cannot_start_says_why(python, tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["NoSuchModel"], "model_type": "internlm2"}')
    process = VLLMServer(tmp_path, "internlm2", served_name="x", python=python, env=CPU_ENV, log=lambda line: None)
    with pytest.raises(VLLMError, match="exited with code"):
        process.start(timeout=300)


def test_serve_refuses_bluelm_on_vllm_and_says_what_to_do(python, tiny_model_dir):
    out = subprocess.run([sys.executable, "-m", "helpers", "serve", "--model", str(tiny_model_dir("bluelm")),
                          "--engine", "vllm", "--vllm-python", python, "--host", "127.0.0.1",
                          "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "built-in engine" in out.stderr
