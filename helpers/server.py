"""The HTTP layer: the seed tutorials' ``POST /`` and an OpenAI-compatible ``/v1`` API.

It never touches torch: requests go to the ``Engine`` and the endpoints await its handles, so the
event loop stays free (``/health`` answers while the model generates).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .engine import Engine, EngineError, EngineStopped, GenerationFailed, QueueFull, SamplingParams
from .formats import ChatFormatError, history_to_messages, messages_to_history

# --------------------------------------------------------------------------- request/response models


class SeedRequest(BaseModel):
    """The seed tutorials' request body (all fields but ``prompt`` optional)."""

    model_config = ConfigDict(extra="ignore")
    prompt: str
    history: Optional[list[list[str]]] = None
    max_length: Optional[int] = Field(None, ge=1, description="new tokens to generate at most")
    top_p: Optional[float] = Field(None, gt=0, le=1)
    temperature: Optional[float] = Field(None, ge=0, le=2, description="0 means greedy decoding")
    repetition_penalty: Optional[float] = Field(None, gt=0, le=2)


class SeedResponse(BaseModel):
    response: str
    history: list[list[str]]
    status: int
    time: str


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[ChatMessage] = Field(..., min_length=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    n: int = Field(1, ge=1, le=1, description="only one choice per request")
    seed: Optional[int] = None
    # not OpenAI's, but understood by vLLM and others (openai client: extra_body={...})
    top_k: Optional[int] = Field(None, ge=0)
    repetition_penalty: Optional[float] = Field(None, gt=0, le=2)
    ignore_eos: bool = Field(False, description="generate max_tokens tokens even past a stop token (benchmarks)")
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
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
    finish_reason: Optional[str]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "helpers"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --------------------------------------------------------------------------- errors


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def _envelope(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())


def _engine_error(exc: Exception) -> APIError:
    if isinstance(exc, QueueFull):
        return APIError(429, str(exc), "rate_limit_exceeded", code="queue_full",
                        headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, EngineStopped):
        return APIError(503, "the model is not ready (loading or shutting down): try again shortly",
                        "service_unavailable", code="not_ready", headers={"Retry-After": "5"})
    if isinstance(exc, ChatFormatError):
        return APIError(400, str(exc), param="messages")
    if isinstance(exc, GenerationFailed):
        return APIError(500, str(exc), "server_error", code="generation_failed")
    return APIError(500, f"{type(exc).__name__}: {exc}", "server_error")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        field = ".".join(loc) or "body"
        param = param or field
        parts.append(f"{field}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request", param


# --------------------------------------------------------------------------- the app


def create_app(engine: Engine, *, title: str | None = None) -> FastAPI:
    """A FastAPI app serving ``engine``'s model: ``POST /`` (seed API), ``GET /health``,
    ``GET /v1/models`` and ``POST /v1/chat/completions``."""
    loaded = engine.loaded
    model_name = loaded.name
    aliases = {model_name.lower()}
    try:
        from .registry import spec_for_family

        spec = spec_for_family(loaded.family)
        aliases |= {spec.name.lower(), spec.model_id.lower(), spec.display_name.lower(),
                    spec.model_id.split("/")[-1].lower()}
    except KeyError:  # pragma: no cover
        pass
    created = int(time.time())
    app = FastAPI(title=title or f"{model_name} API", version="1.0")
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        if request.url.path.startswith("/v1"):
            body = _envelope(exc.message, exc.type, exc.param, exc.code)
        else:
            body = {"response": "", "history": [], "status": exc.status, "time": _now(), "error": exc.message}
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        if request.url.path.startswith("/v1"):
            return JSONResponse(_envelope(message, "invalid_request_error", param), status_code=400)
        return JSONResponse({"response": "", "history": [], "status": 422, "time": _now(), "error": message},
                            status_code=422)

    def params_from(body, max_new_tokens, stop=None) -> SamplingParams:
        return engine.params(max_new_tokens=max_new_tokens, temperature=body.temperature, top_p=body.top_p,
                             top_k=getattr(body, "top_k", None), repetition_penalty=body.repetition_penalty,
                             stop=stop or None, seed=getattr(body, "seed", None),
                             ignore_eos=getattr(body, "ignore_eos", None) or None)

    def submit(messages, params):
        try:
            return engine.submit(messages, params)
        except (EngineError, ChatFormatError) as exc:
            raise _engine_error(exc) from exc

    async def finish(handle):
        try:
            return await handle.aresult()
        except EngineError as exc:
            raise _engine_error(exc) from exc
        finally:
            handle.cancel()  # no-op when finished; frees the slot if the client went away

    @app.get("/health")
    async def health():
        return {"status": "ok" if engine.alive else "stopped", "model": model_name, "family": loaded.family,
                "device": loaded.device, "running": engine.running, "waiting": engine.waiting}

    @app.get("/v1/models", response_model=ModelList)
    async def list_models():
        return ModelList(data=[ModelCard(id=model_name, created=created)])

    @app.post("/", response_model=SeedResponse)
    async def seed_chat(body: SeedRequest):
        try:
            messages = history_to_messages(body.prompt, body.history)
        except ChatFormatError as exc:
            raise APIError(422, str(exc), param="history") from exc
        handle = submit(messages, params_from(body, body.max_length))
        result = await finish(handle)
        response = loaded.chat_format.postprocess(result.text)
        history = messages_to_history(messages) + [[body.prompt, response]]
        return SeedResponse(response=response, history=history, status=200, time=_now())

    @app.post("/v1/chat/completions", response_model=ChatCompletion)
    async def chat_completions(body: ChatCompletionRequest):
        if body.model.lower() not in aliases:
            raise APIError(404, f"the model {body.model!r} does not exist here: this server serves "
                                f"{model_name!r} (see GET /v1/models)", param="model", code="model_not_found")
        stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        max_new = body.max_completion_tokens or body.max_tokens
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        handle = submit(messages, params_from(body, max_new, stop))
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        if not body.stream:
            result = await finish(handle)
            return ChatCompletion(
                id=completion_id, created=now, model=model_name,
                choices=[Choice(message=ResponseMessage(content=loaded.chat_format.postprocess(result.text)),
                                finish_reason=_openai_finish(result.finish_reason))],
                usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                            total_tokens=result.prompt_tokens + result.completion_tokens))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(handle, completion_id, now, model_name, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


async def _coalesced(handle):
    """The handle's events, with text that piled up while the client was being written to merged
    into one event (fewer, larger chunks when the server is busy; one token each when it is not)."""
    from .engine import Event

    queue = handle._async_events
    async for event in handle:
        text, finish, error = event.text, event.finish_reason, event.error
        while finish is None and not queue.empty():
            more = queue.get_nowait()
            text += more.text
            finish, error = more.finish_reason, more.error
        if finish is not None and text:
            yield Event(text=text)
            text = ""
        yield Event(text=text, finish_reason=finish, error=error)
        if finish is not None:
            return


def _openai_finish(reason: str | None) -> str:
    return "length" if reason in ("length", "timeout") else "stop"


async def _sse(handle, completion_id: str, created: int, model: str, include_usage: bool):
    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None, choices=True) -> str:
        body: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                "model": model,
                                "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                             "logprobs": None}] if choices else []}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for event in _coalesced(handle):
            if event.text:
                yield chunk({"content": event.text})
            if event.finish_reason is None:
                continue
            if event.finish_reason == "error":
                err = _envelope(event.error or "generation failed", "server_error", code="generation_failed")
                yield f"data: {json.dumps(err, ensure_ascii=False)}\n\n"
                break
            usage = {"prompt_tokens": handle.prompt_tokens, "completion_tokens": handle.completion_tokens,
                     "total_tokens": handle.prompt_tokens + handle.completion_tokens}
            yield chunk({}, _openai_finish(event.finish_reason), None if include_usage else usage)
            if include_usage:
                yield chunk({}, usage=usage, choices=False)
        yield "data: [DONE]\n\n"
    finally:
        handle.cancel()  # the client disconnected (or we are done): stop generating


class LoadingApp:
    """An ASGI app that answers while the model is still loading: ``GET /health`` says so, every
    other route answers 503 with ``Retry-After``; once ``ready(app)`` is called, everything goes to
    the real app. Lets ``python -m helpers serve`` open its port at once."""

    def __init__(self, name: str, retry_after: int = 10):
        self.name, self.retry_after = name, retry_after
        self.app = None
        self.error: str | None = None

    def ready(self, app) -> None:
        self.app = app

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
        if scope["path"] == "/health":
            status, body, headers = 200, {"status": state, "model": self.name, "error": self.error}, {}
        else:
            message = (f"the model failed to load: {self.error}" if self.error else
                       f"the model {self.name} is still loading: try again in a few seconds")
            status, headers = 503, {"Retry-After": str(self.retry_after)}
            if scope["path"].startswith("/v1"):
                body = _envelope(message, "service_unavailable", code="model_loading")
            else:
                body = {"response": "", "history": [], "status": 503, "time": _now(), "error": message}
        await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)
