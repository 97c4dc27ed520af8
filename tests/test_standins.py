"""Each stand-in behaves like its vendor's remote code where an engine touches the model.

The facts below are read from the vendors' own modeling files (ENGINEERING.md §2 lists them): the
``forward`` keyword arguments, where rotary positions come from, the KV-cache type and layout, the
gap between the output layer and the tokenizer, and what the tokenizer does with an id in that gap.
A stand-in that drifted back to a transformers-native class (which takes ``position_ids`` and one
cache layout) fails here, before a test suite built on it could stay green while the real model
fails on every request.
"""

from __future__ import annotations

import inspect
import json
import warnings

import pytest

torch = pytest.importorskip("torch")

from helpers.kvcache import Rotary  # noqa: E402

# The vendors' forward signatures, exactly (keyword arguments after self).
LLAMA_STYLE = ("input_ids", "attention_mask", "position_ids", "past_key_values", "inputs_embeds", "labels",
               "use_cache", "output_attentions", "output_hidden_states", "return_dict")
FACTS = {
    "qwen": {
        "class": "QWenLMHeadModel",
        "forward": ("input_ids", "past_key_values", "attention_mask", "token_type_ids", "position_ids",
                    "head_mask", "inputs_embeds", "encoder_hidden_states", "encoder_attention_mask", "labels",
                    "use_cache", "output_attentions", "output_hidden_states", "return_dict"),
        "position_ids": "ignored", "positions_from": "cache length", "cache": "tuple", "seq_dim": 1,
        "vocab_gap": True, "gap_decode": "dropped",
        "weights": ("transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
                    "transformer.h.0.attn.c_proj.weight", "transformer.h.0.mlp.w1.weight",
                    "transformer.h.0.mlp.w2.weight", "transformer.h.0.mlp.c_proj.weight", "transformer.ln_f.weight",
                    "lm_head.weight"),
    },
    "bluelm": {
        "class": "BlueLMForCausalLM",
        "forward": ("input_ids", "attention_mask", "past_key_values", "inputs_embeds", "labels", "use_cache",
                    "output_attentions", "output_hidden_states", "return_dict"),
        "position_ids": "refused", "positions_from": "cache length", "cache": "tuple", "seq_dim": 1,
        "vocab_gap": True, "gap_decode": "raises",
        "weights": ("model.embed_tokens.weight", "model.embed_layer_norm.weight", "model.embed_layer_norm.bias",
                    "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                    "model.norm.weight", "lm_head.weight"),
    },
    "internlm2": {
        "class": "InternLM2ForCausalLM", "forward": LLAMA_STYLE,
        "position_ids": "used", "positions_from": "position_ids", "cache": "tuple", "seq_dim": 2,
        "vocab_gap": False, "kv_heads_fewer": True,
        "weights": ("model.tok_embeddings.weight", "model.layers.0.attention.wqkv.weight",
                    "model.layers.0.attention.wo.weight", "model.layers.0.feed_forward.w1.weight",
                    "model.layers.0.feed_forward.w2.weight", "model.layers.0.feed_forward.w3.weight",
                    "model.layers.0.attention_norm.weight", "model.layers.0.ffn_norm.weight", "model.norm.weight",
                    "output.weight"),
    },
    "xverse": {
        "class": "XverseForCausalLM", "forward": LLAMA_STYLE,
        "position_ids": "used", "positions_from": "position_ids", "cache": "tuple", "seq_dim": 2,
        "vocab_gap": False,
        "weights": ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                    "model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                    "model.layers.0.input_layernorm.weight", "model.norm.weight", "lm_head.weight"),
    },
    "minicpm": {
        "class": "MiniCPMForCausalLM", "forward": LLAMA_STYLE,
        "position_ids": "used", "positions_from": "position_ids", "cache": "dynamic", "seq_dim": 2,
        "vocab_gap": False,
        "weights": ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                    "model.layers.0.mlp.gate_proj.weight", "model.norm.weight"),
    },
}
FAMILIES = list(FACTS)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture()
def standin(tiny_loaded, family):
    return tiny_loaded(family)


def run(model, ids, *, past=None, mask=None, positions=None, **extra):
    kwargs = {"input_ids": torch.tensor(ids), "past_key_values": past, "use_cache": True, "return_dict": True}
    if mask is not None:
        kwargs["attention_mask"] = torch.tensor(mask)
    if positions is not None:
        kwargs["position_ids"] = torch.tensor(positions)
    with torch.inference_mode():
        return model(**kwargs, **extra)


def keys_of(past, layer=0):
    if hasattr(past, "key_cache"):
        return past.key_cache[layer]
    return past[layer][0]


def test_loaded_as_remote_code_through_auto_map(standin, family, tiny_model_dir):
    folder = tiny_model_dir(family)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert config["architectures"] == [FACTS[family]["class"]]
    module, _, name = config["auto_map"]["AutoModelForCausalLM"].partition(".")
    assert name == FACTS[family]["class"] and (folder / f"{module}.py").is_file()
    model = standin.model
    assert type(model).__name__ == FACTS[family]["class"]
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__  # not a native class


def test_forward_takes_the_vendors_keyword_arguments(standin, family):
    params = list(inspect.signature(type(standin.model).forward).parameters)
    assert tuple(params[1:]) == FACTS[family]["forward"]


def test_position_ids_refused_ignored_or_used(standin, family):
    model = standin.model
    ids = [[5, 6, 7, 8]]
    plain = run(model, ids).logits
    kind = FACTS[family]["position_ids"]
    if kind == "refused":
        with pytest.raises(TypeError, match="position_ids"):
            run(model, ids, positions=[[0, 1, 2, 3]])
        return
    # not a uniform shift (RoPE would not see that); within the cache length (the vendors' rotary
    # tables end there: a larger position raises IndexError in their code too)
    jumped = run(model, ids, positions=[[0, 1, 3, 3]]).logits
    if kind == "ignored":
        assert torch.equal(plain, jumped)
    else:
        assert not torch.allclose(plain[0, -1], jumped[0, -1], atol=1e-4)
        assert torch.allclose(plain, run(model, ids, positions=[[0, 1, 2, 3]]).logits, atol=1e-5)


def test_rotary_positions_come_from_where_the_vendor_takes_them(standin, family):
    """A left-padded row: with positions from the cache length, the row's keys sit one rotation
    further per padding column (what the engine re-rotates); with position_ids, they do not move."""
    model = standin.model
    solo = run(model, [[5, 6, 7]])
    positions = None if FACTS[family]["position_ids"] == "refused" else [[0, 0, 1, 2]]
    padded = run(model, [[0, 5, 6, 7]], mask=[[0, 1, 1, 1]], positions=positions)
    dim = FACTS[family]["seq_dim"]
    k_solo = keys_of(solo.past_key_values).narrow(dim, 0, 3)
    k_padded = keys_of(padded.past_key_values).narrow(dim, 1, 3)
    rotary = Rotary.from_model(model)
    if FACTS[family]["positions_from"] == "cache length":
        assert rotary is not None, "the engine re-rotates with the model's inv_freq: keep a single one"
        assert not torch.allclose(k_solo, k_padded, atol=1e-5)
        assert torch.allclose(rotary.shift(k_solo, 1), k_padded, atol=1e-5)
    else:
        assert torch.allclose(k_solo, k_padded, atol=1e-5)
    assert torch.allclose(solo.logits[0, -1], padded.logits[0, -1], atol=1e-4)  # the answer does not change


def test_cache_type_and_layout(standin, family):
    model, config = standin.model, standin.model.config
    out = run(model, [[5, 6, 7, 8, 9]])
    past = out.past_key_values
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = config.hidden_size // heads
    if FACTS[family].get("kv_heads_fewer"):
        assert kv_heads < heads
    key = keys_of(past)
    expected = [1, kv_heads, 5, head_dim] if FACTS[family]["seq_dim"] == 2 else [1, 5, kv_heads, head_dim]
    assert list(key.shape) == expected
    assert len(past) == config.num_hidden_layers
    if FACTS[family]["cache"] == "tuple":
        assert isinstance(past, tuple) and isinstance(past[0], tuple)
        step = run(model, [[10]], past=past)
        assert isinstance(step.past_key_values, tuple)
    else:  # MiniCPM: a transformers Cache in, the same Cache out; it asks the cache for its usable length
        from transformers import DynamicCache

        calls = []
        cache = DynamicCache.from_legacy_cache(past) if isinstance(past, tuple) else past
        original = DynamicCache.get_usable_length

        def spy(self, *args, **kwargs):
            calls.append("get_usable_length")
            return original(self, *args, **kwargs)

        DynamicCache.get_usable_length = spy
        try:
            step = run(model, [[10]], past=cache)
        finally:
            DynamicCache.get_usable_length = original
        assert isinstance(step.past_key_values, DynamicCache) and calls
        assert keys_of(step.past_key_values).shape[2] == 6
        # generate() goes through prepare_inputs_for_generation, which asks the cache for
        # get_max_length(): removed in transformers 4.49, the call that breaks the real MiniCPM there
        asked = []
        max_length = DynamicCache.get_max_length
        DynamicCache.get_max_length = lambda self: asked.append(1) or max_length(self)
        try:
            ids = torch.tensor([[5, 6, 7]])
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the generation config's sampling settings, unused here
                model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=2,
                               pad_token_id=0)
        finally:
            DynamicCache.get_max_length = max_length
        assert asked


def test_incremental_decoding_equals_a_full_forward(standin):
    model = standin.model
    prefix = run(model, [[5, 6, 7]])
    step = run(model, [[8]], past=prefix.past_key_values)
    full = run(model, [[5, 6, 7, 8]])
    assert torch.allclose(step.logits[0, -1], full.logits[0, -1], atol=1e-4)


def test_output_layer_and_tokenizer_sizes(standin, family):
    """Qwen-7B-Chat: 151,936 output ids for 151,851 in the tokenizer; BlueLM-7B-Chat: 100,096 for
    100,004; the others equal. Decoding an id in the gap: BlueLM's SentencePiece raises, Qwen's
    decoder drops it."""
    config, tokenizer = standin.model.config, standin.tokenizer
    out = run(standin.model, [[5]]).logits
    assert out.shape[-1] == config.vocab_size
    if not FACTS[family]["vocab_gap"]:
        assert config.vocab_size == len(tokenizer)
        return
    assert config.vocab_size > len(tokenizer) and config.vocab_size % 128 == 0
    beyond = len(tokenizer)
    if FACTS[family]["gap_decode"] == "raises":
        with pytest.raises(IndexError):
            tokenizer.decode([5, beyond])
    else:
        assert tokenizer.decode([5, beyond]) == tokenizer.decode([5])


def test_weight_names_are_the_vendors(standin, family):
    names = set(standin.model.state_dict())
    missing = [n for n in FACTS[family]["weights"] if n not in names]
    assert not missing, f"not named as in the vendor's checkpoint: {missing}"


def test_head_size_fits_vllm_cpu_attention(standin):
    config = standin.model.config
    assert config.hidden_size // config.num_attention_heads >= 32


def test_generate_works_like_the_vendors_code(standin):
    """transformers' generate() on 4.48 with the vendor-style cache handling (greedy, 6 tokens)."""
    ids = torch.tensor([[5, 6, 7]])
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        out = standin.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                                     min_new_tokens=6, pad_token_id=0, repetition_penalty=1.0)
    assert out.shape == (1, 9)
    # greedy by hand with the cache gives the same tokens
    past, token, mine = None, ids, []
    for _ in range(6):
        step = run(standin.model, token.tolist(), past=past)
        past = step.past_key_values
        token = step.logits[:, -1:].argmax(-1)
        mine.append(int(token))
    assert out[0, 3:].tolist() == mine
