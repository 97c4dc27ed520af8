"""The notebook chat widget, driven from Python against a running server."""

import pytest

from helpers.background import start_server
from helpers.widget import ChatWidget

from .conftest import free_port


@pytest.fixture(scope="module")
def server(tiny_loaded):
    # every token streamed on its own: the stand-in writes a whole answer within one default interval
    srv = start_server(tiny_loaded("internlm2"), host="127.0.0.1", port=free_port(), api_keys=["group-1-key"],
                       stream_interval=0)
    yield srv
    srv.stop()


def test_widget_streams_answers_and_keeps_the_conversation(server):
    chat = ChatWidget(server.url, api_key="group-1-key", max_tokens=16, temperature=0)
    seen = []
    chat.transcript.observe(lambda change: seen.append(change["new"]), names="value")
    chat.box.value = "你好"
    chat.send().join(30)
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]
    first = chat.messages[1]["content"]
    assert first and chat.status.value == ""
    assert len(seen) > 2  # the answer grew piece by piece
    assert chat.box.value == "" and not chat.send_button.disabled
    chat.send("再说一遍").join(30)
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert "再说一遍" in chat.transcript.value
    chat.clear()
    assert chat.messages == []


def test_widget_shows_errors_and_loses_nothing(server):
    chat = ChatWidget(server.url, api_key="wrong-key", max_tokens=8)
    chat.send("你好").join(30)
    assert "401" in chat.status.value
    assert chat.messages == []  # the failed turn is not kept
    assert not chat.send_button.disabled
