"""helpers.classroom (lesson 06): the capacity arithmetic, the simulated class and the dashboard.

* The shapes: KV cache per token (Qwen-7B: 0.5 MiB in bf16; InternLM2's 8 KV heads: a quarter of
  that), parameter counts against independent figures (InternLM2-7B: 7,737,708,544 parameters as a
  loaded model reports them; MiniCPM-2B: 2.72 B, its fp32 checkpoint is 10.9 GB), and the counting
  rule against every family's stand-in (whose config names and layer layout are the vendors'): the
  parameters the model really has and ``helpers.kvcache.kv_bytes_per_token`` of its config.
* The KV budget: the same number as the engine's own ``_default_kv_budget`` for the same memory.
* Against a running stand-in server: a short simulated class gets answers, the dashboard reads
  ``/metrics`` and draws PNG frames, a burst into a small queue gets 429 with ``Retry-After``.
"""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pytest

from helpers import classroom
from helpers.classroom import GiB, MiB, SHAPES, ModelShape, capacity

from .conftest import FAMILIES, free_port


# --------------------------------------------------------------------------- shapes and capacity


def test_kv_cache_per_token_of_the_five():
    assert SHAPES["qwen-7b-chat"].kv_bytes_per_token() == 2 * 32 * 32 * 128 * 2 == MiB // 2  # 0.5 MiB in bf16
    assert SHAPES["xverse-7b-chat"].kv_bytes_per_token() == MiB // 2
    assert SHAPES["bluelm-7b-chat"].kv_bytes_per_token() == MiB // 2
    # grouped-query attention: 8 KV heads instead of 32
    assert SHAPES["internlm2-chat-7b"].kv_bytes_per_token() * 4 == SHAPES["qwen-7b-chat"].kv_bytes_per_token()
    assert SHAPES["minicpm-2b-sft"].kv_bytes_per_token() == 2 * 40 * 36 * 64 * 2 == 368_640
    assert SHAPES["qwen-7b-chat"].kv_bytes_per_token(4) == MiB  # fp32: twice


def test_parameter_counts_match_independent_figures():
    internlm2 = SHAPES["internlm2-chat-7b"]
    assert internlm2.parameters == 7_737_708_544
    assert internlm2.parameter_breakdown()["embedding"] * 2 == 758_120_448
    assert internlm2.weight_bytes() == 15_475_417_088  # bf16
    minicpm = SHAPES["minicpm-2b-sft"]
    assert minicpm.parameter_breakdown()["output"] == 0  # tied to the embedding
    assert minicpm.weight_bytes(4) / 1e9 == pytest.approx(10.9, abs=0.05)  # the fp32 checkpoint
    qwen = SHAPES["qwen-7b-chat"]
    assert qwen.parameters / 1e9 == pytest.approx(7.72, abs=0.01)
    assert qwen.weight_bytes() / 1e9 == pytest.approx(15.4, abs=0.05)  # the bf16 download


def test_every_registry_model_has_a_shape():
    from helpers.registry import MODELS

    assert set(SHAPES) == set(MODELS)
    assert all(shape.source for shape in SHAPES.values())
    assert classroom.get_shape("Qwen-7B-Chat") is SHAPES["qwen-7b-chat"]


@pytest.mark.parametrize("family", FAMILIES)
def test_counting_matches_the_standins(family, tiny_loaded):
    """The stand-ins carry each vendor's config names and layers (Qwen's c_attn bias and doubled
    intermediate_size, BlueLM's embedding LayerNorm, MiniCPM's tied output layer, InternLM2's GQA)."""
    import torch

    from helpers.kvcache import kv_bytes_per_token

    loaded = tiny_loaded(family)
    config = loaded.model.config
    shape = ModelShape.from_config(config, family)
    assert shape.parameters == sum(p.numel() for p in loaded.model.parameters())
    assert shape.kv_bytes_per_token(2) == kv_bytes_per_token(config, torch.bfloat16)
    assert shape.kv_bytes_per_token(4) == kv_bytes_per_token(config, torch.float32)


def test_from_config_reads_qwen_v1_names():
    """The Qwen-7B-Chat config.json as first published (n_embd, n_layer, n_head, kv_channels,
    ffn_hidden_size = 2 x 11008, padded vocab) gives the shape in the table."""
    published = {"model_type": "qwen", "n_embd": 4096, "n_head": 32, "n_layer": 32, "kv_channels": 128,
                 "ffn_hidden_size": 22016, "padded_vocab_size": 151936, "vocab_size": 151936,
                 "tie_word_embeddings": False}
    shape = ModelShape.from_config(published, "qwen-7b-chat")
    table = SHAPES["qwen-7b-chat"]
    assert (shape.parameters, shape.kv_bytes_per_token()) == (table.parameters, table.kv_bytes_per_token())
    later = {"model_type": "qwen", "hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 32,
             "kv_channels": 128, "intermediate_size": 22016, "vocab_size": 151936}
    assert ModelShape.from_config(later, "qwen-7b-chat").parameters == table.parameters


def test_kv_budget_is_the_engines(monkeypatch):
    """capacity() reserves what helpers.engine._default_kv_budget reserves, for the same free memory."""
    import torch

    from helpers import engine

    for name, gpu_gib in [("qwen-7b-chat", 24), ("internlm2-chat-7b", 24), ("minicpm-2b-sft", 24),
                          ("minicpm-2b-sft", 12)]:
        cap = capacity(name, gpu_gib=gpu_gib)
        shape = SHAPES[name]
        config = SimpleNamespace(num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                                 num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                                 hidden_size=shape.hidden)
        loaded = SimpleNamespace(device="cuda:0", dtype=torch.bfloat16, model=SimpleNamespace(config=config))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, c=cap: (c.free_bytes, c.gpu_bytes))
        assert engine._default_kv_budget(loaded) == cap.budget_tokens


def test_capacity_on_a_24_gib_card():
    qwen, internlm2 = capacity("qwen-7b-chat"), capacity("internlm2-chat-7b")
    assert qwen.gpu_bytes == 24 * GiB
    assert qwen.free_bytes == 24 * GiB - SHAPES["qwen-7b-chat"].weight_bytes() - classroom.RUNTIME_BYTES
    assert qwen.budget_tokens == (qwen.free_bytes - int(2.4 * GiB)) // (MiB // 2)  # 10% of 24 GiB > 1.5 GiB
    assert qwen.students == qwen.budget_tokens // 2048 == 6
    assert internlm2.students == 26  # about four times as many: a quarter of the KV cache per token
    # a context beyond the model's own length fits no student
    assert capacity("bluelm-7b-chat", context=4096).students == 0
    assert capacity("internlm2-chat-7b", context=32768).students == 1
    # a small card: the reserve is the 1.5 GiB minimum
    assert classroom.reserve_bytes(12 * GiB) == int(1.5 * GiB)
    text = classroom.capacity_table()
    assert all(name in text for name in SHAPES) and "54,783" in text


def test_capacity_figure_draws_one_line_per_model():
    fig = classroom.plot_capacity()
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert labels == list(SHAPES)
    bluelm = next(line for line in ax.get_lines() if line.get_label() == "bluelm-7b-chat")
    assert max(bluelm.get_xdata()) == 2048  # ends at its context length
    assert classroom.figure_png(fig)[:8] == b"\x89PNG\r\n\x1a\n"


def test_rates_from_samples():
    S = classroom.Sample
    samples = [S(0, 0, 0, 100, 1.0, 2, 0), S(1, 2, 1, 100, 1.0, 2, 0), S(2, 2, 3, 160, 1.6, 4, 1),
               S(3, 1, 0, 220, 1.6, 4, 3)]
    r = classroom.rates(samples, window=2.0)
    assert r["t"] == [0, 1, 2, 3] and r["running"] == [0, 2, 2, 1] and r["waiting"] == [0, 1, 3, 0]
    assert math.isnan(r["tokens_per_s"][0]) and math.isnan(r["ttft"][0])
    assert r["tokens_per_s"][1:] == [0.0, 30.0, 60.0]   # (160-100)/2, (220-100)/2
    assert math.isnan(r["ttft"][1]) and r["ttft"][2] == pytest.approx(0.3) and r["ttft"][3] == pytest.approx(0.3)
    assert r["rejected"] == [0, 0, 1, 3]


# --------------------------------------------------------------------------- against a server


KEYS = ["sk-class-group-1-" + "a" * 20, "sk-class-group-2-" + "b" * 20]


@pytest.fixture()
def displayed(monkeypatch):
    """What the dashboard hands to IPython's display (first call) and to the handle's update."""
    import IPython.display

    shown = []

    class Handle:
        def update(self, obj):
            shown.append(("update", obj))

    def display(obj, display_id=False):
        shown.append(("display", obj))
        return Handle() if display_id else None

    monkeypatch.setattr(IPython.display, "display", display)
    return shown


def test_simulated_class_and_dashboard(tiny_loaded, displayed):
    from helpers.background import start_server

    server = start_server(tiny_loaded("qwen"), host="127.0.0.1", port=free_port(), api_keys=KEYS,
                          max_batch=4, max_queue=16, max_tokens_limit=64)
    try:
        started = time.monotonic()
        report = classroom.run_class(server.url, KEYS, students=5, seconds=3, think=(0.1, 0.3), max_tokens=16,
                                     max_batch=4, max_queue=16, every=0.5)
        # a long think time does not keep a student past the end of the class
        long_thinkers = classroom.SimulatedClass(server.url, KEYS, students=2, think=(60, 60), max_tokens=4).start(2.5)
        long_thinkers.join(20)
        elapsed = time.monotonic() - started
    finally:
        server.stop()
    assert not long_thinkers.running and long_thinkers.result.answered == 2 and elapsed < 15, elapsed
    result = report.result
    assert result.answered > 5 and result.asked == result.answered and not result.failed, result
    assert result.rejected == 0 and len(result.seconds) == result.answered
    assert report.frames >= 3 and len(report.samples) >= 4
    kinds = [kind for kind, _ in displayed]
    assert kinds[0] == "display" and set(kinds[1:]) == {"update"} and len(kinds) == report.frames
    assert all(obj.format == "png" and obj.data[:4] == b"\x89PNG" for _, obj in displayed)
    # the counters saw the answered requests
    first, last = report.samples[0], report.samples[-1]
    assert last.ttft_count - first.ttft_count == result.answered
    assert last.generated > first.generated
    assert "answered" in report.summary()


def test_wrong_key_counts_as_failed(tiny_loaded):
    from helpers.background import start_server

    server = start_server(tiny_loaded("qwen"), host="127.0.0.1", port=free_port(), api_keys=KEYS)
    try:
        simulated = classroom.SimulatedClass(server.url, ["sk-not-a-key-" + "x" * 20], students=2, think=(0.1, 0.2),
                                             model="qwen-7b-chat").start(1.0)
        result = simulated.join(30)
    finally:
        server.stop()
    assert result.answered == 0 and result.failed[401] == result.asked > 0
    assert "invalid_api_key" in result.errors[0]


def test_a_full_queue_answers_429_with_retry_after(tiny_loaded):
    from helpers.background import start_server

    server = start_server(tiny_loaded("qwen"), host="127.0.0.1", port=free_port(), api_keys=KEYS,
                          max_batch=1, max_queue=1)
    try:
        responses = classroom.burst(server.url, KEYS[0], 10, model="qwen-7b-chat", max_tokens=200)
        from helpers.client import metrics

        rejected = metrics(server.url)["helpers:request_rejected_total"]
    finally:
        server.stop()
    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 429} and codes.count(200) >= 2, codes
    assert rejected == codes.count(429)
    full = next(r for r in responses if r.status_code == 429)
    assert full.headers["Retry-After"] == "1" and full.json()["error"]["code"] == "queue_full"
