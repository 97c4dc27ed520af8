"""Limits and the gate every request passes before the routes see it.

``Limits`` holds what a server allows (answer length, prompt length, body size). ``RequestGuard``
is an ASGI middleware that, in this order:

1. checks the API key (``Authorization: Bearer ...``) on every path but the open ones (``/health``,
   the docs, and ``GET /`` with its ``/static/...`` files: the chat page asks for the key), when keys
   are configured;
2. for the JSON routes, reads the body up to ``max_body_bytes`` (413 beyond, without reading the
   rest), checks the content type (415 unless JSON; a missing one is read as JSON), that the bytes
   are UTF-8 and parse as JSON, and that no string holds a lone surrogate (400 otherwise);
3. hands the parsed body to the routes in ``request.state.json_body`` (used to keep a seed
   client's history in error replies) and the original bytes to FastAPI.

Errors are rendered by the ``error`` callable given by the app, so each route family keeps its own
error shape (OpenAI envelope on ``/v1``, the seed shape on ``POST /``).
"""

from __future__ import annotations

import email.message
import functools
import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .auth import APIKeys, bearer_token

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: ~300k Chinese characters, far beyond any model's context


@dataclass(frozen=True)
class Limits:
    """What one server allows. ``None`` means "what the model allows"."""

    max_tokens: int | None = None         # largest max_tokens / max_length a request may ask for
    max_prompt_tokens: int | None = None  # prompt tokens, after the oldest turns were dropped
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def __post_init__(self):
        for name in ("max_tokens", "max_prompt_tokens", "max_body_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, not {value!r}")


# error(scope, status, message, *, type_, param, code, headers) -> an ASGI app sending the reply
ErrorRenderer = Callable[..., Any]


class RequestGuard:
    def __init__(self, app, *, keys: APIKeys, max_body_bytes: int, json_routes: Iterable[tuple[str, str]],
                 open_paths: Iterable[str], error: ErrorRenderer, open_routes: Iterable[tuple[str, str]] = (),
                 open_prefixes: Iterable[str] = ()):
        self.app = app
        self.keys = keys
        self.max_body_bytes = max_body_bytes
        self.json_routes = set(json_routes)
        self.open_paths = set(open_paths)
        self.open_routes = set(open_routes)         # (method, path): open for that method only
        self.open_prefixes = tuple(open_prefixes)   # GET/HEAD of any path under these is open
        self.error = error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = _headers(scope)
        path, method = scope["path"], scope["method"]

        if self.keys.enabled and not self._open(method, path):
            authorization = headers.get("authorization")
            if not self.keys.check(authorization):
                if bearer_token(authorization) is None:
                    message = ("this server needs an API key: send the header 'Authorization: Bearer <key>' "
                               "(openai client: OpenAI(base_url=..., api_key='<key>'))")
                else:
                    message = "the API key is not valid: check it with your instructor or the server's owner"
                return await self._fail(scope, receive, send, 401, message, code="invalid_api_key",
                                        headers={"WWW-Authenticate": "Bearer"})

        if (method, path) not in self.json_routes:
            return await self.app(scope, receive, send)

        limit = self.max_body_bytes
        too_big = (f"the request body is larger than this server accepts ({limit} bytes): send a shorter "
                   "prompt or history")
        length = headers.get("content-length")
        if length is not None and length.strip().isdigit() and int(length) > limit:
            return await self._fail(scope, receive, send, 413, too_big, code="request_too_large")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await self._fail(scope, receive, send, 413, too_big, code="request_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)

        content_type = headers.get("content-type")
        if content_type:
            if not _json_in_utf8(content_type):
                return await self._fail(
                    scope, receive, send, 415,
                    f"the body must be JSON in UTF-8 (Content-Type: application/json), not {content_type[:80]!r}; "
                    "curl: -H 'Content-Type: application/json', requests: requests.post(url, json=data)",
                    code="unsupported_media_type")
        if not body.strip():
            return await self._fail(scope, receive, send, 400,
                                    "the request body is empty: send a JSON object", code="invalid_body")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            return await self._fail(
                scope, receive, send, 400,
                f"the request body is not valid UTF-8 (byte 0x{body[exc.start]:02x} at position {exc.start}): "
                "encode the JSON as UTF-8", code="invalid_body")
        try:
            data = json.loads(text)
        except RecursionError:
            return await self._fail(scope, receive, send, 400, "the request body is not valid JSON: "
                                    "it is nested too deeply", code="invalid_json")
        except ValueError as exc:  # JSONDecodeError, or an integer with thousands of digits
            return await self._fail(scope, receive, send, 400, f"the request body is not valid JSON: {exc}",
                                    code="invalid_json")
        where = _lone_surrogate(data)
        if where is not None:
            return await self._fail(scope, receive, send, 400,
                                    f"{where} holds a lone UTF-16 surrogate (like \\ud800), which is not a "
                                    "character: send valid Unicode text", param=where, code="invalid_json")
        scope.setdefault("state", {})["json_body"] = data
        # FastAPI reads JSON only under a JSON content type: make a missing one explicit
        raw = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
        scope = dict(scope, headers=raw + [(b"content-type", b"application/json")])
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then wait for the disconnect, as usual

        return await self.app(scope, replay, send)

    def _open(self, method: str, path: str) -> bool:
        return (path in self.open_paths or (method, path) in self.open_routes
                or (method in ("GET", "HEAD") and bool(self.open_prefixes) and path.startswith(self.open_prefixes)))

    async def _fail(self, scope, receive, send, status, message, *, param=None, code=None, headers=None):
        response = self.error(scope, status, message, type_=_type_for(status), param=param, code=code,
                              headers=headers)
        await response(scope, receive, send)


@functools.lru_cache(maxsize=64)
def _json_in_utf8(content_type: str) -> bool:
    """Whether a Content-Type header says JSON in UTF-8 (remembered: clients send the same few)."""
    parsed = email.message.Message()
    parsed["content-type"] = content_type
    subtype = parsed.get_content_subtype()
    json_type = parsed.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))
    charset = parsed.get_param("charset") or "utf-8"
    charset = charset.lower() if isinstance(charset, str) else "utf-8"
    return json_type and charset.replace("_", "-") in ("utf-8", "utf8")


def _type_for(status: int) -> str:
    return "invalid_request_error" if status < 500 else "server_error"


def _headers(scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in scope.get("headers", []):
        out.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
    return out


def _lone_surrogate(data) -> str | None:
    """The JSON path of the first string (or key) holding a lone surrogate, else None."""
    stack = [(data, "body")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if _has_surrogate(value):
                return path
        elif isinstance(value, dict):
            for k, v in value.items():
                if _has_surrogate(k):
                    return path
                stack.append((v, k if path == "body" else f"{path}.{k}"))
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(value))
    return None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
