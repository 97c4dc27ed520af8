"""Tiny random-weight stand-ins for the five model families, built offline in a few seconds.

Tests and notebooks load a stand-in exactly like a real checkpoint folder::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from helpers.tiny import build_tiny

    path = build_tiny("qwen", "/tmp/tiny/qwen")
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

The models are remote code written by this project in the shape of each vendor's own
(``helpers/standins/<family>``: ``QWenLMHeadModel``, ``InternLM2ForCausalLM``, ``XverseForCausalLM``,
``BlueLMForCausalLM``, ``MiniCPMForCausalLM``; hidden 64, 2 heads of size 32, 2 layers), copied into
the folder and loaded through ``auto_map`` with ``trust_remote_code=True``, as the real ones are.
They reproduce what an engine touches (``forward`` arguments, position source, cache layout, the
vocabulary gap between the output layer and the tokenizer: see helpers/standins/__init__.py) and
have random weights: they produce gibberish, deterministically. Everything *around* the weights is
faithful to each real checkpoint too: the kind of tokenizer, its special tokens and their
single-token ids, BOS/EOS/pad handling, chat templates and ``generation_config.json``. The
tokenizers are trained in-process on the small built-in :data:`CORPUS`, deterministically (single
thread, fixed order).

Per family:

* ``qwen``: byte-level BPE fast tokenizer (``PreTrainedTokenizerFast``, Qwen's pre-tokenizer
  regex) with ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` as the last three ids, and
  **no** bos/eos/pad token set (like the tiktoken ``QWenTokenizer``).
* ``internlm2``: SentencePiece ``LlamaTokenizer`` (``legacy=False``), BOS added, plus the six
  InternLM2 special tokens (``<|plugin|>`` ... ``<|im_start|>``, in the real id order: CONTROL
  pieces at the end of ``tokenizer.model``, registered as special tokens) and the real chat
  template.
* ``xverse``: byte-level BPE fast tokenizer, ids 0-3 ``<unk> <pad> <|startoftext|>
  <|endoftext|>``, no post-processor (encoding adds no BOS).
* ``bluelm``: remote-code ``tokenization_bluelm.BlueLMTokenizer`` written the way the vendor's is,
  *including its defect*: it creates ``self.sp_model`` after ``super().__init__()``, so a plain
  ``AutoTokenizer.from_pretrained(..., trust_remote_code=True)`` raises ``AttributeError`` on
  transformers >= 4.34, like the real checkpoint. Early 4.3x releases word it
  ``'BlueLMTokenizer' object has no attribute 'sp_model'``; on 4.48.3 and 4.57.6, whose tokenizer
  base class defines ``__getattr__``, the error raised reads ``BlueLMTokenizer has no attribute
  vocab_size`` (the inner ``sp_model`` error, raised inside the ``vocab_size`` property, is
  swallowed by Python's ``__getattr__`` fallback and does not appear at all). Set ``sp_model``
  on the instance before the class's ``__init__`` runs to load it.
  As in the real tokenizer (SentencePiece ``vocab_size`` 100000, ``len(get_vocab())`` 100004),
  ``[|Human|]:``, ``[|AI|]:``, ``[SEH]``, ``[SEA]`` are added tokens (``added_tokens.json``, not
  special) right after the SentencePiece ids; ``[|SYSTEM|]:`` is plain text.
* ``minicpm``: SentencePiece ``LlamaTokenizer``; ``<用户>`` and ``<AI>`` are ordinary pieces of
  the SentencePiece vocabulary (not added/special tokens); fp32 checkpoint; real chat template.

Note: ``AutoTokenizer`` (``use_fast=True`` by default) turns the ``LlamaTokenizer`` folders
(internlm2, minicpm) into a ``LlamaTokenizerFast`` converted from ``tokenizer.model``, just as
it does for the real native-Llama checkpoints; pass ``use_fast=False`` for the slow class.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import shutil
import tempfile
import warnings
from typing import Any

__all__ = ["FAMILIES", "CORPUS", "BUILDER_VERSION", "MARKER_FILE", "build_tiny", "is_tiny", "read_marker"]

FAMILIES = ("qwen", "internlm2", "xverse", "bluelm", "minicpm")

# 2: the bench shape for bfloat16; 3: remote-code stand-ins (helpers/standins). A stand-in built by
# an older version is rebuilt.
BUILDER_VERSION = 3
MARKER_FILE = "tiny_standin.json"
STANDINS = pathlib.Path(__file__).resolve().parent / "standins"  # the stand-ins' remote code

# Model size shared by all stand-ins: head size 32 (vLLM's CPU attention needs 32, 64, 80, ...),
# everything else small. Only InternLM2 has fewer KV heads than query heads (7B: 8 of 32).
_HIDDEN = 64
_LAYERS = 2
_HEADS = 2
_KV_HEADS = {"qwen": 2, "internlm2": 1, "xverse": 2, "bluelm": 2, "minicpm": 2}
_INTERMEDIATE = 128
# Families whose output layer has more ids than the tokenizer (Qwen-7B-Chat 151,936 vs 151,851;
# BlueLM-7B-Chat 100,096 vs 100,004): the config's vocab_size is the tokenizer's rounded up to a
# multiple of 128, as theirs is, so a stand-in can produce ids its tokenizer cannot decode.
_VOCAB_GAP = ("qwen", "bluelm")
_VOCAB_MULTIPLE = 128
_MAX_POSITIONS = 4096
_INIT_RANGE = 0.05

# Short chat-like sentences (Chinese + English: greetings, jokes, questions, Markdown, code,
# numbers) used to train every stand-in tokenizer. Order matters for determinism: keep it fixed.
CORPUS: tuple[str, ...] = (
    "你好！很高兴见到你。",
    "Hello! Nice to meet you.",
    "Hi there, how are you doing today?",
    "我今天很好，谢谢你的关心。",
    "早上好，今天天气怎么样？",
    "Good morning! It is sunny and warm outside.",
    "晚上好，祝你有个愉快的周末。",
    "Thank you very much, have a nice day!",
    "You are a helpful assistant.",
    "你是一个乐于助人的助手。",
    "请介绍一下你自己。",
    "I am an AI assistant. I can answer questions, write text and help with code.",
    "我是一个人工智能助手，可以回答问题、写作和编程。",
    "讲个笑话吧。",
    "Tell me a joke, please.",
    "Why did the programmer quit his job? Because he didn't get arrays.",
    "为什么程序员总是分不清万圣节和圣诞节？因为 Oct 31 == Dec 25。",
    "有一天，小明问老师：“老师，我可以问一个问题吗？”老师说：“你已经问了。”",
    "What do you call a bear with no teeth? A gummy bear!",
    "什么是大语言模型？",
    "A large language model is a neural network that predicts the next token.",
    "大语言模型是一种根据上文预测下一个词元的神经网络。",
    "What is the capital of France? The capital of France is Paris.",
    "中国的首都是哪里？中国的首都是北京。",
    "How many days are there in a week? There are 7 days in a week.",
    "一年有 12 个月，365 天，闰年有 366 天。",
    "1 + 1 = 2, 2 * 3 = 6, 10 / 4 = 2.5",
    "圆周率大约是 3.14159，自然常数大约是 2.71828。",
    "The meeting starts at 09:30 on 2024-03-15 and ends at 11:00.",
    "价格是 ¥128.50，折扣 20%，最后只需要 102.80 元。",
    "Order #4821 shipped on 2023/12/01; tracking number 7730-1942-55.",
    "请把下面的句子翻译成英文：我喜欢读书。",
    "Translate to Chinese: I like reading books.",
    "I like reading books. 我喜欢读书。",
    "请用三句话总结这篇文章。",
    "Summarize the following article in three sentences.",
    "Write a short poem about the sea.",
    "写一首关于春天的小诗。",
    "春风吹绿了江南岸，桃花开满了山坡。",
    "The sea is wide and blue, the waves are singing too.",
    "# 标题\n\n这是一个段落。",
    "## Steps\n\n1. Open the notebook.\n2. Run the first cell.\n3. Check the output.",
    "- 第一项\n- 第二项\n- 第三项",
    "**加粗** 和 *斜体* 以及 `代码`。",
    "| 名称 | 数量 |\n|------|------|\n| 苹果 | 3 |\n| 香蕉 | 5 |",
    "> Quote: simple is better than complex.",
    "[link](https://example.com) and ![image](cat.png)",
    "```python\ndef add(a, b):\n    return a + b\n```",
    "```python\nfor i in range(10):\n    print(i * i)\n```",
    "import json\n\ndata = json.loads('{\"name\": \"tiny\", \"size\": 64}')\nprint(data[\"name\"])",
    "class Model:\n    def __init__(self, hidden=64):\n        self.hidden = hidden",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "curl -X POST http://localhost:8000/v1/chat/completions -H 'Content-Type: application/json'",
    "{\"model\": \"qwen-7b-chat\", \"messages\": [{\"role\": \"user\", \"content\": \"你好\"}]}",
    "SELECT name, age FROM users WHERE age > 18 ORDER BY age DESC;",
    "console.log('Hello, world!');",
    "用 Python 写一个快速排序。",
    "Write a function that reverses a string in Python.",
    "这段代码有一个错误，请帮我找出来。",
    "The error says: IndexError: list index out of range.",
    "如何在 Jupyter 里启动一个 HTTP 服务？",
    "How do I serve a model behind an OpenAI-compatible API?",
    "模型加载完成，显存占用 15.4 GB。",
    "The model was loaded in 12.7 seconds and uses 16 GB of GPU memory.",
    "system",
    "user",
    "assistant",
    "Human: 你好\n\nAssistant: 你好！有什么可以帮你的吗？",
    "Human: What is 2 + 2?\n\nAssistant: 2 + 2 = 4.",
    "请问明天会下雨吗？我需要带伞吗？",
    "Should I bring an umbrella tomorrow? It might rain.",
    "我想学习机器学习，应该从哪里开始？",
    "Start with linear algebra, probability and a little Python.",
    "推荐几本好看的科幻小说。",
    "《三体》是一部很受欢迎的科幻小说。",
    "Can you recommend a good science fiction novel?",
    "上海人工智能实验室开发了书生·浦语。",
    "InternLM is a conversational language model that is designed to be helpful, honest, and harmless.",
    "It can understand and communicate fluently in the language chosen by the user such as English and 中文.",
    "北京、上海、广州和深圳是中国的大城市。",
    "London, Tokyo, New York and Sydney are big cities.",
    "猫喜欢吃鱼，狗喜欢啃骨头。",
    "The quick brown fox jumps over the lazy dog.",
    "我们一起去公园散步吧！",
    "Let's go for a walk in the park!",
    "谢谢！不客气。再见！",
    "Thanks! You're welcome. Goodbye!",
    "对不起，我不太明白你的意思，可以再说一遍吗？",
    "Sorry, I don't understand. Could you say that again?",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 10000",
    "一 二 三 四 五 六 七 八 九 十 百 千 万 亿",
    "温度：25°C，湿度：60%，风速：3 m/s。",
    "Step 1: think. Step 2: answer. Step 3: check the answer!",
    "好的，我明白了。下面是答案：",
    "OK, I see. Here is the answer:",
)

_QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

INTERNLM2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MINICPM_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{'<用户>' + "
    "message['content'].strip() + '<AI>'}}{% else %}{{message['content'].strip()}}{% endif %}"
    "{% endfor %}"
)

# Real InternLM2 order: <|plugin|> 92538 ... <|im_start|> 92543; here too they are the last six
# ids of the SentencePiece model (CONTROL pieces) and registered as special tokens.
_INTERNLM2_SPECIALS = (
    "<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>",
)
_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# BlueLM: vocab_size (SentencePiece) 100000, len(get_vocab()) 100004: these four are added tokens
# (added_tokens.json) after the SentencePiece ids (vivo-ai-lab/BlueLM issue #23). "[|SYSTEM|]:" is not
# among them: it is plain text (several pieces).
_BLUELM_ADDED = ("[|Human|]:", "[|AI|]:", "[SEH]", "[SEA]")
_MINICPM_SYMBOLS = ("<用户>", "<AI>")



# --------------------------------------------------------------------------------------------
# helpers


def _write_json(path: pathlib.Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _added(content: str):
    from tokenizers import AddedToken

    return AddedToken(content, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)


def _train_byte_bpe(vocab_size: int, special_tokens: list[str], qwen_regex: bool):
    """Byte-level BPE (lossless on any UTF-8 text) trained on CORPUS with the `tokenizers` library."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>" if "<unk>" in special_tokens else None))
    if qwen_regex:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        special_tokens=[_added(t) for t in special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(CORPUS), trainer=trainer, length=len(CORPUS))
    tok.post_processor = None
    return tok


def _train_sentencepiece(path: pathlib.Path, *, vocab_size: int, user_defined_symbols=(), pad_id: int = -1,
                         seed: int = 0, append_control=()) -> None:
    """Train a LLaMA-style SentencePiece BPE model in-process (one thread) and write it to ``path``.

    ``append_control``: pieces appended at the END of the vocabulary as CONTROL pieces (never
    produced from text by SentencePiece itself; the HF tokenizer registers them as special tokens),
    the way InternLM2 keeps its chat tokens in the last ids of its SentencePiece model.
    """
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    if hasattr(spm, "set_min_log_level"):
        spm.set_min_log_level(2)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,          # the corpus is small: take as many pieces as it yields
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0, unk_piece="<unk>",
        bos_id=1, bos_piece="<s>",
        eos_id=2, eos_piece="</s>",
        pad_id=pad_id, pad_piece="<pad>",
        user_defined_symbols=list(user_defined_symbols),
        num_threads=1,
        shuffle_input_sentence=False,
        max_sentence_length=4096,
    )
    data = buf.getvalue()
    if append_control:
        from sentencepiece import sentencepiece_model_pb2 as sp_pb2

        proto = sp_pb2.ModelProto()
        proto.ParseFromString(data)
        for piece in append_control:
            new = proto.pieces.add()
            new.piece = piece
            new.score = 0.0
            new.type = sp_pb2.ModelProto.SentencePiece.CONTROL
        data = proto.SerializeToString(deterministic=True)
    path.write_bytes(data)


# --------------------------------------------------------------------------------------------
# tokenizers per family; each returns (vocab size incl. added tokens, special ids for the config)


def _qwen_tokenizer(out: pathlib.Path, seed: int) -> dict[str, Any]:
    from transformers import PreTrainedTokenizerFast

    tok = _train_byte_bpe(1600, [], qwen_regex=True)
    tok.add_special_tokens([_added(t) for t in _QWEN_SPECIALS])
    # No bos/eos/pad/unk token: the real tiktoken QWenTokenizer has none.
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False,
                                 model_max_length=_MAX_POSITIONS)
    hf.add_special_tokens({"additional_special_tokens": list(_QWEN_SPECIALS)})
    hf.save_pretrained(str(out))
    eod = hf.convert_tokens_to_ids("<|endoftext|>")
    return {"vocab_size": len(hf), "bos": None, "eos": eod, "pad": eod,
            "ids": {t: hf.convert_tokens_to_ids(t) for t in _QWEN_SPECIALS}}


def _xverse_tokenizer(out: pathlib.Path, seed: int) -> dict[str, Any]:
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<|startoftext|>", "<|endoftext|>"]  # ids 0..3 as in the real vocab
    tok = _train_byte_bpe(1600, specials, qwen_regex=False)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<|startoftext|>",
        eos_token="<|endoftext|>", clean_up_tokenization_spaces=False, model_max_length=_MAX_POSITIONS,
    )
    hf.save_pretrained(str(out))
    ids = {t: hf.convert_tokens_to_ids(t) for t in specials}
    assert list(ids.values()) == [0, 1, 2, 3], ids
    return {"vocab_size": len(hf), "bos": 2, "eos": 3, "pad": 1, "ids": ids}


def _llama_tokenizer(out: pathlib.Path, *, pad_token: str | None, added: tuple[str, ...],
                     chat_template: str | None):
    from transformers import LlamaTokenizer

    hf = LlamaTokenizer(
        vocab_file=str(out / "tokenizer.model"),
        legacy=False,               # no dummy-prefix space after special tokens; exact round trips
        add_bos_token=True,
        add_eos_token=False,
        pad_token=pad_token,
        clean_up_tokenization_spaces=False,
        model_max_length=_MAX_POSITIONS,
        chat_template=chat_template,
    )
    if added:
        from transformers import AddedToken

        hf.add_special_tokens({"additional_special_tokens": [
            AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in added]})
    hf.save_pretrained(str(out))
    return hf


def _internlm2_tokenizer(out: pathlib.Path, seed: int) -> dict[str, Any]:
    _train_sentencepiece(out / "tokenizer.model", vocab_size=1200, seed=seed, append_control=_INTERNLM2_SPECIALS)
    hf = _llama_tokenizer(out, pad_token="</s>", added=_INTERNLM2_SPECIALS, chat_template=INTERNLM2_CHAT_TEMPLATE)
    ids = {t: hf.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>") + _INTERNLM2_SPECIALS}
    return {"vocab_size": len(hf), "bos": 1, "eos": 2, "pad": 2, "ids": ids}


def _minicpm_tokenizer(out: pathlib.Path, seed: int) -> dict[str, Any]:
    # <用户>/<AI> are plain pieces of the SentencePiece vocab (single ids), not added tokens.
    _train_sentencepiece(out / "tokenizer.model", vocab_size=1200, user_defined_symbols=_MINICPM_SYMBOLS,
                         seed=seed)
    hf = _llama_tokenizer(out, pad_token=None, added=(), chat_template=MINICPM_CHAT_TEMPLATE)
    ids = {t: hf.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>") + _MINICPM_SYMBOLS}
    return {"vocab_size": len(hf), "bos": 1, "eos": 2, "pad": None, "ids": ids}


def _bluelm_tokenizer(out: pathlib.Path, seed: int) -> dict[str, Any]:
    import sentencepiece as spm

    _train_sentencepiece(out / "tokenizer.model", vocab_size=1200, pad_id=3, seed=seed)
    shutil.copyfile(STANDINS / "bluelm" / "tokenization_bluelm.py", out / "tokenization_bluelm.py")
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    n = sp.get_piece_size()

    def special(content: str) -> dict[str, Any]:
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
                "rstrip": False, "single_word": False}

    # A 2023-style folder (written by hand: the class cannot be instantiated without the workaround):
    # no added_tokens_decoder in tokenizer_config.json; the chat markers come from added_tokens.json
    # (not listed in special_tokens_map.json, so they load as added, non-special tokens).
    _write_json(out / "tokenizer_config.json", {
        "add_bos_token": True,
        "add_eos_token": False,
        "auto_map": {"AutoTokenizer": ["tokenization_bluelm.BlueLMTokenizer", None]},
        "bos_token": special("<s>"),
        "clean_up_tokenization_spaces": False,
        "eos_token": special("</s>"),
        "model_max_length": _MAX_POSITIONS,
        "pad_token": special("<pad>"),
        "sp_model_kwargs": {},
        "tokenizer_class": "BlueLMTokenizer",
        "unk_token": special("<unk>"),
    })
    _write_json(out / "special_tokens_map.json", {
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"})
    added = {t: n + i for i, t in enumerate(_BLUELM_ADDED)}
    (out / "added_tokens.json").write_text(json.dumps(added, ensure_ascii=False) + "\n", encoding="utf-8")
    ids = {t: sp.piece_to_id(t) for t in ("<unk>", "<s>", "</s>", "<pad>")}
    ids.update(added)
    return {"vocab_size": n + len(added), "bos": 1, "eos": 2, "pad": 3, "ids": ids}


_TOKENIZERS = {
    "qwen": _qwen_tokenizer,
    "internlm2": _internlm2_tokenizer,
    "xverse": _xverse_tokenizer,
    "bluelm": _bluelm_tokenizer,
    "minicpm": _minicpm_tokenizer,
}

# generation_config.json per family (vendor values); token ids are filled in from the tokenizer.
_GENERATION = {
    "qwen": {"chat_format": "chatml", "max_window_size": 6144, "do_sample": True, "top_p": 0.8, "top_k": 0,
             "repetition_penalty": 1.1, "max_new_tokens": 512},
    "internlm2": {},
    "xverse": {"do_sample": True, "temperature": 0.5, "top_k": 30, "top_p": 0.85, "repetition_penalty": 1.1,
               "max_new_tokens": 2048},
    "bluelm": {"repetition_penalty": 1.1, "max_new_tokens": 512},
    "minicpm": {"do_sample": True, "top_p": 0.8, "temperature": 0.5, "repetition_penalty": 1.02},
}
_DTYPE_LABEL = {"qwen": "bfloat16", "internlm2": "bfloat16", "xverse": "bfloat16", "bluelm": "bfloat16",
                "minicpm": "float32"}


# Model shapes. "tiny" is what tests and notebooks use; "bench" is a benchmark-only stand-in whose
# decode step costs ~8-15 ms on one CPU thread in bfloat16 (closer to a 7B model on a GPU, ~25 ms a
# step, where server overhead matters less). Its matrices are large enough that a decode step reads
# weights more than it computes, as on a GPU: a step of 8 rows costs little more than one row
# (in float32 on this CPU the arithmetic dominates and 8 rows cost ~2x one). Like Qwen-7B, it has as
# many key/value heads as query heads.
SIZES = {
    "tiny": {"hidden": _HIDDEN, "layers": _LAYERS, "heads": _HEADS, "intermediate": _INTERMEDIATE},
    # not a family stand-in: a transformers-native Qwen2 that every benchmark column (our server,
    # transformers serve, vLLM) loads alike
    "bench": {"hidden": 1536, "layers": 2, "heads": 12, "intermediate": 4096, "kv_heads": 12},
}


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _output_vocab(family: str, tokenizer_size: int) -> int:
    if family not in _VOCAB_GAP:
        return tokenizer_size
    return (tokenizer_size // _VOCAB_MULTIPLE + 1) * _VOCAB_MULTIPLE  # always at least one id more


def _build_model(family: str, out: pathlib.Path, tok: dict[str, Any], seed: int, size: str = "tiny") -> None:
    import importlib

    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    shape = SIZES[size]
    kv_heads = shape.get("kv_heads") or _KV_HEADS[family] * shape["heads"] // _HEADS
    # Seeded per family, so that two families with the same shapes still get different weights.
    torch.manual_seed(seed * len(FAMILIES) + FAMILIES.index(family))
    if size == "bench":
        config = Qwen2Config(
            vocab_size=tok["vocab_size"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
            num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=kv_heads,
            max_position_embeddings=_MAX_POSITIONS, initializer_range=_INIT_RANGE, rms_norm_eps=1e-6,
            tie_word_embeddings=False, bos_token_id=tok["bos"], eos_token_id=tok["eos"], pad_token_id=tok["pad"],
            use_sliding_window=False)
        model = Qwen2ForCausalLM(config)
        files: tuple[str, ...] = ()
        on_disk: dict[str, Any] = {}
    else:
        standin = importlib.import_module(f"helpers.standins.{family}")
        config = standin.make_config(
            vocab_size=_output_vocab(family, tok["vocab_size"]), hidden_size=shape["hidden"],
            intermediate_size=shape["intermediate"], num_layers=shape["layers"], num_heads=shape["heads"],
            num_kv_heads=kv_heads, max_positions=_MAX_POSITIONS, bos_token_id=tok["bos"], eos_token_id=tok["eos"],
            pad_token_id=tok["pad"], init_range=_INIT_RANGE, rms_norm_eps=1e-6)
        with _quiet_transformers():  # "doesn't directly inherit from GenerationMixin": as the vendors' classes
            model = standin.MODEL_CLASS(config)
        files = standin.FILES
        on_disk = getattr(standin, "CONFIG_ON_DISK", {})
    model = model.to(torch.float32).eval()
    model.save_pretrained(str(out), safe_serialization=True)
    for name in files:  # the remote code, next to the weights as in the vendor's folder
        shutil.copyfile(STANDINS / family / name, out / name)

    # The label the real config.json carries; the tiny weights themselves are stored in float32.
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["torch_dtype"] = _DTYPE_LABEL[family]
    cfg.update(on_disk)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    gen = dict(_GENERATION[family])
    if family == "internlm2":
        gen.update(bos_token_id=1, eos_token_id=[2, tok["ids"]["<|im_end|>"]], pad_token_id=2)
    else:
        if tok["bos"] is not None:
            gen["bos_token_id"] = tok["bos"]
        gen["eos_token_id"] = tok["eos"]
        if tok["pad"] is not None:
            gen["pad_token_id"] = tok["pad"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        GenerationConfig(**gen).save_pretrained(str(out))


# --------------------------------------------------------------------------------------------
# public API


def read_marker(path: str | os.PathLike) -> dict[str, Any] | None:
    """The stand-in marker of a folder (``tiny_standin.json``), or None if it is not a stand-in."""
    marker = pathlib.Path(path) / MARKER_FILE
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("family") not in FAMILIES:
        return None
    return data


def is_tiny(path: str | os.PathLike) -> bool:
    """True if ``path`` is a folder holding a stand-in built by :func:`build_tiny`."""
    return read_marker(path) is not None


def build_tiny(family: str, out_dir: str | os.PathLike, *, seed: int = 0, overwrite: bool = False,
               size: str = "tiny") -> pathlib.Path:
    """Build the tiny random-weight stand-in of ``family`` into ``out_dir`` and return its path.

    Deterministic: the same family and seed give the same files. If ``out_dir`` already holds a
    complete build of the same family, builder version and seed, it is returned as is (unless
    ``overwrite``). A previous stand-in of another family/version/seed is replaced. A non-empty
    folder that is not a stand-in is refused unless ``overwrite`` (then the stand-in files are
    written over it; other files are left alone).

    The build happens in a temporary sibling folder that is moved into place at the end, so an
    interrupted build never leaves a half-written stand-in behind. Keep dots out of the folder
    name for bluelm: its remote-code tokenizer is imported as a module named after the folder.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; families: {', '.join(FAMILIES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; sizes: {', '.join(SIZES)}")
    out = pathlib.Path(out_dir).expanduser().resolve()
    marker = read_marker(out)
    if (not overwrite and marker is not None and marker.get("family") == family
            and marker.get("builder_version") == BUILDER_VERSION and marker.get("seed") == seed
            and marker.get("size", "tiny") == size):
        return out
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder")
    foreign = out.is_dir() and marker is None and any(out.iterdir())
    if foreign and not overwrite:
        raise FileExistsError(f"{out} is not empty and is not a tiny stand-in; pass overwrite=True to write into it")
    if family == "bluelm" and "." in out.name:
        warnings.warn(f"folder name {out.name!r} has a dot: the remote-code tokenizer import may fail",
                      stacklevel=2)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}-building-", dir=out.parent))
    try:
        tok = _TOKENIZERS[family](tmp, seed)
        _build_model(family, tmp, tok, seed, size)
        _write_json(tmp / MARKER_FILE, {
            "family": family,
            "builder_version": BUILDER_VERSION,
            "seed": seed,
            "size": size,
            "note": "random weights, for tests only",
            "special_token_ids": tok["ids"],
        })
        if foreign:
            for item in sorted(tmp.iterdir()):
                target = out / item.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(item, target)
        else:
            current = read_marker(out)
            if (not overwrite and current is not None and current.get("family") == family
                    and current.get("builder_version") == BUILDER_VERSION and current.get("seed") == seed):
                return out  # a concurrent build of the same stand-in finished first
            if out.exists():
                shutil.rmtree(out)  # an empty folder or an older stand-in
            try:
                os.replace(tmp, out)
            except OSError:
                # Somebody else finished the same build at the same moment: use theirs if it fits.
                other = read_marker(out)
                if not (other and other.get("family") == family and other.get("seed") == seed
                        and other.get("builder_version") == BUILDER_VERSION):
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
