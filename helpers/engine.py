"""The engine: one worker thread owns the model; requests wait in a bounded queue.

The HTTP layer never touches torch: it calls ``engine.submit(messages, params)`` and reads the
returned ``RequestHandle`` (blocking iteration, ``async for``, or ``result()``). The worker turns
each request into prompt ids with the family's chat format, generates with ``model.generate`` and a
streamer, and pushes text deltas to the handle as they are decoded.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from .formats import ChatFormatError, Message


class EngineError(RuntimeError):
    """Base class of the errors a request can end with."""


class QueueFull(EngineError):
    """Too many requests are waiting; try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class EngineStopped(EngineError):
    pass


class GenerationFailed(EngineError):
    pass


@dataclass
class SamplingParams:
    """Per-request generation settings. ``temperature == 0`` means greedy decoding;
    ``max_new_tokens`` counts generated tokens only (not the prompt)."""

    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    timeout: float | None = None  # seconds from submission; the request ends with finish_reason "timeout"

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class Event:
    text: str = ""                   # new answer text since the previous event
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "timeout" | "error" on the last event
    error: str | None = None


@dataclass
class Result:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float


_ids = itertools.count(1)


class RequestHandle:
    """One request: read its events from any thread, or from asyncio code."""

    def __init__(self, messages: Sequence[Message], params: SamplingParams):
        self.id = f"req-{next(_ids)}-{uuid.uuid4().hex[:8]}"
        self.messages = list(messages)
        self.params = params
        self.created = time.time()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.error: str | None = None
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self._events: queue.Queue[Event] = queue.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async_events: asyncio.Queue | None = None
        try:
            self._loop = asyncio.get_running_loop()
            self._async_events = asyncio.Queue()
        except RuntimeError:
            pass

    # -- producer side (engine worker)
    def _push(self, event: Event) -> None:
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
            self.error = event.error
        # Always fill the thread-safe queue too: code in a notebook cell runs inside the kernel's
        # event loop, yet reads the handle synchronously (engine.chat, `for event in handle`).
        self._events.put(event)
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._async_events.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                self._cancelled.set()
        if event.finish_reason is not None:
            self._done.set()

    # -- consumer side
    def cancel(self) -> None:
        """Stop generating for this request (within a step); its slot is freed."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self._events.get()
            yield event
            if event.finish_reason is not None:
                return

    async def __aiter__(self):
        if self._async_events is None:
            raise RuntimeError("this handle was created outside an event loop: iterate it normally")
        while True:
            event = await self._async_events.get()
            yield event
            if event.finish_reason is not None:
                return

    def _result(self, texts: list[str], started: float) -> Result:
        if self.finish_reason == "error":
            raise GenerationFailed(self.error or "generation failed")
        return Result("".join(texts), self.finish_reason or "stop", self.prompt_tokens,
                      self.completion_tokens, time.time() - started)

    def result(self) -> Result:
        started = self.created
        return self._result([e.text for e in self], started)

    async def aresult(self) -> Result:
        texts = [e.text async for e in self]
        return self._result(texts, self.created)


class _Detokenizer:
    """Turns generated ids into text deltas; cuts at stop strings, holding back text that may be
    the start of one, and never emits half a UTF-8 character."""

    def __init__(self, tokenizer, stop_strings: Sequence[str]):
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        self.ids: list[int] = []
        self.text = ""       # decoded so far (complete characters)
        self.emitted = 0     # characters of self.text already sent
        self.stopped = False

    def add(self, token_ids: Sequence[int]) -> str:
        self.ids.extend(int(t) for t in token_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""  # wait for the rest of the character
        self.text = text
        for s in self.stop_strings:
            pos = text.find(s, max(0, self.emitted - len(s)))
            if pos != -1:
                self.text = text = text[:pos]
                self.stopped = True
        if self.stopped:
            return self._take(len(text))
        hold = 0
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return self._take(len(text) - hold)

    def flush(self) -> str:
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta = self.text[self.emitted:upto]
        self.emitted = upto
        return delta


class Engine:
    """Serve generation requests for one loaded model from a single worker thread.

    ``max_queue`` bounds how many requests may wait; beyond it ``submit`` raises ``QueueFull``.
    """

    def __init__(self, loaded, *, max_queue: int = 64, default_timeout: float | None = None):
        self.loaded = loaded
        self.max_queue = max_queue
        self.default_timeout = default_timeout
        self._queue: queue.Queue[RequestHandle | None] = queue.Queue()
        self._waiting = 0
        self._running: RequestHandle | None = None
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.stats = {"requests": 0, "completed": 0, "failed": 0, "cancelled": 0, "rejected": 0,
                      "prompt_tokens": 0, "completion_tokens": 0}

    # -- lifecycle
    def start(self) -> "Engine":
        if self._thread is None or not self._thread.is_alive():
            self._stopping.clear()
            self._thread = threading.Thread(target=self._work, name="llm-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker: the running request is cancelled, waiting ones end with an error."""
        self._stopping.set()
        running = self._running
        if running is not None:
            running.cancel()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        while True:
            try:
                handle = self._queue.get_nowait()
            except queue.Empty:
                break
            if handle is not None and not handle.done:
                handle._push(Event(finish_reason="error", error="the server is shutting down"))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def running(self) -> int:
        return 1 if self._running is not None else 0

    # -- requests
    def submit(self, messages: Sequence[Message], params: SamplingParams | None = None, *,
               max_prompt_tokens: int | None = None) -> RequestHandle:
        """Queue a chat request. Raises ``ChatFormatError`` for messages the model's format cannot
        take (``PromptTooLong`` when the prompt does not fit even after dropping the oldest turns),
        ``QueueFull`` when too many requests wait, ``EngineStopped`` when not running.

        The prompt gets what the context leaves after ``max_new_tokens``, and at most
        ``max_prompt_tokens`` when given (a server's limit)."""
        if not self.alive or self._stopping.is_set():
            raise EngineStopped("the engine is not running")
        params = params or SamplingParams()
        fmt = self.loaded.chat_format
        messages = fmt.check(messages)
        handle = RequestHandle(messages, params)
        budget = self.loaded.context_length - params.max_new_tokens
        if budget <= 0:
            raise ChatFormatError(
                f"max_tokens {params.max_new_tokens} leaves no room for the prompt in the "
                f"{self.loaded.context_length}-token context: lower it")
        if max_prompt_tokens is not None:
            budget = min(budget, max_prompt_tokens)
        with self._tokenizer_lock:
            handle._prompt_ids = fmt.encode_within(self.loaded.tokenizer, messages, budget)
        handle.prompt_tokens = len(handle._prompt_ids)
        with self._lock:
            if self._waiting >= self.max_queue:
                self.stats["rejected"] += 1
                raise QueueFull(f"{self._waiting} requests are already waiting: try again shortly")
            self._waiting += 1
            self.stats["requests"] += 1
        self._queue.put(handle)
        return handle

    def generate(self, messages: Sequence[Message], params: SamplingParams | None = None) -> Result:
        """Blocking convenience: submit and wait for the whole answer."""
        handle = self.submit(messages, params)
        return handle.result()

    def params(self, **overrides) -> SamplingParams:
        """Sampling settings: the model's vendor defaults, with ``overrides`` that are not None
        (``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``, ``repetition_penalty``, ``stop``,
        ``seed``, ``timeout``)."""
        d = self.loaded.generation_defaults
        values = {key: d[key] for key in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty")
                  if key in d}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return SamplingParams(**values)

    def chat(self, messages: str | Sequence[Message], **overrides) -> str:
        """Ask in a notebook: a prompt string or messages in, the answer text out."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        result = self.generate(messages, self.params(**overrides))
        return self.loaded.chat_format.postprocess(result.text)

    # -- worker
    def _work(self) -> None:
        while not self._stopping.is_set():
            handle = self._queue.get()
            if handle is None:
                continue
            with self._lock:
                self._waiting -= 1
            if handle.cancelled:
                handle._push(Event(finish_reason="cancelled"))
                self.stats["cancelled"] += 1
                continue
            self._running = handle
            try:
                self._run(handle)
            except Exception as exc:  # one request fails; the worker goes on
                traceback.print_exc()
                self.stats["failed"] += 1
                handle._push(Event(finish_reason="error", error=_describe_error(exc)))
                _free_cuda_cache()
            finally:
                self._running = None

    def _run(self, handle: RequestHandle) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        loaded, params = self.loaded, handle.params
        fmt = loaded.chat_format
        deadline = None
        timeout = params.timeout or self.default_timeout
        if timeout:
            deadline = handle.created + timeout
        detok = _Detokenizer(loaded.tokenizer, list(fmt.stop_strings) + list(params.stop))
        state = {"prompt_seen": False, "finish": None}
        stop_ids = set(loaded.stop_ids)

        class Streamer(BaseStreamer):
            def put(self, value):
                if not state["prompt_seen"]:  # generate() first passes the prompt
                    state["prompt_seen"] = True
                    return
                ids = [int(t) for t in value.reshape(-1).tolist()]
                ids = [t for t in ids if t not in stop_ids]
                handle.completion_tokens += len(value.reshape(-1))
                if ids and not detok.stopped:
                    delta = detok.add(ids)
                    if delta:
                        handle._push(Event(text=delta))

            def end(self):
                pass

        class Criteria(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                if handle.cancelled or self_stopping.is_set():
                    state["finish"] = "cancelled"
                    return True
                if deadline is not None and time.time() > deadline:
                    state["finish"] = "timeout"
                    return True
                return detok.stopped

        self_stopping = self._stopping
        input_ids = torch.tensor([handle._prompt_ids], dtype=torch.long, device=loaded.model.device)
        gen_kwargs: dict[str, Any] = dict(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=params.max_new_tokens,
            eos_token_id=list(loaded.stop_ids) or None,
            pad_token_id=loaded.pad_id,
            streamer=Streamer(),
            stopping_criteria=StoppingCriteriaList([Criteria()]),
            repetition_penalty=params.repetition_penalty,
        )
        if params.greedy:
            gen_kwargs.update(do_sample=False, temperature=1.0, top_p=1.0, top_k=50)
        else:
            gen_kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                              top_k=params.top_k)
            if params.seed is not None:
                torch.manual_seed(params.seed)
        with torch.inference_mode():
            output = loaded.model.generate(**gen_kwargs)
        new_ids = output[0, input_ids.shape[1]:].tolist()
        handle.completion_tokens = len(new_ids)
        tail = detok.flush()
        if tail:
            handle._push(Event(text=tail))
        if state["finish"]:
            finish = state["finish"]
        elif detok.stopped or (new_ids and new_ids[-1] in stop_ids):
            finish = "stop"
        else:
            finish = "length"
        if finish == "cancelled":
            self.stats["cancelled"] += 1
        else:
            self.stats["completed"] += 1
        self.stats["prompt_tokens"] += handle.prompt_tokens
        self.stats["completion_tokens"] += handle.completion_tokens
        handle._push(Event(finish_reason=finish))


def _describe_error(exc: BaseException) -> str:
    name = type(exc).__name__
    if "OutOfMemory" in name or "out of memory" in str(exc).lower():
        return ("the GPU ran out of memory for this request: send a shorter prompt or a smaller "
                "max_tokens, or wait until fewer requests run")
    return f"generation failed: {name}: {exc}"


def _free_cuda_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass
