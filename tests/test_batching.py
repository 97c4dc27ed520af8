"""Continuous batching: many requests generated together give what each gives alone, on every
family's stand-in and on fakes with the cache layouts the stand-ins cannot show."""

import time

import pytest
import requests
import torch

from helpers.background import start_server
from helpers.engine import Engine, SamplingParams

from .conftest import FAMILIES, free_port

GREEDY = SamplingParams(max_new_tokens=16, temperature=0)
PROMPTS = [f"问题 {i}: " + "hello world " * i for i in range(6)]


def _msgs(text):
    return [{"role": "user", "content": text}]


def _solo(loaded, prompts, params=GREEDY):
    engine = Engine(loaded, max_batch=1).start()
    try:
        return [engine.generate(_msgs(p), params).text for p in prompts]
    finally:
        engine.stop()


def _together(engine, prompts, params=GREEDY):
    handles = [engine.submit(_msgs(p), params) for p in prompts]
    return [h.result().text for h in handles]


PENALIZED = SamplingParams(max_new_tokens=16, temperature=0, repetition_penalty=1.3)


@pytest.mark.parametrize("params", [GREEDY, PENALIZED], ids=["greedy", "repetition-penalty"])
@pytest.mark.parametrize("family", FAMILIES)
def test_batched_results_equal_solo_results(tiny_loaded, family, params):
    loaded = tiny_loaded(family)
    engine = Engine(loaded, max_batch=8).start()
    try:
        assert engine.max_batch == 8, engine.batching_note  # the self-check let batching on
        together = _together(engine, PROMPTS, params)
        assert engine.stats["peak_batch"] > 1  # they really ran together
    finally:
        engine.stop()
    assert together == _solo(loaded, PROMPTS, params)


@pytest.mark.parametrize("penalty", [1.0, 1.3])
@pytest.mark.parametrize("family", FAMILIES)
def test_engine_matches_transformers_generate(tiny_loaded, family, penalty):
    loaded = tiny_loaded(family)
    ids = loaded.chat_format.encode(loaded.tokenizer, _msgs(PROMPTS[3]))
    # the engine never picks an id the tokenizer cannot decode (Qwen and BlueLM have such ids): nor may generate()
    gap = list(range(len(loaded.tokenizer), loaded.model.config.vocab_size)) or None
    out = loaded.model.generate(torch.tensor([ids]), attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                                max_new_tokens=16, do_sample=False, repetition_penalty=penalty, top_p=1.0,
                                top_k=50, temperature=1.0, eos_token_id=loaded.stop_ids, pad_token_id=loaded.pad_id,
                                suppress_tokens=gap)
    new = out[0, len(ids):].tolist()
    params = SamplingParams(max_new_tokens=16, temperature=0, repetition_penalty=penalty)
    engine = Engine(loaded).start()
    try:
        handle = engine.submit(_msgs(PROMPTS[3]), params)
        handle.result()
    finally:
        engine.stop()
    # token ids: a byte-fallback run with an invalid UTF-8 byte (random weights make them) decodes to
    # U+FFFD for every byte in one decode() call but keeps its valid bytes when streamed
    assert handle.output_ids == new, (new, handle.output_ids)


@pytest.mark.parametrize("running, joining", [(1.0, 1.0), (1.0, 1.3), (1.3, 1.0)],
                         ids=["plain", "penalized-joins", "plain-joins"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_request_joining_mid_generation_gets_its_solo_answer(tiny_loaded, family, running, joining):
    # with and without a repetition penalty on either side: the engine tracks the tokens each row
    # has seen only while a running request has a penalty
    loaded = tiny_loaded(family)
    first_params = SamplingParams(max_new_tokens=120, temperature=0, repetition_penalty=running)
    second_params = SamplingParams(max_new_tokens=16, temperature=0, repetition_penalty=joining)
    engine = Engine(loaded, max_batch=4).start()
    try:
        first = engine.submit(_msgs(PROMPTS[5]), first_params)
        events = iter(first)
        head = next(events)  # the first request is generating
        second = engine.submit(_msgs(PROMPTS[1]), second_params).result().text
        first_text = head.text + "".join(e.text for e in events)
        assert engine.stats["peak_batch"] == 2
    finally:
        engine.stop()
    assert second == _solo(loaded, [PROMPTS[1]], second_params)[0]
    assert first.finish_reason in ("stop", "length")
    assert first_text == _solo(loaded, [PROMPTS[5]], first_params)[0]


def test_sampling_with_a_seed_does_not_depend_on_the_batch(tiny_loaded):
    loaded = tiny_loaded("xverse")
    params = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, top_k=40, seed=7,
                            repetition_penalty=1.1)
    engine = Engine(loaded, max_batch=8).start()
    try:
        together = _together(engine, PROMPTS, params)
    finally:
        engine.stop()
    assert together == _solo(loaded, PROMPTS, params)


@pytest.mark.parametrize("family", FAMILIES)
def test_cancel_frees_the_slot_for_a_waiting_request(tiny_loaded, family):
    loaded = tiny_loaded(family)
    engine = Engine(loaded, max_batch=1).start()
    try:
        most = loaded.context_length // 2  # far more than it gets to before the cancel
        long = engine.submit(_msgs("a"), SamplingParams(max_new_tokens=most, temperature=0))
        waiting = engine.submit(_msgs("b"), GREEDY)
        next(iter(long))
        assert engine.running == 1 and engine.waiting == 1
        long.cancel()
        result = waiting.result()  # got the slot
        assert result.finish_reason in ("stop", "length")
        assert long.finish_reason == "cancelled" and long.completion_tokens < most
        assert engine.running == 0
    finally:
        engine.stop()


def test_kv_budget_queues_what_does_not_fit_and_refuses_what_never_fits(tiny_loaded):
    from helpers.formats import ChatFormatError

    loaded = tiny_loaded("qwen")
    engine = Engine(loaded, max_batch=8, kv_budget_tokens=120).start()
    try:
        params = SamplingParams(max_new_tokens=40, temperature=0)  # ~30 prompt + 40 new: one fits, two do not
        results = _together(engine, PROMPTS[:3], params)
        assert engine.stats["peak_batch"] == 1
        assert results == _solo(loaded, PROMPTS[:3], params)
        with pytest.raises(ChatFormatError, match="KV cache"):
            engine.submit(_msgs("x"), SamplingParams(max_new_tokens=200))
    finally:
        engine.stop()


@pytest.mark.parametrize("family", FAMILIES)
def test_full_queue_answers_429_with_retry_after_and_health_still_answers(tiny_loaded, family):
    loaded = tiny_loaded(family)
    engine = Engine(loaded, max_batch=1, max_queue=1).start()
    server = start_server(engine, host="127.0.0.1", port=free_port())
    try:
        long = engine.submit(_msgs("a"), SamplingParams(max_new_tokens=1500, temperature=0))
        next(iter(long))
        engine.submit(_msgs("b"), SamplingParams(max_new_tokens=1500, temperature=0))  # fills the queue
        r = requests.post(server.url + "/v1/chat/completions", json={
            "model": loaded.name, "messages": _msgs("c"), "max_tokens": 4})
        assert r.status_code == 429
        assert int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["code"] == "queue_full"
        seed = requests.post(server.url, json={"prompt": "c"})
        assert seed.status_code == 429 and seed.json()["status"] == 429
        t0 = time.perf_counter()
        assert requests.get(server.url + "/health", timeout=5).status_code == 200
        assert time.perf_counter() - t0 < 2
    finally:
        server.stop()
        engine.stop()


# --------------------------------------------------------------------------- other cache layouts


@pytest.mark.parametrize("family", ["qwen", "bluelm"])
def test_models_that_take_positions_from_the_cache_length_are_batched_with_rerotated_keys(tiny_loaded, family):
    """Qwen v1 and BlueLM rotate by the cache length (padding included; BlueLM's forward does not
    even take position_ids) and keep legacy tuples with the sequence on dim 1: rows that move when
    others join or leave get their cached keys re-rotated, and every answer equals its solo run."""
    loaded = tiny_loaded(family)
    engine = Engine(loaded, max_batch=8).start()
    try:
        assert engine.max_batch == 8 and "re-rotated" in engine.batching_note, engine.batching_note
        long_params = SamplingParams(max_new_tokens=40, temperature=0)
        first = engine.submit(_msgs(PROMPTS[5]), long_params)  # the longest prompt: others get padded
        events = iter(first)
        head = next(events).text  # it is generating
        together = _together(engine, PROMPTS[:5])  # they join, then leave before it (trimming)
        first_text = head + "".join(e.text for e in events)
        assert engine.stats["peak_batch"] > 2
        assert engine._seq_dim == 1
    finally:
        engine.stop()
    assert together == _solo(loaded, PROMPTS[:5])
    assert first_text == _solo(loaded, [PROMPTS[5]], long_params)[0]


class _IgnoresMask(torch.nn.Module):
    """A model whose code drops the padding mask: batched answers would differ from solo ones."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    @property
    def device(self):
        return self.inner.device

    def forward(self, **kwargs):
        kwargs["attention_mask"] = None
        return self.inner(**kwargs)


def test_model_that_ignores_the_padding_mask_is_served_one_at_a_time(tiny_loaded):
    from dataclasses import replace

    loaded = replace(tiny_loaded("xverse"), model=_IgnoresMask(tiny_loaded("xverse").model))
    engine = Engine(loaded, max_batch=8).start()
    try:
        assert engine.max_batch == 1
        assert "differ" in engine.batching_note
        together = _together(engine, PROMPTS[:3])
    finally:
        engine.stop()
    assert together == _solo(tiny_loaded("xverse"), PROMPTS[:3])


def test_kv_bytes_per_token_for_a_7b_model():
    from types import SimpleNamespace

    from helpers.kvcache import kv_bytes_per_token

    qwen7b = SimpleNamespace(num_hidden_layers=32, num_attention_heads=32, hidden_size=4096)
    assert kv_bytes_per_token(qwen7b, torch.float16) == 512 * 1024  # 0.5 MB per token
    gqa = SimpleNamespace(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_size=4096)
    assert kv_bytes_per_token(gqa, torch.bfloat16) == 128 * 1024


def test_rotary_shift_moves_keys_by_positions():
    """Rotary.shift against transformers' own rotary embedding (Llama's rotate-half form, which
    Qwen v1 and BlueLM use too): keys at positions p..p+4 shifted by n are the keys at p+n..p+n+4."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from helpers.kvcache import Rotary

    head_dim = 32
    embedding = LlamaRotaryEmbedding(config=LlamaConfig(hidden_size=64, num_attention_heads=2, rope_theta=10000.0))
    rotary = Rotary(embedding.inv_freq)
    assert rotary.dim == head_dim
    keys = torch.randn(2, 3, 5, head_dim)  # [batch, heads, seq, head_dim]

    def at(start):  # the keys rotated as if they sat at positions start .. start + 4
        positions = torch.arange(start, start + 5).unsqueeze(0).expand(2, -1)
        cos, sin = embedding(keys, positions)
        return apply_rotary_pos_emb(keys, keys, cos, sin)[1]

    assert torch.allclose(rotary.shift(at(2), 7), at(9), atol=1e-5)
    assert torch.allclose(rotary.shift(at(9), -7), at(2), atol=1e-5)
    assert torch.allclose(rotary.shift(at(2), 0), at(2))
