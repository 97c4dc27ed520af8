"""Tiny random-weight stand-ins (helpers.tiny): offline, deterministic, loadable like the real folders."""

from __future__ import annotations

import json
import time
import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.dynamic_module_utils import get_class_from_dynamic_module  # noqa: E402

from helpers.tiny import BUILDER_VERSION, CORPUS, FAMILIES, MARKER_FILE, build_tiny, is_tiny, read_marker  # noqa: E402

torch.set_num_threads(1)

MIXED = "Hello 世界! 你好，我是 tiny model 123。\n- **Markdown** `code` 3.14 🙂"
# exact round trips the slow SentencePiece tokenizers (legacy=False) also get right
SPACEY = (" one leading space", "  two leading,  double  inner and trailing  ", "\n\n换行\t和制表符 x")

# Strings that must be single tokens (and whether the tokenizer treats them as special tokens).
SINGLE = {
    "qwen": {"<|endoftext|>": True, "<|im_start|>": True, "<|im_end|>": True},
    "internlm2": {"<s>": True, "</s>": True, "<|im_start|>": True, "<|im_end|>": True, "<|action_start|>": True,
                  "<|action_end|>": True, "<|interpreter|>": True, "<|plugin|>": True},
    "xverse": {"<unk>": True, "<pad>": True, "<|startoftext|>": True, "<|endoftext|>": True},
    "bluelm": {"<s>": True, "</s>": True, "[|Human|]:": False, "[|AI|]:": False, "[SEH]": False, "[SEA]": False},
    "minicpm": {"<s>": True, "</s>": True, "<用户>": False, "<AI>": False},
}

PROMPTS = {
    "qwen": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
            "<|im_start|>assistant\n",
    "internlm2": "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n",
    "xverse": "Human: 你好\n\nAssistant: ",
    "bluelm": "[|Human|]:你好[|AI|]:",
    "minicpm": "<用户>你好<AI>",
}


def load_bluelm_tokenizer(path):
    """The loader's workaround: set ``sp_model`` on the instance before the vendor ``__init__`` runs."""
    cls = get_class_from_dynamic_module("tokenization_bluelm.BlueLMTokenizer", str(path))
    original = cls.__init__

    def patched_init(self, vocab_file, *args, **kwargs):
        self.sp_model = spm.SentencePieceProcessor(**(kwargs.get("sp_model_kwargs") or {}))
        self.sp_model.Load(vocab_file)
        original(self, vocab_file, *args, **kwargs)

    cls.__init__ = patched_init
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)
    finally:
        cls.__init__ = original


def load_tokenizer(family, path, **kwargs):
    if family == "bluelm":
        return load_bluelm_tokenizer(path)
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=True, **kwargs)


def greedy(model, ids, n=8):
    input_ids = torch.tensor([ids])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module", params=FAMILIES)
def built(request, tmp_path_factory):
    """Two independent builds of one family: (family, path_a, path_b)."""
    family = request.param
    base = tmp_path_factory.mktemp(f"tiny_{family}")
    t0 = time.perf_counter()
    a = build_tiny(family, base / f"{family}_a")
    t1 = time.perf_counter()
    b = build_tiny(family, base / f"{family}_b")
    t2 = time.perf_counter()
    print(f"\n[tiny] {family}: built in {t1 - t0:.2f} s and {t2 - t1:.2f} s")
    return family, a, b


@pytest.fixture(scope="module")
def loaded(built):
    family, a, b = built
    return family, load_tokenizer(family, a), AutoModelForCausalLM.from_pretrained(str(a), trust_remote_code=True)


def test_corpus_is_builtin_and_mixed():
    assert 60 <= len(CORPUS) <= 120
    assert any("\u4e00" <= ch <= "\u9fff" for ch in "".join(CORPUS))
    assert any("```" in s for s in CORPUS) and any(s.startswith("#") for s in CORPUS)


def test_marker_and_is_tiny(built, tmp_path):
    family, a, _ = built
    assert is_tiny(a)
    marker = json.loads((a / MARKER_FILE).read_text(encoding="utf-8"))
    assert marker["family"] == family and marker["builder_version"] == BUILDER_VERSION
    assert "random weights" in marker["note"]
    assert read_marker(a)["family"] == family
    assert not is_tiny(tmp_path) and not is_tiny(tmp_path / "missing")
    (tmp_path / MARKER_FILE).write_text("not json", encoding="utf-8")
    assert not is_tiny(tmp_path)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"):
        assert (a / name).is_file(), name
    assert not list(a.parent.glob(".*building*")), "temporary build folders left behind"


def test_existing_build_is_reused_unless_overwrite(built):
    family, a, _ = built
    stamp = (a / "model.safetensors").stat().st_mtime_ns
    assert build_tiny(family, a) == a
    assert (a / "model.safetensors").stat().st_mtime_ns == stamp
    other = next(f for f in FAMILIES if f != family)
    # a stand-in of another family in the folder is replaced (on a copy, to keep `a` intact)
    c = a.parent / f"{family}_c"
    build_tiny(other, c)
    assert read_marker(build_tiny(family, c))["family"] == family
    assert build_tiny(family, c, overwrite=True) == c and read_marker(c)["family"] == family


def test_refuses_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(FileExistsError):
        build_tiny("xverse", tmp_path)
    with pytest.raises(ValueError):
        build_tiny("llama", tmp_path / "x")


def test_builds_are_byte_identical(built):
    _, a, b = built
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs between two builds"


def test_special_strings_are_single_ids(built, loaded):
    family, tok, _ = loaded
    marker_ids = read_marker(built[1])["special_token_ids"]
    for text, special in SINGLE[family].items():
        ids = tok.encode(text, add_special_tokens=False)
        if len(ids) == 2 and tok.convert_ids_to_tokens(ids[0]) == "\u2581":
            ids = ids[1:]  # SentencePiece dummy-prefix space in front of a piece at the start (bluelm)
        assert len(ids) == 1, (text, ids, tok.convert_ids_to_tokens(ids))
        assert ids[0] == tok.convert_tokens_to_ids(text) == marker_ids[text]
        assert tok.convert_ids_to_tokens(ids[0]) == text
        inside = tok.encode("你好" + text + "ok", add_special_tokens=False)
        assert inside.count(ids[0]) == 1, (text, tok.convert_ids_to_tokens(inside))
        assert (text in tok.all_special_tokens) == special, text


def test_round_trip(loaded):
    family, tok, _ = loaded
    # (bluelm too, for text that has no leading space and no added tokens: legacy SentencePiece)
    assert tok.decode(tok.encode(MIXED, add_special_tokens=False)) == MIXED


@pytest.mark.parametrize("family", ["internlm2", "minicpm"])
def test_slow_sentencepiece_tokenizer_round_trips_spaces(family, tmp_path_factory):
    from transformers import LlamaTokenizer

    path = build_tiny(family, tmp_path_factory.mktemp("slow") / family)
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=True, use_fast=False)
    assert type(tok) is LlamaTokenizer and tok.legacy is False
    for text in (MIXED,) + SPACEY:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text, repr(text)
    # use_fast=True (the AutoTokenizer default) converts tokenizer.model to a LlamaTokenizerFast
    fast = AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)
    assert fast.is_fast
    assert fast.encode(MIXED) == tok.encode(MIXED)


def check_qwen(built, loaded):
    family, tok, model = loaded
    from transformers import PreTrainedTokenizerFast

    assert type(tok) is PreTrainedTokenizerFast
    assert tok.bos_token is None and tok.eos_token is None and tok.pad_token is None
    assert tok("你好")["input_ids"] == tok.encode("你好", add_special_tokens=False)  # no BOS
    eod = tok.convert_tokens_to_ids("<|endoftext|>")
    # the three specials are the last ids, in the real order
    assert [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == \
        [len(tok) - 3, len(tok) - 2, len(tok) - 1]
    # special-token text inside content can be kept as text
    split = tok.encode("<|im_end|>", add_special_tokens=False, split_special_tokens=True)
    assert len(split) > 1 and eod not in split and tok.decode(split) == "<|im_end|>"
    ids = tok.encode(PROMPTS["qwen"], add_special_tokens=False)
    assert tok.decode(ids) == PROMPTS["qwen"]
    assert tok.decode(ids, skip_special_tokens=True) == "system\nYou are a helpful assistant.\nuser\n你好\nassistant\n"
    gen = json.loads((built[1] / "generation_config.json").read_text())
    assert gen["chat_format"] == "chatml" and gen["max_window_size"] == 6144
    assert gen["eos_token_id"] == gen["pad_token_id"] == eod == model.generation_config.eos_token_id
    assert (gen["top_p"], gen["top_k"], gen["repetition_penalty"], gen["max_new_tokens"]) == (0.8, 0, 1.1, 512)
    assert type(model).__name__ == "QWenLMHeadModel"  # its interface: tests/test_standins.py


def check_internlm2(built, loaded):
    family, tok, model = loaded
    assert tok("你好")["input_ids"][0] == 1 and tok.add_bos_token and not tok.add_eos_token
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    order = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>"]
    assert [tok.convert_tokens_to_ids(t) for t in order] == list(range(len(tok) - 6, len(tok)))
    text = tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True)
    assert text == "<s><|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(PROMPTS[family], add_special_tokens=False)
    assert tok.decode(ids) == PROMPTS[family]
    assert tok.decode(ids, skip_special_tokens=True) == "user\n你好\nassistant\n"
    gen = model.generation_config
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (1, [2, im_end], 2)
    assert model.config.num_key_value_heads == 1  # GQA, as the real 8 of 32


def check_xverse(built, loaded):
    family, tok, model = loaded
    assert [tok.convert_tokens_to_ids(t) for t in ("<unk>", "<pad>", "<|startoftext|>", "<|endoftext|>")] == [0, 1, 2, 3]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|startoftext|>", "<|endoftext|>", "<pad>")
    assert tok("你好")["input_ids"] == tok.encode("你好", add_special_tokens=False)  # no BOS, no EOS
    assert tok.decode(tok.encode(PROMPTS[family])) == PROMPTS[family]
    gen = model.generation_config
    assert (gen.pad_token_id, gen.bos_token_id, gen.eos_token_id) == (1, 2, 3)
    assert (gen.temperature, gen.top_k, gen.top_p, gen.repetition_penalty, gen.max_new_tokens) == \
        (0.5, 30, 0.85, 1.1, 2048)


def check_bluelm(built, loaded):
    family, tok, model = loaded
    a = built[1]
    config = json.loads((a / "tokenizer_config.json").read_text())
    assert config["auto_map"] == {"AutoTokenizer": ["tokenization_bluelm.BlueLMTokenizer", None]}
    assert config["tokenizer_class"] == "BlueLMTokenizer"
    assert (a / "tokenization_bluelm.py").is_file()

    # The plain load fails the way the vendor tokenizer does on transformers >= 4.34: sp_model is
    # needed by the base __init__ before the class sets it. (4.48 words it "BlueLMTokenizer has no
    # attribute vocab_size": the tokenizer __getattr__ replaces the inner 'sp_model' error.)
    with pytest.raises(AttributeError) as info:
        AutoTokenizer.from_pretrained(str(a), trust_remote_code=True)
    print("\n[tiny] bluelm plain load:", repr(str(info.value)))
    assert "BlueLMTokenizer" in str(info.value)
    assert "sp_model" in str(info.value) or "vocab_size" in str(info.value)
    assert any(frame.name == "__init__" and str(frame.path).endswith("tokenization_bluelm.py")
               for frame in info.traceback), "must fail inside the vendor __init__"

    # The workaround (sp_model set before the original __init__ runs) loads it.
    assert type(tok).__name__ == "BlueLMTokenizer" and not tok.is_fast
    assert tok.vocab_size == len(tok) - 4 == len(tok.get_vocab()) - 4  # like the real 100000 / 100004
    human, ai = tok.convert_tokens_to_ids("[|Human|]:"), tok.convert_tokens_to_ids("[|AI|]:")
    assert (human, ai) == (tok.vocab_size, tok.vocab_size + 1)
    ids = tok(PROMPTS[family])["input_ids"]
    assert ids[0] == 1 and ids[1] == human and ids[-1] == ai  # BOS from the tokenizer
    assert len(tok.encode("[|SYSTEM|]:", add_special_tokens=False)) > 1  # plain text
    # with split_special_tokens the markers typed in content stay text
    split = tok.encode("[|Human|]:", add_special_tokens=False, split_special_tokens=True)
    assert human not in split and len(split) > 1
    gen = model.generation_config
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (1, 2, 3)
    assert (gen.repetition_penalty, gen.max_new_tokens) == (1.1, 512)


def check_minicpm(built, loaded):
    family, tok, model = loaded
    for marker in ("<用户>", "<AI>"):
        assert marker not in tok.all_special_tokens
        # pieces of tokenizer.model (the fast conversion lists user-defined pieces as non-special added tokens)
        assert tok.convert_tokens_to_ids(marker) < tok.vocab_size
    slow = AutoTokenizer.from_pretrained(str(built[1]), use_fast=False)
    assert "<用户>" not in slow.get_added_vocab() and "<AI>" not in slow.get_added_vocab()
    assert tok("你好")["input_ids"][0] == 1
    messages = [{"role": "user", "content": " 你好 "}, {"role": "assistant", "content": "你好！\n"},
                {"role": "user", "content": "讲个笑话"}]
    assert tok.apply_chat_template(messages, tokenize=False) == "<用户>你好<AI>你好！<用户>讲个笑话<AI>"
    assert json.loads((built[1] / "config.json").read_text())["torch_dtype"] == "float32"
    gen = model.generation_config
    assert (gen.bos_token_id, gen.eos_token_id) == (1, 2)
    assert (gen.do_sample, gen.top_p, gen.temperature, gen.repetition_penalty) == (True, 0.8, 0.5, 1.02)


CHECKS = {"qwen": check_qwen, "internlm2": check_internlm2, "xverse": check_xverse, "bluelm": check_bluelm,
          "minicpm": check_minicpm}


def test_family_specifics(built, loaded):
    """Tokenizer class, BOS/EOS handling, chat template, generation config of each family
    (bluelm: the plain load fails like the vendor tokenizer, the sp_model workaround loads it)."""
    CHECKS[built[0]](built, loaded)


def test_model_shape_and_weights(built, loaded):
    family, tok, model = loaded
    from safetensors import safe_open

    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (64, 2, 2)
    # Qwen's config counts both MLP branches (22016 for Qwen-7B's two 11008-wide ones)
    assert cfg.intermediate_size == (256 if family == "qwen" else 128)
    if family in ("qwen", "bluelm"):  # the output layer is larger than the tokenizer, as in the real ones
        assert cfg.vocab_size > len(tok) and cfg.vocab_size % 128 == 0
    else:
        assert cfg.vocab_size == len(tok)
    assert cfg.max_position_embeddings == 4096
    assert model.dtype == torch.float32
    with safe_open(str(built[1] / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    expected = {"qwen": "QWenLMHeadModel", "internlm2": "InternLM2ForCausalLM", "xverse": "XverseForCausalLM",
                "bluelm": "BlueLMForCausalLM", "minicpm": "MiniCPMForCausalLM"}[family]
    assert type(model).__name__ == expected and type(model).__module__.startswith("transformers_modules.")
    gen = model.generation_config
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert cfg.eos_token_id in eos


def test_greedy_generation_is_deterministic(built, loaded):
    family, tok, model = loaded
    ids = tok.encode(PROMPTS[family], add_special_tokens=family in ("internlm2", "bluelm", "minicpm"))
    first = greedy(model, ids)
    assert len(first) == 8 and all(0 <= i < model.config.vocab_size for i in first)
    assert greedy(model, ids) == first
    other = AutoModelForCausalLM.from_pretrained(str(built[2]), trust_remote_code=True)
    assert greedy(other, ids) == first
    print(f"\n[tiny] {family}: greedy {first} -> {tok.decode(first)!r}")
