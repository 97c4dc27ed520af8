"""The HTTP layer: the seed tutorials' ``POST /`` and an OpenAI-compatible ``/v1`` API.

It never touches torch: requests go to the ``Engine`` and the endpoints await its handles, so the
event loop stays free (``/health`` answers while the model generates).

What it promises under bad input, overload and faults (README: "坏输入、过载与故障"):

* every request field is checked; a bad one gets a 4xx whose body names the field and says what to
  fix: the OpenAI envelope ``{"error": {"message", "type", "param", "code"}}`` on ``/v1``, and on
  ``POST /`` the seed shape ``{"response": "", "history": <the client's history>, "status": <code>,
  "time", "error": {...same envelope fields...}}`` (400 malformed body, 401 key, 404 unknown model,
  413 body too large, 415 not JSON, 422 a seed field, 429 queue full, with ``Retry-After``);
* a fault while generating fails that request only: 503 for out-of-memory or a shutdown (try again),
  500 for anything else, in the same shapes; a stream ends with an error event and ``[DONE]``;
* a client that goes away cancels its generation; a shutdown ends running requests with 503.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .auth import APIKeys
from .engine import EngineError, EngineStopped, GenerationFailed, Generator, QueueFull, SamplingParams
from .formats import ChatFormatError, PromptTooLong, history_to_messages, messages_to_history
from .limits import DEFAULT_MAX_BODY_BYTES, Limits, RequestGuard

# Temperatures this close to 0 are greedy decoding: dividing logits by 1e-300 overflows to NaN.
GREEDY_BELOW = 1e-5
MAX_STOP = 4          # stop strings per request (as OpenAI)
MAX_STOP_CHARS = 200  # characters per stop string
OPEN_PATHS = ("/health", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
# the chat page (GET /) and its files: open without a key (the page asks for it)
OPEN_ROUTES = (("GET", "/"), ("HEAD", "/"))
STATIC_PREFIX = "/static/"
STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8"}

# Strict: "temperature": "0.7" or "stream": "yes" are errors, not guesses; NaN/Infinity are refused.
REQUEST = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

# --------------------------------------------------------------------------- request/response models


def _text_content(value):
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for i, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                continue
            if isinstance(kind, str) and kind != "text":
                raise ValueError(f"part {i} is of type {kind[:40]!r}: this model reads text only "
                                 "(parts must be {\"type\": \"text\", \"text\": \"...\"})")
            raise ValueError(f"part {i} must be {{\"type\": \"text\", \"text\": \"...\"}}")
        return value
    raise ValueError("must be a string, or a list of {\"type\": \"text\", \"text\": \"...\"} parts")


def _stop_strings(value):
    if value is None:
        return value
    items = [value] if isinstance(value, str) else value
    if (not isinstance(items, list) or len(items) > MAX_STOP
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in items)):
        raise ValueError(f"must be a string or a list of at most {MAX_STOP} strings, each 1 to "
                         f"{MAX_STOP_CHARS} characters")
    return value


def _integral(value):
    """JSON has one number type: 16.0 is the integer 16 (JSON Schema agrees); 16.5 is not."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


def Int(**constraints):
    """An integer field (constraints inside, so that they show in the JSON schema)."""
    return Annotated[int, Field(**constraints), BeforeValidator(_integral)]


NonBlank = Annotated[str, Field(pattern=r"\S")]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
HistoryTurn = Annotated[list[str], Field(min_length=2, max_length=2)]


class SeedRequest(BaseModel):
    """The seed tutorials' request body (all fields but ``prompt`` optional)."""

    model_config = REQUEST
    prompt: NonBlank = Field(..., description="the new question")
    history: Optional[list[HistoryTurn]] = Field(None, description="earlier [question, answer] pairs")
    max_length: Optional[Int(ge=1)] = Field(None, description="new tokens to generate at most")
    top_p: Optional[float] = Field(None, gt=0, le=1)
    temperature: Optional[float] = Field(None, ge=0, le=2, description="0 means greedy decoding")
    repetition_penalty: Optional[float] = Field(None, ge=0.1, le=2)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """The OpenAI error envelope."""

    error: ErrorDetail


class SeedResponse(BaseModel):
    response: str
    history: list[list[str]]
    status: int
    time: str


class SeedErrorResponse(SeedResponse):
    """The seed shape with a non-200 ``status``; ``history`` is the client's, unchanged."""

    error: ErrorDetail


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = REQUEST
    role: Literal["system", "user", "assistant", "developer"] = Field(
        ..., description="'developer' is read as 'system'")
    content: Annotated[Union[str, list[TextPart]], BeforeValidator(_text_content)]
    name: Optional[str] = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = REQUEST
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = REQUEST
    model: str
    messages: list[ChatMessage] = Field(..., min_length=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    max_tokens: Optional[Int(ge=1)] = None
    max_completion_tokens: Optional[Int(ge=1)] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Annotated[Optional[Union[StopString, Annotated[list[StopString], Field(max_length=MAX_STOP)]]],
                    BeforeValidator(_stop_strings)] = None
    n: Int(ge=1, le=1) = Field(1, description="only one choice per request")
    seed: Optional[Int(ge=0, le=2**53)] = None  # 2**53: the largest integer every JSON parser keeps exact
    # not OpenAI's, but understood by vLLM and others (openai client: extra_body={...})
    top_k: Optional[Int(ge=0, lt=2**31)] = None
    repetition_penalty: Optional[float] = Field(None, ge=0.1, le=2)
    ignore_eos: bool = Field(False, description="generate max_tokens tokens even past a stop token (benchmarks)")
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2, description="accepted, not applied")
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2, description="accepted, not applied")
    logprobs: Optional[Literal[False]] = Field(None, description="not supported: false or absent")
    tools: Optional[Annotated[list[dict[str, Any]], Field(max_length=0)]] = Field(
        None, description="function calling is not supported: empty or absent")
    user: Optional[str] = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ChunkDelta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    finish_reason: Optional[Literal["stop", "length"]]
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One ``data:`` event of a stream (documentation: the stream is written by ``_sse``)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "helpers"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    """``GET /health``: 200 only when the server can generate (``"ok"``); otherwise 503 with the
    same fields, ``reason`` saying why (and ``Retry-After`` while the model loads)."""

    status: Literal["ok", "loading", "failed", "stopping"]
    model: str
    family: Optional[str] = None
    device: Optional[str] = None
    running: int = 0
    waiting: int = 0
    reason: Optional[str] = None


def health_response(health: Health, retry_after: int | None = None) -> JSONResponse:
    """200 for ``ok``, else 503 (with ``Retry-After`` when given): what a load balancer, ``curl -f``
    or a script waiting for readiness reads."""
    if health.status == "ok":
        return JSONResponse(health.model_dump())
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return JSONResponse(health.model_dump(), status_code=503, headers=headers)


def static_response(name: str) -> Response | None:
    """A file of the chat page (helpers/static), or None if there is no such file."""
    path = STATIC_DIR / name
    if "/" in name or path.suffix not in STATIC_TYPES or not path.is_file():
        return None
    return Response(path.read_bytes(), media_type=STATIC_TYPES[path.suffix],
                    headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})


# --------------------------------------------------------------------------- errors


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


# conversations longer than this (in characters) are tokenized in a worker thread, so that the
# event loop (health checks, other streams) never waits for them
BIG_PROMPT_CHARS = 20_000


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())


def _client_history(scope) -> list[list[str]]:
    """The seed client's own history, to hand back unchanged with an error."""
    body = (scope.get("state") or {}).get("json_body")
    history = body.get("history") if isinstance(body, dict) else None
    if isinstance(history, list) and all(isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t)
                                         for t in history):
        return history
    return []


def error_response(scope, status: int, message: str, *, type_: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None, headers: dict | None = None) -> JSONResponse:
    """An error in the shape of the route: the seed shape on ``/``, the OpenAI envelope elsewhere."""
    error = {"message": message, "type": type_, "param": param, "code": code}
    if scope.get("path") == "/":
        body = {"response": "", "history": _client_history(scope), "status": status, "time": _now(), "error": error}
    else:
        body = {"error": error}
    return JSONResponse(body, status_code=status, headers=headers)


def _failure(message: str) -> APIError:
    """A request that failed while generating: what the client should do about it."""
    lowered = message.lower()
    if "out of memory" in lowered:
        return APIError(503, message, "server_error", code="out_of_memory", headers={"Retry-After": "5"})
    if "shutting down" in lowered:
        return _shutting_down()
    if "worker stopped" in lowered:
        return APIError(503, f"{message}: this request was not finished", "server_error", code="engine_stopped")
    if "vllm server" in lowered and "stopped answering" in lowered:
        return APIError(503, message, "server_error", code="upstream_unavailable", headers={"Retry-After": "5"})
    if "vllm server" in lowered:
        return APIError(502, message, "server_error", code="upstream_error")
    return APIError(500, f"{message} (the server is still running: try again, and tell its owner if this "
                         "repeats)", "server_error", code="generation_failed")


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down (or its engine was stopped) and did not finish this "
                         "request: try again shortly", "server_error", code="shutting_down",
                    headers={"Retry-After": "5"})


def _engine_error(exc: Exception) -> APIError:
    if isinstance(exc, QueueFull):
        return APIError(429, str(exc), "rate_limit_exceeded", code="queue_full",
                        headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, EngineStopped):
        return APIError(503, f"the server cannot generate now: {exc}", "server_error", code="not_ready",
                        headers={"Retry-After": "5"})
    if isinstance(exc, GenerationFailed):
        return _failure(str(exc))
    return APIError(500, f"{type(exc).__name__}: {exc}", "server_error")


# One server-sent event of a stream (OpenAPI 3.1: the schema of a text/event-stream describes an event)
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"anyOf": [
        {"const": "[DONE]"},
        {"type": "string", "contentMediaType": "application/json",
         "contentSchema": {"anyOf": [{"$ref": "#/components/schemas/ChatCompletionChunk"},
                                     {"$ref": "#/components/schemas/ErrorResponse"}]}},
    ]}},
}

_TYPE_TAG = re.compile(r"^[\w-]+\[.*\]$|^(str|int|float|bool|list|dict|none)$")
_HINTS = {
    "prompt": "the question, a non-empty string",
    "history": "a list of [question, answer] pairs of strings",
    "messages": 'a list of {"role": "user", "content": "..."} objects',
    "temperature": "a number from 0 to 2; 0 means greedy decoding",
    "top_p": "a number above 0 and at most 1",
    "top_k": "a whole number; 0 means no limit",
    "max_tokens": "a whole number of new tokens, at least 1",
    "max_completion_tokens": "a whole number of new tokens, at least 1",
    "max_length": "a whole number of new tokens, at least 1",
    "repetition_penalty": "a number from 0.1 to 2; 1 means no penalty",
    "stream": "true or false",
    "n": "only 1 is supported",
    "seed": "a whole number from 0",
    "logprobs": "not supported by this server: leave it out",
    "tools": "function calling is not supported by this server: leave them out",
}
_EXAMPLE = {"/": '{"prompt": "你好", "history": []}',
            "/v1/chat/completions": '{"model": "<GET /v1/models>", "messages": [{"role": "user", "content": "你好"}]}'}


def _param(loc) -> str | None:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and not _TYPE_TAG.match(part):
            out += f".{part}" if out else part
    return out or None


def _validation_message(path: str, exc: RequestValidationError) -> tuple[str, str | None]:
    parts: list[str] = []
    first = None
    for err in exc.errors():
        loc = [p for p in err.get("loc", ()) if p != "body"] if err.get("loc", ("",))[0] == "body" else \
            list(err.get("loc", ()))
        param = _param(loc)
        if param is None:
            text = f"the body must be a JSON object, e.g. {_EXAMPLE.get(path, '{...}')}"
        else:
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            if err.get("type") == "string_pattern_mismatch":
                msg = "must not be empty"
            value = err.get("input")
            got = ""
            if err.get("type") != "missing" and (value is None or isinstance(value, (str, int, float, bool))):
                shown = repr(value)
                got = f", got {shown if len(shown) <= 40 else shown[:37] + '...'}"
            hint = _HINTS.get(param.split("[")[0]) if "." not in param else None
            text = f"{param}: {msg}{got}" + (f" ({hint})" if hint else "")
        first = first or param
        if text not in parts:
            parts.append(text)
    return "; ".join(parts) or "invalid request", first


_MESSAGE_PARAM = re.compile(r"(messages\[\d+\](?:\.\w+)?)")


# --------------------------------------------------------------------------- the app


def create_app(engine: Generator, *, title: str | None = None, api_keys=None, max_tokens_limit: int | None = None,
               max_prompt_tokens: int | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """A FastAPI app serving ``engine``'s model (a ``Generator``: the built-in ``Engine``, or an
    ``UpstreamGenerator`` in front of a vLLM server): ``POST /`` (seed API), ``GET /health``,
    ``GET /v1/models`` and ``POST /v1/chat/completions``, and a chat page for the browser at ``GET /``
    (files in helpers/static, served under ``/static/``; open without a key: the page asks for it).

    ``api_keys``: a key or a list of keys (one per student group); when given, every route but
    ``/health`` and the docs needs ``Authorization: Bearer <key>``. ``max_tokens_limit``: the largest
    ``max_tokens``/``max_length`` a request may ask for (default: what the context allows; a request
    that asks for none gets the model's default, capped at this). ``max_prompt_tokens``: the longest
    prompt after the oldest turns were dropped (default: what the context leaves after the answer).
    ``max_body_bytes``: larger request bodies get 413."""
    loaded = engine.loaded
    model_name = loaded.name
    context = int(loaded.context_length)
    keys = api_keys if isinstance(api_keys, APIKeys) else APIKeys(api_keys)
    limits = Limits(max_tokens=max_tokens_limit, max_prompt_tokens=max_prompt_tokens, max_body_bytes=max_body_bytes)
    token_cap = context - 1 if limits.max_tokens is None else max(1, min(limits.max_tokens, context - 1))
    aliases = {model_name.lower()}
    try:
        from .registry import spec_for_family

        spec = spec_for_family(loaded.family)
        aliases |= {spec.name.lower(), spec.model_id.lower(), spec.display_name.lower(),
                    spec.model_id.split("/")[-1].lower()}
    except KeyError:  # pragma: no cover
        pass
    created = int(time.time())
    app = FastAPI(title=title or f"{model_name} API", version="1.0",
                  description="Seed API (`POST /`) and OpenAI-compatible API (`/v1`)."
                  + (" Generation routes need `Authorization: Bearer <key>`." if keys.enabled else ""))
    app.state.engine = engine
    app.state.limits = limits
    app.state.api_keys = keys  # digests only; its repr says how many
    inflight: set = set()
    app.state.inflight = inflight
    app.state.draining = False

    def drain() -> None:
        """Refuse new requests and stop the running ones (they answer 503): called on shutdown."""
        app.state.draining = True
        for handle in list(inflight):
            handle.cancel()

    app.state.drain = drain
    app.add_middleware(RequestGuard, keys=keys, max_body_bytes=limits.max_body_bytes,
                       json_routes=[("POST", "/"), ("POST", "/v1/chat/completions")], open_paths=OPEN_PATHS,
                       open_routes=OPEN_ROUTES, open_prefixes=(STATIC_PREFIX,), error=error_response)
    auth = [Security(HTTPBearer(auto_error=False, description="one of the server's API keys"))] if keys.enabled else []

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(request.scope, exc.status, exc.message, type_=exc.type, param=exc.param,
                              code=exc.code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(request.url.path, exc)
        status = 422 if request.url.path == "/" else 400
        return error_response(request.scope, status, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = (f"there is no {request.url.path} here: this server has POST /, GET / (a chat page), "
                       "GET /health, GET /v1/models and POST /v1/chat/completions")
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
            if request.url.path in ("/", "/v1/chat/completions"):
                message += ": send a POST with a JSON body"
        else:
            message = str(exc.detail)
        return error_response(request.scope, exc.status_code, message, type_="invalid_request_error",
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return error_response(request.scope, 500, f"internal error ({type(exc).__name__}): the server is still "
                              "running; tell its owner if this repeats", type_="server_error")

    def refuse_if_draining() -> None:
        if app.state.draining:
            raise _shutting_down()

    def max_new_tokens(value: int | None, field: str, status: int) -> int:
        if value is None:
            return min(engine.params().max_new_tokens, token_cap)
        if value > token_cap:
            if token_cap < context - 1:
                message = f"{field} is {value}, more than this server allows: ask for at most {token_cap}"
            else:
                message = (f"{field} is {value}, but {model_name} has a {context}-token context for the prompt "
                           f"and the answer together: ask for at most {context - 1} (fewer with a long prompt)")
            raise APIError(status, message, param=field, code="invalid_value")
        return value

    def sampling(body, max_new: int, stop=None) -> SamplingParams:
        temperature = body.temperature
        if temperature is not None and temperature < GREEDY_BELOW:
            temperature = 0.0
        return engine.params(max_new_tokens=max_new, temperature=temperature, top_p=body.top_p,
                             top_k=getattr(body, "top_k", None), repetition_penalty=body.repetition_penalty,
                             stop=stop or None, seed=getattr(body, "seed", None),
                             ignore_eos=getattr(body, "ignore_eos", None) or None)

    async def submit(messages, params: SamplingParams, *, seed: bool):
        status = 422 if seed else 400
        try:
            if sum(len(m["content"]) for m in messages) > BIG_PROMPT_CHARS:
                # tokenizing a long conversation takes a while: not on the event loop
                handle = await run_in_threadpool(engine.submit, messages, params,
                                                 max_prompt_tokens=limits.max_prompt_tokens)
            else:
                handle = engine.submit(messages, params, max_prompt_tokens=limits.max_prompt_tokens)
        except PromptTooLong as exc:
            why = (f"this server allows prompts of {limits.max_prompt_tokens} tokens"
                   if limits.max_prompt_tokens is not None and exc.allowed == limits.max_prompt_tokens else
                   f"{model_name}'s {context}-token context leaves {exc.allowed} for the prompt after "
                   f"{params.max_new_tokens} new tokens")
            field, param = ("max_length", "prompt") if seed else ("max_tokens", "messages")
            raise APIError(status, f"{param}: the prompt is {exc.tokens} tokens even after dropping the oldest "
                                   f"turns, but {why}: shorten the last message or lower {field}",
                           param=param, code="context_length_exceeded") from exc
        except ChatFormatError as exc:
            found = _MESSAGE_PARAM.search(str(exc))
            param = "history" if seed else (found.group(1) if found else "messages")
            message = str(exc) if str(exc).startswith(param) else f"{param}: {exc}"
            raise APIError(status, message, param=param) from exc
        except EngineError as exc:
            raise _engine_error(exc) from exc
        inflight.add(handle)
        return handle

    async def finish(request: Request, handle):
        watcher = asyncio.ensure_future(_cancel_on_disconnect(request, handle))
        try:
            result = await handle.aresult()
        except EngineError as exc:
            raise _engine_error(exc) from exc
        finally:
            watcher.cancel()
            handle.cancel()  # no-op when finished; frees the slot if the client went away
            inflight.discard(handle)
        if result.finish_reason == "cancelled":  # not by this client: it is still here
            raise _shutting_down()
        return result

    def error_responses(*codes: int, seed: bool = False) -> dict:
        model = SeedErrorResponse if seed else ErrorResponse
        return {code: {"model": model} for code in codes}

    def static_file(name: str) -> Response:
        response = static_response(name)
        if response is None:
            raise StarletteHTTPException(404)
        return response

    @app.get("/", include_in_schema=False)
    async def chat_page():
        """The chat page (helpers/static/chat.html): open in a browser at the server's address."""
        return static_file("chat.html")

    @app.get(STATIC_PREFIX + "{name}", include_in_schema=False)
    async def static(name: str):
        return static_file(name)

    @app.get("/health", response_model=Health,
             responses={503: {"model": Health, "description": "cannot generate now (loading, failed or stopping)"}})
    async def health():
        if app.state.draining:
            status, reason = "stopping", "the server is shutting down"
        else:
            status, reason = engine.status()
        return health_response(Health(status=status, model=model_name, family=loaded.family,
                                      device=str(loaded.device), running=engine.running, waiting=engine.waiting,
                                      reason=reason), 5 if status == "loading" else None)

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        """Prometheus text format: requests running/waiting, rejected, tokens, TTFT and latency."""
        from fastapi.responses import PlainTextResponse

        text = engine.metrics.render(model=model_name, running=engine.running, waiting=engine.waiting)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", response_model=ModelList, dependencies=auth,
             responses=error_responses(*((401,) if keys.enabled else ())))
    async def list_models():
        return ModelList(data=[ModelCard(id=model_name, created=created)])

    @app.post("/", response_model=SeedResponse, dependencies=auth,
              responses=error_responses(400, 401, 413, 415, 422, 429, 500, 503, seed=True))
    async def seed_chat(body: SeedRequest, request: Request):
        refuse_if_draining()
        try:
            messages = history_to_messages(body.prompt, body.history)
        except ChatFormatError as exc:
            raise APIError(422, str(exc), param="history") from exc
        params = sampling(body, max_new_tokens(body.max_length, "max_length", 422))
        handle = await submit(messages, params, seed=True)
        result = await finish(request, handle)
        response = loaded.chat_format.postprocess(result.text)
        history = messages_to_history(messages) + [[body.prompt, response]]
        return SeedResponse(response=response, history=history, status=200, time=_now())

    stream_doc = {200: {"description": "A chat completion, or with `stream: true` server-sent events: "
                                       "chunks, then `data: [DONE]` (an error envelope before it if "
                                       "generation failed)",
                        "content": {"text/event-stream": {"schema": SSE_EVENT}}}}

    @app.post("/v1/chat/completions", response_model=ChatCompletion, dependencies=auth,
              responses={**stream_doc, **error_responses(400, 401, 404, 413, 415, 429, 500, 503)})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        refuse_if_draining()
        if body.model.lower() not in aliases:
            raise APIError(404, f"the model {body.model[:100]!r} does not exist here: this server serves "
                                f"{model_name!r} (see GET /v1/models)", param="model", code="model_not_found")
        messages = []
        for i, m in enumerate(body.messages):
            text = m.text()
            if m.role == "user" and not text.strip():
                raise APIError(400, f"messages[{i}].content is empty: write the user's message",
                               param=f"messages[{i}].content")
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": text})
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_new = max_new_tokens(body.max_completion_tokens or body.max_tokens, field, 400)
        stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        handle = await submit(messages, sampling(body, max_new, stop), seed=False)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        if not body.stream:
            result = await finish(request, handle)
            return ChatCompletion(
                id=completion_id, created=now, model=model_name,
                choices=[Choice(message=ResponseMessage(content=loaded.chat_format.postprocess(result.text)),
                                finish_reason=_openai_finish(result.finish_reason))],
                usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                            total_tokens=result.prompt_tokens + result.completion_tokens))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _EventStream(_sse(handle, completion_id, now, model_name, include_usage, inflight),
                            media_type="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def openapi() -> dict:
        """FastAPI's schema, with this server's limit on the answer length written in."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            models = schema.setdefault("components", {}).setdefault("schemas", {})
            chunk = ChatCompletionChunk.model_json_schema(ref_template="#/components/schemas/{model}")
            models.update(chunk.pop("$defs", {}))
            models["ChatCompletionChunk"] = chunk
            for model, fields in (("SeedRequest", ("max_length",)),
                                  ("ChatCompletionRequest", ("max_tokens", "max_completion_tokens"))):
                for name in fields:
                    prop = models.get(model, {}).get("properties", {}).get(name, {})
                    for option in prop.get("anyOf", [prop]):
                        if option.get("type") == "integer":
                            option["maximum"] = token_cap
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


async def _coalesced(handle):
    """The handle's events, with text that piled up while the client was being written to merged
    into one event (fewer, larger chunks when the server is busy; one token each when it is not)."""
    from .engine import Event

    queue = handle._bind()
    async for event in handle:
        text, finish, error = event.text, event.finish_reason, event.error
        while finish is None and not queue.empty():
            more = queue.get_nowait()
            text += more.text
            finish, error = more.finish_reason, more.error
        yield Event(text=text, finish_reason=finish, error=error)
        if finish is not None:
            return


async def _cancel_on_disconnect(request: Request, handle) -> None:
    """Cancel ``handle`` when the client hangs up (non-streaming requests wait for their answer)."""
    try:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                handle.cancel()
                return
    except Exception:  # the connection is gone in some other way: nothing to watch
        return


def _openai_finish(reason: str | None) -> str:
    return "length" if reason in ("length", "timeout") else "stop"


def _error_event(error: APIError) -> str:
    body = {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


class _Last(str):
    """The last chunk of an event stream."""


class _EventStream(StreamingResponse):
    """A ``StreamingResponse`` that sends its ``_Last`` chunk together with the end of the
    response (one write to the socket instead of two, for every streamed answer)."""

    async def stream_response(self, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        ended = False
        async for chunk in self.body_iterator:  # read to its end: the generator's cleanup runs
            ended = isinstance(chunk, _Last)
            await send({"type": "http.response.body", "body": chunk.encode(self.charset), "more_body": not ended})
        if not ended:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _sse(handle, completion_id: str, created: int, model: str, include_usage: bool, inflight: set):
    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None, choices=True) -> str:
        body: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                "model": model,
                                "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                             "logprobs": None}] if choices else []}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    # a content chunk is this template around the JSON-encoded text
    head, tail = chunk({"content": "\0"}).split('"\\u0000"')

    # What is ready at one moment goes out in one write: the role chunk with the first text, the
    # last text with the finish chunk, the usage and [DONE] (fewer sends for the event loop).
    out = chunk({"role": "assistant", "content": ""})
    try:
        try:
            async for event in _coalesced(handle):
                if event.text:
                    out += head + json.dumps(event.text, ensure_ascii=False) + tail
                if event.finish_reason is None:
                    if out:
                        yield out
                        out = ""
                    continue
                if event.finish_reason == "error":
                    out += _error_event(_failure(event.error or "generation failed"))
                    break
                if event.finish_reason == "cancelled":  # not by this client: it is still reading
                    out += _error_event(_shutting_down())
                    break
                usage = {"prompt_tokens": handle.prompt_tokens, "completion_tokens": handle.completion_tokens,
                         "total_tokens": handle.prompt_tokens + handle.completion_tokens}
                out += chunk({}, _openai_finish(event.finish_reason), None if include_usage else usage)
                if include_usage:
                    out += chunk({}, usage=usage, choices=False)
        except Exception as exc:  # the response has started: the error goes into the stream
            out += _error_event(APIError(500, f"internal error ({type(exc).__name__}): try again",
                                         "server_error"))
        yield _Last(out + "data: [DONE]\n\n")
    finally:
        handle.cancel()  # the client disconnected (or we are done): stop generating
        inflight.discard(handle)


class LoadingApp:
    """An ASGI app that answers while the model is still loading: ``GET /health`` says so (503),
    the chat page is served (it shows that the model is loading and tries again), every other
    route answers 503 with ``Retry-After``; once ``ready(app)`` is called, everything goes to the
    real app. Lets ``python -m helpers serve`` open its port at once."""

    def __init__(self, name: str, retry_after: int = 10):
        self.name, self.retry_after = name, retry_after
        self.app = None
        self.error: str | None = None

    def ready(self, app) -> None:
        self.app = app

    @property
    def state(self):
        """The real app's state once loaded (its ``drain()`` ends running requests at shutdown)."""
        from types import SimpleNamespace

        return self.app.state if self.app is not None else SimpleNamespace()

    def failed(self, message: str) -> None:
        self.error = message

    async def __call__(self, scope, receive, send):
        if self.app is not None:
            return await self.app(scope, receive, send)
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        state = "failed" if self.error else "loading"
        path = scope["path"]
        page = None
        if scope["method"] in ("GET", "HEAD") and (path == "/" or path.startswith(STATIC_PREFIX)):
            page = static_response("chat.html" if path == "/" else path[len(STATIC_PREFIX):])
        if page is not None:
            response = page
        elif path == "/health":
            reason = (f"the model failed to load: {self.error}" if self.error
                      else f"the model {self.name} is still loading")
            response = health_response(Health(status=state, model=self.name, reason=reason),
                                       None if self.error else self.retry_after)
        else:
            message = (f"the model failed to load: {self.error}" if self.error else
                       f"the model {self.name} is still loading: try again in a few seconds")
            response = error_response(scope, 503, message, type_="service_unavailable", code="model_loading",
                                      headers={"Retry-After": str(self.retry_after)})
        await response(scope, receive, send)
