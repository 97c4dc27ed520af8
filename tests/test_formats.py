"""Chat formats against the prompts the vendors' own code builds (tests/golden/chat_formats.json)."""

import json
from pathlib import Path

import pytest

from helpers.formats import (
    ChatFormatError,
    get_chat_format,
    history_to_messages,
    messages_to_history,
)

GOLDEN = Path(__file__).resolve().parent / "golden" / "chat_formats.json"
FAMILIES = ["qwen", "internlm2", "xverse", "bluelm", "minicpm"]


def _cases():
    data = json.loads(GOLDEN.read_text(encoding="utf-8"))
    for family in FAMILIES:
        for case in data[family]["cases"]:
            yield pytest.param(family, case, data[family]["bos_added_by_tokenizer"],
                               id=f"{family}-{case['name']}")


@pytest.mark.parametrize("family,case,bos", list(_cases()))
def test_render_matches_vendor_prompt(family, case, bos):
    fmt = get_chat_format(family)
    if case.get("prompt_text") is None:
        # the vendor code refuses these messages (XVERSE has no system role): so do we, clearly
        with pytest.raises(ChatFormatError, match="system"):
            fmt.render(case["messages"])
        return
    assert fmt.render(case["messages"]) == case["prompt_text"]
    if bos is not None:
        assert fmt.bos_added_by_tokenizer == bos


def test_golden_covers_every_family(golden):
    for family in FAMILIES:
        assert len(golden[family]["cases"]) >= 4
        assert set(get_chat_format(family).stop_tokens) >= set(golden[family]["stop"]["token_strings"])


def test_seed_history_round_trip():
    history = [["你好", "你好！有什么可以帮你？"], ["Tell me a joke.", "Why?"]]
    messages = history_to_messages("再讲一个。", history)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[-1]["content"] == "再讲一个。"
    assert messages_to_history(messages) == history
    assert messages_to_history(messages + [{"role": "assistant", "content": "好"}]) == history + [["再讲一个。", "好"]]


def test_seed_history_rejects_malformed_pairs():
    with pytest.raises(ChatFormatError, match=r"history\[0\]"):
        history_to_messages("hi", [["only one"]])


@pytest.mark.parametrize("family", FAMILIES)
def test_invalid_messages_are_refused_with_a_reason(family):
    fmt = get_chat_format(family)
    with pytest.raises(ChatFormatError, match="empty"):
        fmt.render([])
    with pytest.raises(ChatFormatError, match="last message"):
        fmt.render([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    with pytest.raises(ChatFormatError, match="role"):
        fmt.render([{"role": "tool", "content": "x"}])
    with pytest.raises(ChatFormatError, match="content"):
        fmt.render([{"role": "user", "content": None}])
