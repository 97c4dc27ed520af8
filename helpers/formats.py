"""Chat formats: OpenAI-style messages -> the exact prompt each model family was trained on.

Every family writes its prompt differently (see tests/golden/chat_formats.json, produced by the
vendors' own code). A format turns messages into a list of *segments*:

* ``Special(token)`` - a control token written by the template (``<|im_start|>``, ``</s>``...),
  always encoded as its single id;
* ``Text(text)``     - plain text (template text and message content), encoded as text: a user who
  types ``<|im_end|>`` gets the characters, never the control token.

``render()`` joins the segments into the prompt text the vendor code builds; ``encode()`` turns them
into token ids the way the vendor code does (one tokenizer call per run of text, or per piece where
the vendor encodes piece by piece), adding BOS where the vendor's tokenizer adds it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Iterable, Sequence

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


class ChatFormatError(ValueError):
    """The messages cannot be written in this family's format (the text says what to change)."""


class PromptTooLong(ChatFormatError):
    """Even the last user message alone (with any system message) is longer than allowed."""

    def __init__(self, tokens: int, allowed: int):
        super().__init__(f"the prompt is {tokens} tokens, more than the {allowed} allowed: "
                         "shorten the message or lower max_tokens")
        self.tokens, self.allowed = tokens, allowed


@dataclass(frozen=True)
class Special:
    token: str


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Marker:
    """Template text that is a single token in the real vocabulary (BlueLM's ``[|Human|]:``).

    Encoded as that token when the tokenizer has it, else as text."""

    token: str


Segment = Special | Text | Marker


# --------------------------------------------------------------------------- seed history


def history_to_messages(prompt: str, history: Iterable[Sequence[str]] | None = None,
                        system: str | None = None) -> list[Message]:
    """The seed tutorials' ``history=[[query, response], ...]`` plus a new prompt, as messages."""
    messages: list[Message] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(history or []):
        if not isinstance(turn, (list, tuple)) or len(turn) != 2:
            raise ChatFormatError(f"history[{i}] must be a [query, response] pair")
        query, response = turn
        messages.append({"role": "user", "content": str(query)})
        messages.append({"role": "assistant", "content": str(response)})
    messages.append({"role": "user", "content": prompt})
    return messages


def messages_to_history(messages: Sequence[Message]) -> list[list[str]]:
    """Pairs of (user, assistant) turns, in order; system messages and an unanswered last user
    message are left out."""
    history: list[list[str]] = []
    pending: str | None = None
    for m in messages:
        if m["role"] == "user":
            pending = m["content"]
        elif m["role"] == "assistant" and pending is not None:
            history.append([pending, m["content"]])
            pending = None
    return history


# --------------------------------------------------------------------------- the formats


class ChatFormat:
    family: str = ""
    #: BOS id put in front of the prompt ids (the vendor tokenizer adds it; prompt text has none)
    bos_added_by_tokenizer: bool = False
    #: encode adjacent Text segments in one tokenizer call (the vendor tokenizes the whole prompt)
    merge_text: bool = True
    #: control tokens that end the answer
    stop_tokens: tuple[str, ...] = ()
    #: text that ends the answer when the model writes it as plain text
    stop_strings: tuple[str, ...] = ()
    #: whether a system message is accepted
    supports_system: bool = True
    default_system: str | None = None

    # -- to implement
    def segments(self, messages: Sequence[Message]) -> list[Segment]:  # pragma: no cover
        raise NotImplementedError

    # -- shared
    def check(self, messages: Sequence[Message]) -> list[Message]:
        """Validate roles/content; return the messages as plain dicts."""
        if not messages:
            raise ChatFormatError("messages must not be empty")
        out: list[Message] = []
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in ("system", "user", "assistant"):
                raise ChatFormatError(
                    f"messages[{i}].role must be 'system', 'user' or 'assistant', not {role!r}")
            if not isinstance(content, str):
                raise ChatFormatError(f"messages[{i}].content must be a string")
            if role == "system":
                if i != 0:
                    raise ChatFormatError(f"messages[{i}]: a system message may only come first")
                if not self.supports_system:
                    raise ChatFormatError(
                        f"the {self.family} format has no system role: remove the system message "
                        "or put the instruction into the first user message")
            out.append({"role": role, "content": content})
        if out[-1]["role"] != "user":
            raise ChatFormatError("the last message must come from the user")
        return out

    def render(self, messages: Sequence[Message]) -> str:
        """The prompt text (as the vendor code builds it, without the BOS a tokenizer adds)."""
        return self._join(self.segments(self.check(messages)))

    def encode(self, tokenizer, messages: Sequence[Message]) -> list[int]:
        """Prompt token ids for ``messages``."""
        segs = self.segments(self.check(messages))
        bos = [tokenizer.bos_token_id] if self.bos_added_by_tokenizer and tokenizer.bos_token_id is not None else []
        protected = self.protected_ids(tokenizer)
        template_ids = []
        for seg in segs:
            if isinstance(seg, Text):
                continue
            tid = single_token_id(tokenizer, seg.token)
            if tid is None and isinstance(seg, Special):
                raise ChatFormatError(f"the tokenizer has no token {seg.token!r}: is this a {self.family} model?")
            if tid is not None:
                template_ids.append(tid)
        if self.merge_text and not _is_tiktoken_qwen(tokenizer):
            # The vendor tokenizes the whole prompt string in one call: do the same, and keep the
            # result if the message content added no control token to those of the template.
            ids = _encode_raw(tokenizer, self._join(segs), split_special_tokens=False)
            if [i for i in ids if i in protected] == template_ids:
                return bos + ids
        return bos + self._encode_pieces(tokenizer, segs, protected)

    @staticmethod
    def _join(segs: Sequence[Segment]) -> str:
        return "".join(seg.text if isinstance(seg, Text) else seg.token for seg in segs)

    def _encode_pieces(self, tokenizer, segs: Sequence[Segment], protected: set[int]) -> list[int]:
        """Control tokens as ids, text as plain text (one call per run of text, or per piece)."""
        ids: list[int] = []
        pending: list[str] = []

        def flush():
            if pending:
                ids.extend(encode_plain(tokenizer, "".join(pending), protected))
                pending.clear()

        for seg in segs:
            tid = None if isinstance(seg, Text) else single_token_id(tokenizer, seg.token)
            if tid is None:  # text, or a Marker this vocabulary lacks
                pending.append(seg.text if isinstance(seg, Text) else seg.token)
                if not self.merge_text:
                    flush()
                continue
            flush()
            ids.append(tid)
        flush()
        return ids

    def encode_within(self, tokenizer, messages: Sequence[Message], max_tokens: int) -> list[int]:
        """Like ``encode`` but drops the oldest turns (keeping any system message and the last user
        message) until the prompt fits in ``max_tokens``, as the vendors' chat() functions do.
        Raises ``PromptTooLong`` when even the last user message alone does not fit.

        A conversation that fits is encoded once. One that does not is searched from the newest
        turn backwards (1, 2, 4 ... turns, then bisection), so a long history costs a few encodes
        of about ``max_tokens`` each instead of one full encode per dropped turn."""
        messages = self.check(messages)
        ids = self.encode(tokenizer, messages)
        if len(ids) <= max_tokens:
            return ids
        head = messages[:1] if messages[0]["role"] == "system" else []
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        # where a kept conversation may start: a user message after the system message
        starts = [i for i in range(len(head), last_user + 1) if messages[i]["role"] == "user"]
        cache: dict[int, list[int]] = {}

        def encoded(k: int) -> list[int]:  # keep the newest k turns
            if k not in cache:
                cache[k] = self.encode(tokenizer, head + messages[starts[-k]:])
            return cache[k]

        smallest = encoded(1)
        if len(smallest) > max_tokens:
            raise PromptTooLong(len(smallest), max_tokens)
        n = len(starts)
        good, k = 1, 2
        while k <= n and len(encoded(k)) <= max_tokens:
            good, k = k, k * 2
        bad = k if k <= n else n + 1  # n + 1: the whole conversation, known to be too long
        while bad - good > 1:
            mid = (good + bad) // 2
            if len(encoded(mid)) <= max_tokens:
                good = mid
            else:
                bad = mid
        return encoded(good)

    def stop_ids(self, tokenizer) -> list[int]:
        ids = []
        for tok in self.stop_tokens:
            tid = single_token_id(tokenizer, tok)
            if tid is not None and tid not in ids:
                ids.append(tid)
        return ids

    def protected_ids(self, tokenizer) -> set[int]:
        """Ids that message content must never produce (control tokens of the template)."""
        memo = _memo(tokenizer)
        key = ("protected", type(self))
        if key not in memo:
            memo[key] = frozenset(self._protected_ids(tokenizer))
        return set(memo[key])

    def _protected_ids(self, tokenizer) -> set[int]:
        ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        ids.discard(tokenizer.unk_token_id)  # unknown characters are not control tokens
        for tok in self.control_tokens():
            tid = single_token_id(tokenizer, tok)
            if tid is not None:
                ids.add(tid)
        return ids

    def control_tokens(self) -> tuple[str, ...]:
        return self.stop_tokens

    def postprocess(self, text: str) -> str:
        """The final answer text (non-streaming), after stop strings were cut off."""
        return text


class QwenFormat(ChatFormat):
    """ChatML as Qwen v1's ``make_context`` writes it: no BOS, every piece encoded on its own."""

    family = "qwen"
    merge_text = False
    stop_tokens = ("<|im_end|>", "<|im_start|>", "<|endoftext|>")
    default_system = "You are a helpful assistant."

    def segments(self, messages):
        start, end = Special("<|im_start|>"), Special("<|im_end|>")
        system = self.default_system
        if messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        segs: list[Segment] = [start, Text("system"), Text("\n"), Text(system), end]
        for m in messages:
            segs += [Text("\n"), start, Text(m["role"]), Text("\n"), Text(m["content"]), end]
        segs += [Text("\n"), start, Text("assistant"), Text("\n")]
        return segs

    def postprocess(self, text):
        return text.strip()  # Qwen's chat() strips the answer


class InternLM2Format(ChatFormat):
    """``<|im_start|>role\\n...<|im_end|>\\n`` turns (InternLM2's build_inputs); BOS from the tokenizer."""

    family = "internlm2"
    bos_added_by_tokenizer = True
    stop_tokens = ("</s>", "<|im_end|>")
    stop_strings = ("<|im_end|>",)
    default_system = (
        "You are an AI assistant whose name is InternLM (书生·浦语).\n"
        "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI "
        "Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
        "- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by the "
        "user such as English and 中文.")

    def control_tokens(self):
        return ("<|im_start|>", "<|im_end|>", "</s>")

    def segments(self, messages):
        start, end = Special("<|im_start|>"), Special("<|im_end|>")
        system = self.default_system
        if messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        segs: list[Segment] = []
        if system:  # an empty system message means no system block (meta_instruction='')
            segs += [start, Text(f"system\n{system}"), end, Text("\n")]
        for m in messages:
            segs += [start, Text(f"{m['role']}\n{m['content']}"), end, Text("\n")]
        segs += [start, Text("assistant\n")]
        return segs


class XverseFormat(ChatFormat):
    """``Human: q\\n\\nAssistant: a<eos>`` turns, each encoded on its own (XVERSE's _build_chat_input)."""

    family = "xverse"
    merge_text = False
    supports_system = False
    stop_tokens = ("<|endoftext|>",)

    def segments(self, messages):
        segs: list[Segment] = []
        for i, m in enumerate(messages):
            if m["role"] == "user":
                last = i == len(messages) - 1
                segs.append(Text(f"Human: {m['content']}\n\n" + ("Assistant: " if last else "")))
            else:
                segs += [Text(f"Assistant: {m['content']}"), Special("<|endoftext|>")]
        return segs


class BlueLMFormat(ChatFormat):
    """``[|Human|]:q[|AI|]:a</s>`` turns (BlueLM's openai_api_demo); BOS from the tokenizer."""

    family = "bluelm"
    bos_added_by_tokenizer = True
    stop_tokens = ("</s>", "[|Human|]:")
    stop_strings = ("[|Human|]:",)

    def control_tokens(self):
        return ("</s>", "[|Human|]:", "[|AI|]:", "[|SYSTEM|]:")

    def segments(self, messages):
        segs: list[Segment] = []
        for m in messages:
            if m["role"] == "system":
                segs += [Marker("[|SYSTEM|]:"), Text(m["content"])]
            elif m["role"] == "user":
                segs += [Marker("[|Human|]:"), Text(m["content"]), Marker("[|AI|]:")]
            else:
                segs += [Text(m["content"]), Special("</s>")]
        return segs


class MiniCPMFormat(ChatFormat):
    """``<用户>q<AI>a`` with stripped contents and no separators (MiniCPM's chat_template)."""

    family = "minicpm"
    bos_added_by_tokenizer = True
    stop_tokens = ("</s>",)
    # <用户>/<AI> are plain text for MiniCPM: the model may write them, which ends its answer
    stop_strings = ("<用户>", "<AI>")

    def segments(self, messages):
        segs: list[Segment] = []
        for m in messages:
            if m["role"] == "user":
                segs.append(Text("<用户>" + m["content"].strip() + "<AI>"))
            else:
                segs.append(Text(m["content"].strip()))
        return segs


FORMATS: dict[str, ChatFormat] = {
    f.family: f for f in (QwenFormat(), InternLM2Format(), XverseFormat(), BlueLMFormat(), MiniCPMFormat())
}


def get_chat_format(family: str) -> ChatFormat:
    try:
        return FORMATS[family]
    except KeyError:
        raise KeyError(f"unknown chat format {family!r}; known: {', '.join(FORMATS)}") from None


# --------------------------------------------------------------------------- tokenizer glue


_MEMO: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _is_tiktoken_qwen(tokenizer) -> bool:
    # Qwen v1's remote QWenTokenizer wraps a tiktoken Encoding and takes allowed_special=...
    # (remembered: on other tokenizers a missing attribute goes through a slow __getattr__)
    memo = _memo(tokenizer)
    found = memo.get(("tiktoken",))
    if found is None:
        found = memo[("tiktoken",)] = hasattr(tokenizer, "mergeable_ranks") and hasattr(tokenizer, "special_tokens")
    return found


def _memo(tokenizer) -> dict:
    """Lookups remembered per tokenizer object (the server encodes every prompt on its event loop,
    and these go through slow Python properties). Tokens added to a tokenizer after it was first
    used for chat prompts are not seen: load it, add tokens, then serve."""
    try:
        memo = _MEMO.get(tokenizer)
        if memo is None:
            memo = _MEMO[tokenizer] = {}
        return memo
    except TypeError:  # not weak-referenceable: nothing remembered
        return {}


def single_token_id(tokenizer, token: str) -> int | None:
    """The id of ``token`` if the vocabulary has it as one token, else None."""
    memo = _memo(tokenizer)
    if token not in memo:
        memo[token] = _single_token_id(tokenizer, token)
    return memo[token]


def _single_token_id(tokenizer, token: str) -> int | None:
    if _is_tiktoken_qwen(tokenizer):
        return tokenizer.special_tokens.get(token)
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return int(tid)


def _encode_raw(tokenizer, text: str, *, split_special_tokens: bool) -> list[int]:
    """``tokenizer.encode(text, add_special_tokens=False, split_special_tokens=...)``. For a fast
    tokenizer, the Rust backend is called directly, as ``PreTrainedTokenizerFast`` itself does:
    the same ids, without the Python wrapper that costs far more than the encoding (the server
    encodes every prompt on its event loop)."""
    from transformers import PreTrainedTokenizerFast

    if isinstance(tokenizer, PreTrainedTokenizerFast):
        backend = tokenizer._tokenizer
        if backend.encode_special_tokens != split_special_tokens:
            backend.encode_special_tokens = split_special_tokens
        return backend.encode(text, add_special_tokens=False).ids
    return list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=split_special_tokens))


def _encode_text(tokenizer, text: str) -> list[int]:
    if not text:
        return []
    if _is_tiktoken_qwen(tokenizer):
        return list(tokenizer.encode(text, allowed_special=set(), disallowed_special=()))
    return _encode_raw(tokenizer, text, split_special_tokens=True)


def encode_plain(tokenizer, text: str, protected: set[int] | None = None) -> list[int]:
    """Encode ``text`` as plain text: no BOS/EOS added, and no control token produced even if the
    text contains one's spelling (some vocabularies, e.g. SentencePiece user-defined symbols, match
    such strings by themselves: those occurrences are encoded character by character)."""
    ids = _encode_text(tokenizer, text)
    if not protected or not protected.intersection(ids):
        return ids
    spelled = {t for t in (tokenizer.convert_ids_to_tokens(i) for i in protected) if isinstance(t, str) and t}
    out: list[int] = []
    rest = text
    while rest:
        hits = [(rest.find(s), s) for s in spelled if s in rest]
        if not hits:
            out += _encode_text(tokenizer, rest)
            break
        pos, s = min(hits, key=lambda h: (h[0], -len(h[1])))
        out += _encode_text(tokenizer, rest[:pos])
        for ch in s:
            out += _encode_text(tokenizer, ch)
        rest = rest[pos + len(s):]
    if protected.intersection(out):
        raise ChatFormatError("message content could not be encoded without control tokens")
    return out
