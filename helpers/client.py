"""A small client for the server, in the style of the seed tutorials (``requests`` only)."""

from __future__ import annotations

import json
import time
from typing import Iterator, Sequence

import requests

DEFAULT_URL = "http://127.0.0.1:6006"


def get_completion(prompt: str, history: Sequence[Sequence[str]] | None = None, *, url: str = DEFAULT_URL,
                   max_length: int | None = None, top_p: float | None = None,
                   temperature: float | None = None, timeout: float = 600) -> str:
    """Ask the seed API (``POST /``) and return the answer text, like the seed tutorials do."""
    return ask(prompt, history, url=url, max_length=max_length, top_p=top_p, temperature=temperature,
               timeout=timeout)["response"]


def ask(prompt: str, history: Sequence[Sequence[str]] | None = None, *, url: str = DEFAULT_URL,
        max_length: int | None = None, top_p: float | None = None, temperature: float | None = None,
        timeout: float = 600) -> dict:
    """The whole seed response: ``{"response", "history", "status", "time"}``; raises with the
    server's message on an error status."""
    data = {"prompt": prompt, "history": [list(t) for t in history or []]}
    for key, value in (("max_length", max_length), ("top_p", top_p), ("temperature", temperature)):
        if value is not None:
            data[key] = value
    r = requests.post(url.rstrip("/") + "/", json=data, timeout=timeout)
    if r.status_code != 200:
        raise RuntimeError(f"server answered {r.status_code}: {_error_text(r)}")
    return r.json()


def stream_chat(messages: str | Sequence[dict], *, url: str = DEFAULT_URL, model: str | None = None,
                timeout: float = 600, headers: dict | None = None, **params) -> Iterator[str]:
    """Stream an answer from ``/v1/chat/completions``; yields text pieces as they arrive.
    ``messages`` may be a plain prompt string; ``headers`` e.g. ``{"Authorization": "Bearer KEY"}``."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    base = url.rstrip("/")
    if model is None:
        r = requests.get(base + "/v1/models", headers=headers, timeout=30)
        if r.status_code != 200:
            raise RuntimeError(f"server answered {r.status_code}: {_error_text(r)}")
        model = r.json()["data"][0]["id"]
    body = {"model": model, "messages": list(messages), "stream": True, **params}
    with requests.post(base + "/v1/chat/completions", json=body, stream=True, timeout=timeout,
                       headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"server answered {r.status_code}: {_error_text(r)}")
        for line in r.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                return
            chunk = json.loads(payload)
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            for choice in chunk.get("choices", []):
                text = choice.get("delta", {}).get("content")
                if text:
                    yield text


def wait_until_ready(url: str = DEFAULT_URL, timeout: float = 60) -> dict:
    """Poll ``GET /health`` until the server can generate (200, ``"status": "ok"``; e.g. after
    ``python api.py`` in a terminal) and return its answer. Raises ``RuntimeError`` with the
    server's reason when it cannot (``"failed"``: the model did not load or the engine stopped;
    ``"stopping"``), ``TimeoutError`` when it is still loading (or not answering) at the deadline."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            r = requests.get(url.rstrip("/") + "/health", timeout=2)
            try:
                body = r.json()
            except ValueError:
                body = {}
            status = body.get("status") if isinstance(body, dict) else None
            if r.status_code == 200 and status == "ok":
                return body
            if status in ("failed", "stopping"):
                raise RuntimeError(f"the server at {url} cannot generate ({status}): {body.get('reason')}")
            last = f"{r.status_code} {status or ''}".strip()
        except requests.RequestException as exc:
            last = exc
        time.sleep(0.2)
    raise TimeoutError(f"{url} was not ready within {timeout:.0f} s (last answer: {last})")


def _error_text(r: requests.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text[:500]
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"].get("message", str(body))
    if isinstance(body, dict) and "error" in body:
        return str(body["error"])
    return str(body)[:500]


def metrics(url: str = DEFAULT_URL, timeout: float = 10) -> dict[str, float]:
    """``GET /metrics`` as ``{name: value}`` (values of a name with several label sets are added up;
    histograms give ``..._sum`` and ``..._count``), for a quick look without Prometheus."""
    r = requests.get(url.rstrip("/") + "/metrics", timeout=timeout)
    r.raise_for_status()
    values: dict[str, float] = {}
    for line in r.text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, value = line.rsplit(" ", 1)
        name = name_labels.split("{", 1)[0]
        if name.endswith("_bucket"):
            continue
        values[name] = values.get(name, 0.0) + float(value)
    return values
