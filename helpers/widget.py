"""A chat box for the notebook (ipywidgets): type a question, watch the answer stream in.

It talks to the running server over HTTP (``/v1/chat/completions`` with ``stream: true``), like any
other client, and keeps the conversation so follow-up questions have their history::

    from helpers.widget import ChatWidget
    ChatWidget(f"http://127.0.0.1:{PORT}")
"""

from __future__ import annotations

import html
import threading

import ipywidgets as w

from .client import stream_chat


class ChatWidget(w.VBox):
    def __init__(self, url: str, *, model: str | None = None, api_key: str | None = None,
                 system: str | None = None, max_tokens: int = 512, temperature: float | None = None):
        self.url, self.model, self.api_key = url, model, api_key
        self.max_tokens, self.temperature = max_tokens, temperature
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.transcript = w.HTML(layout=w.Layout(border="1px solid #ddd", padding="6px", max_height="360px",
                                          overflow="auto"))
        self.box = w.Text(placeholder="输入问题，回车发送 / type a question, Enter to send",
                          layout=w.Layout(width="70%"))
        self.send_button = w.Button(description="发送 Send", button_style="primary")
        self.clear_button = w.Button(description="清空 Clear")
        self.status = w.Label()
        self.box.on_submit(lambda _: self.send())
        self.send_button.on_click(lambda _: self.send())
        self.clear_button.on_click(lambda _: self.clear())
        self._thread: threading.Thread | None = None
        super().__init__([self.transcript, w.HBox([self.box, self.send_button, self.clear_button]), self.status])
        self._render()

    # -- actions
    def send(self, text: str | None = None) -> threading.Thread | None:
        """Ask ``text`` (or what is in the box); the answer streams in from a background thread,
        which is returned (``.join()`` it to wait)."""
        text = (text if text is not None else self.box.value).strip()
        if not text or (self._thread is not None and self._thread.is_alive()):
            return None
        self.box.value = ""
        self.messages.append({"role": "user", "content": text})
        self.messages.append({"role": "assistant", "content": ""})
        self._thread = threading.Thread(target=self._stream, daemon=True)
        self._thread.start()
        return self._thread

    def clear(self) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"]
        self.status.value = ""
        self._render()

    # -- streaming
    def _stream(self) -> None:
        self.send_button.disabled = True
        self.status.value = "生成中 generating…"
        params = {"max_tokens": self.max_tokens}
        if self.temperature is not None:
            params["temperature"] = self.temperature
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        answer = self.messages[-1]
        try:
            for piece in stream_chat(self.messages[:-1], url=self.url, model=self.model, headers=headers, **params):
                answer["content"] += piece
                self._render()
            self.status.value = ""
        except Exception as exc:  # show it; the conversation stays as it was
            self.messages = self.messages[:-2]
            self.status.value = f"出错了 error: {exc}"
        finally:
            self.send_button.disabled = False
            self._render()

    def _render(self) -> None:
        rows = []
        for m in self.messages:
            who = {"user": "🧑 你", "assistant": "🤖 模型", "system": "⚙️ system"}[m["role"]]
            rows.append(f"<div style='margin:4px 0'><b>{who}</b>: "
                        f"<span style='white-space:pre-wrap'>{html.escape(m['content'])}</span></div>")
        self.transcript.value = "".join(rows) or "<i>还没有对话 / no messages yet</i>"
