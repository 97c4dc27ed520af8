"""The engine: one worker thread owns the model and serves many requests together.

The HTTP layer never touches torch: it calls ``engine.submit(messages, params)`` and reads the
returned ``RequestHandle`` (blocking iteration, ``async for``, or ``result()``).

The worker runs a step loop (continuous batching): requests that arrive while others generate are
prefilled and join the running batch; every step runs one forward pass for all running requests,
picks each one's next token with its own sampling settings, streams the decoded text, and lets a
request leave as soon as it hits a stop id, a stop string, its ``max_new_tokens``, its time limit
or a cancel. Waiting requests are bounded (``max_queue``, then ``QueueFull``), running ones too
(``max_batch``, and a KV-cache budget in tokens sized from the memory left after loading).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import queue
import random
import threading
import time
import traceback
import uuid
from collections import deque
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
    ignore_eos: bool = False      # go on past the stop ids (benchmarks: always max_new_tokens tokens)

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
        self.started: float | None = None       # when the worker began its prefill
        self.first_token: float | None = None   # when its first token was generated
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.output_ids: list[int] = []          # the generated token ids (stop ids included)
        self.finish_reason: str | None = None
        self.error: str | None = None
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self._events: queue.Queue[Event] = queue.Queue()  # for blocking readers
        # asyncio readers: the handle binds to the event loop that first reads it (so it may be
        # submitted from a worker thread and read on the server's loop)
        self._lock = threading.Lock()
        self._history: list[Event] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async_events: asyncio.Queue | None = None

    # -- producer side (engine worker)
    def _record(self, event: Event):
        """Store ``event``; return the event loop to wake (None if no asyncio reader yet)."""
        with self._lock:
            if event.finish_reason is not None:
                self.finish_reason = event.finish_reason
                self.error = event.error
            # Always fill the thread-safe queue too: code in a notebook cell runs inside the kernel's
            # event loop, yet reads the handle synchronously (engine.chat, `for event in handle`).
            self._events.put(event)
            self._history.append(event)
            return self._loop

    def _bind(self) -> asyncio.Queue:
        """The asyncio queue of this handle, bound to the running loop, with what came so far."""
        with self._lock:
            if self._async_events is None:
                self._loop = asyncio.get_running_loop()
                self._async_events = asyncio.Queue()
                for event in self._history:
                    self._async_events.put_nowait(event)
            return self._async_events

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
        events = self._bind()
        while True:
            event = await events.get()
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




def _deliver(pairs: Sequence[tuple["RequestHandle", Event]]) -> None:
    """Hand events to their handles; one wake-up per event loop, however many events."""
    by_loop: dict[Any, list] = {}
    for handle, event in pairs:
        loop = handle._record(event)
        if loop is not None:
            by_loop.setdefault(loop, []).append((handle, event))
        elif event.finish_reason is not None:
            handle._done.set()

    for loop, items in by_loop.items():
        def put(items=items):
            for handle, event in items:
                handle._async_events.put_nowait(event)
        try:
            loop.call_soon_threadsafe(put)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            for handle, _ in items:
                handle._cancelled.set()
        for handle, event in items:
            if event.finish_reason is not None:
                handle._done.set()


class _Detokenizer:
    """Turns generated ids into text deltas, incrementally (only the last few ids are decoded
    each step); cuts at stop strings, holding back text that may be the start of one, and never
    emits half a UTF-8 character."""

    def __init__(self, tokenizer, stop_strings: Sequence[str]):
        self.tokenizer = tokenizer
        self._decode = _fast_decoder(tokenizer)
        self.stop_strings = [s for s in stop_strings if s]
        self.ids: list[int] = []
        self.prefix = 0      # ids[prefix:read] decode to text already accounted for
        self.read = 0
        self.text = ""       # decoded so far (complete characters)
        self.emitted = 0     # characters of self.text already sent
        self.stopped = False

    def add(self, token_ids: Sequence[int]) -> str:
        self.ids.extend(int(t) for t in token_ids)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # nothing new yet, or half a character: wait for the rest
        self.text += after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        if self.stop_strings:
            for s in self.stop_strings:
                pos = self.text.find(s, max(0, self.emitted - len(s)))
                if pos != -1:
                    self.text = self.text[:pos]
                    self.stopped = True
            if self.stopped:
                return self._take(len(self.text))
            hold = 0
            for s in self.stop_strings:
                for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:k]):
                        hold = max(hold, k)
                        break
            return self._take(len(self.text) - hold)
        return self._take(len(self.text))

    def flush(self) -> str:
        """Everything not sent yet, at the end (a last incomplete character shows as U+FFFD)."""
        if not self.stopped and self.read < len(self.ids):
            before = self._decode(self.ids[self.prefix:self.read])
            after = self._decode(self.ids[self.prefix:])
            self.text += after[len(before):]
            self.prefix = self.read = len(self.ids)
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta = self.text[self.emitted:upto]
        self.emitted = upto
        return delta


def _fast_decoder(tokenizer):
    """``tokenizer.decode(ids, skip_special_tokens=True)``, calling a fast tokenizer's Rust
    decoder directly: the Python wrapper costs more than the decoding for a few ids, and the
    engine decodes every running request at every step."""
    from transformers import PreTrainedTokenizerFast

    if isinstance(tokenizer, PreTrainedTokenizerFast):
        backend = tokenizer._tokenizer
        if tokenizer.clean_up_tokenization_spaces:
            return lambda ids: tokenizer.clean_up_tokenization(backend.decode(ids, skip_special_tokens=True))
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


class _Sequence:
    """One running request inside the batch."""

    def __init__(self, handle: RequestHandle, engine: "Engine"):
        self.handle = handle
        self.params = handle.params
        self.prompt = list(handle._prompt_ids)
        self.generated: list[int] = []
        handle.output_ids = self.generated  # the same list: the reader sees the ids as they come
        fmt = engine.loaded.chat_format
        self.detok = _Detokenizer(engine.loaded.tokenizer, list(fmt.stop_strings) + list(self.params.stop))
        timeout = self.params.timeout or engine.default_timeout
        self.deadline = handle.created + timeout if timeout else None
        # its own random numbers (one uniform draw per sampled token): a seed gives the same answer
        # whatever else runs in the batch
        self.rng = random.Random(self.params.seed if self.params.seed is not None
                                 else int.from_bytes(uuid.uuid4().bytes[:8], "little"))
        self.reserved = len(self.prompt) + self.params.max_new_tokens  # KV tokens it may need
        self.pending = ""        # text generated but not handed to the reader yet
        self.flushed = 0.0       # when text was last handed over (0: never)

    @property
    def length(self) -> int:
        """Tokens in its cache after the current input token is processed."""
        return len(self.prompt) + len(self.generated)


def _sample(logits, seqs: Sequence[_Sequence], seen, limit: int | None = None):
    """Next token per row, for the whole batch at once, each row with its own settings:
    repetition penalty (``seen``: a rows x vocabulary mask of the ids in each row's prompt and
    answer so far), then greedy, or temperature, top-k and top-p sampling with the row's own
    random numbers. The same filters as transformers' logits processors, in the same order.

    ``limit``: only ids below it can be picked. A model's output layer may have more ids than its
    tokenizer (Qwen-7B: 151,936 vs 151,851; BlueLM-7B: 100,096 vs 100,004): ids the tokenizer
    cannot decode are never sampled (BlueLM's SentencePiece raises on them)."""
    import torch

    if limit is not None and limit < logits.shape[-1]:
        logits, seen = logits[:, :limit], seen[:, :limit]
    if logits.dtype == torch.float16:
        # fp16 overflow shows up as inf/nan: never pick those (one op, no device sync)
        logits = torch.nan_to_num(logits.float(), nan=float("-inf"), posinf=float("-inf"))
    params = [s.params for s in seqs]
    penalized = any(p.repetition_penalty != 1.0 for p in params)
    if not penalized and all(p.greedy for p in params):
        return logits.argmax(-1).tolist()
    logits = logits.float()
    device = logits.device
    if penalized:
        penalty = torch.tensor([p.repetition_penalty for p in params], device=device).unsqueeze(1)
        scored = torch.where(logits < 0, logits * penalty, logits / penalty)
        logits = torch.where(seen, scored, logits)
    out = logits.argmax(-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        x = logits if len(rows) == len(params) else logits[rows]
        vocab = x.shape[-1]
        x = x / torch.tensor([params[i].temperature for i in rows], device=device).unsqueeze(1)
        x, order = x.sort(-1, descending=True)
        top_k = [params[i].top_k if params[i].top_k and params[i].top_k > 0 else vocab for i in rows]
        if min(top_k) < vocab:
            ranks = torch.arange(vocab, device=device)
            x = x.masked_fill(ranks >= torch.tensor(top_k, device=device).unsqueeze(1), float("-inf"))
        probs = x.softmax(-1)
        top_p = [params[i].top_p for i in rows]
        if min(top_p) < 1.0:
            # keep a token while the more likely ones hold less than top_p (the first is always kept)
            before = probs.cumsum(-1) - probs
            probs = probs.masked_fill(before >= torch.tensor(top_p, device=device).unsqueeze(1), 0.0)
        cdf = probs.cumsum(-1)
        draws = torch.tensor([seqs[i].rng.random() for i in rows], device=device, dtype=cdf.dtype)
        picked = torch.searchsorted(cdf, (draws * cdf[:, -1]).unsqueeze(1), right=True).clamp_(max=vocab - 1)
        out[rows] = order.gather(1, picked).squeeze(1)
    return out.tolist()


class Generator:
    """What the HTTP layer (``helpers.server``) talks to, whoever generates: :class:`Engine` (the
    model in this process) or ``helpers.upstream.UpstreamGenerator`` (a vLLM server). Both take
    chat messages, build the prompt ids with the family's ``ChatFormat`` (so the ids are the same
    whichever generates), and hand back a :class:`RequestHandle`.

    A generator has ``loaded`` (name, family, device, context length, tokenizer, chat format),
    ``metrics``, ``stats`` and ``batching_note``, and implements ``start()``, ``stop()``,
    ``restart()``, ``alive``, ``status()``, ``running``, ``waiting`` and ``submit()``."""

    loaded: Any
    batching_note: str = ""

    def submit(self, messages: Sequence[Message], params: SamplingParams | None = None, *,
               max_prompt_tokens: int | None = None) -> RequestHandle:
        raise NotImplementedError

    def status(self) -> tuple[str, str | None]:
        raise NotImplementedError

    def _encode(self, messages: Sequence[Message], params: SamplingParams,
                max_prompt_tokens: int | None) -> RequestHandle:
        """A new handle with the prompt ids: the family's format, the oldest turns dropped to leave
        room for ``max_new_tokens`` in the context (and at most ``max_prompt_tokens``)."""
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


class Engine(Generator):
    """Serve generation requests for one loaded model from a single worker thread.

    ``max_queue``: requests that may wait before ``submit`` raises ``QueueFull``.
    ``max_batch``: requests generated together (1 = one at a time).
    ``kv_budget_tokens``: KV-cache tokens the running batch may hold (padding included); by default
    sized from the GPU memory left after loading, or unlimited on the CPU.
    ``stream_interval``: seconds a request's new text may wait to be handed to its reader, so that
    when steps are faster than that, several tokens go out in one event (one wake-up of the
    server's event loop and one HTTP chunk instead of one per token). The first text and the end
    are never held back; a step slower than the interval (a 7B model on a GPU: ~25 ms) streams
    every token on its own. 0 hands over every token at once.
    """

    def __init__(self, loaded, *, max_queue: int = 64, max_batch: int = 16,
                 kv_budget_tokens: int | None = None, default_timeout: float | None = None,
                 check_batching: bool = True, stream_interval: float = 0.02):
        self.loaded = loaded
        self.stream_interval = max(0.0, float(stream_interval))
        self.max_queue = max_queue
        self.max_batch = max(1, int(max_batch))
        self.default_timeout = default_timeout
        self.check_batching = check_batching
        self.batching_note = ""  # how requests are served, set when the worker starts (what the self-check found)
        self.kv_budget_tokens = kv_budget_tokens
        # what the model's forward takes (BlueLM has no position_ids), and the ids its tokenizer can decode
        self._forward_args = forward_arguments(loaded.model)
        self._vocab_limit = decodable_ids(loaded.tokenizer)
        self.failure: str | None = None  # why the worker stopped on its own (None while it serves)
        self._waiting: deque[RequestHandle] = deque()
        self._cond = threading.Condition()
        self._tokenizer_lock = threading.Lock()
        self._batch: list[_Sequence] = []
        self._admitting: list[RequestHandle] = []  # taken off the queue, not yet in the batch
        self._cache = None  # BatchCache of the running batch
        self._seen = None   # rows x vocabulary: ids each running request has seen (repetition penalty)
        self._rotary = None  # kvcache.Rotary when the model takes positions from the cache length
        self._seq_dim: int | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._ready = threading.Event()
        from .metrics import Metrics

        self.metrics = Metrics()
        self.stats = {"requests": 0, "completed": 0, "failed": 0, "cancelled": 0, "rejected": 0,
                      "prompt_tokens": 0, "completion_tokens": 0, "steps": 0, "peak_batch": 0}

    @functools.cached_property
    def device(self):
        # remembered: a model's .device walks its parameters, and the worker asks at every step
        return self.loaded.model.device

    # -- lifecycle
    def start(self) -> "Engine":
        if self._thread is None or not self._thread.is_alive():
            self._stopping.clear()
            self._ready.clear()
            self.failure = None
            self._thread = threading.Thread(target=self._work, name="llm-engine", daemon=True)
            self._thread.start()
            self._ready.wait(120)
        return self

    def restart(self) -> "Engine":
        """Start a new worker after the old one died (``status()`` says ``failed``); the model,
        settings and metrics are kept. Requests that were running when it died have already
        ended with an error; nothing else is lost. Does nothing while the worker serves."""
        if self.alive:
            return self
        if self._thread is not None and self._thread.is_alive():  # still winding down after stop()
            self._thread.join(10)
        self._stopping.clear()
        return self.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker: running and waiting requests end with an error."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        _deliver([(h, Event(finish_reason="error", error="the server is shutting down"))
                  for h in waiting if not h.done])

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

    def status(self) -> tuple[str, str | None]:
        """``("ok", None)`` while the worker serves; ``("stopping", why)`` after ``stop()``;
        ``("failed", why)`` when the worker died (or was never started)."""
        if self.alive:
            return "ok", None
        if self._stopping.is_set():
            return "stopping", "the engine was stopped (the server is shutting down)"
        if self._thread is None:
            return "failed", "the engine was never started: call engine.start()"
        return "failed", (f"the engine worker stopped: {self.failure or 'unknown reason'}; restart it "
                          "(engine.restart() in the notebook, or restart the server)")

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._batch)

    # -- requests
    def submit(self, messages: Sequence[Message], params: SamplingParams | None = None, *,
               max_prompt_tokens: int | None = None) -> RequestHandle:
        """Queue a chat request. Raises ``ChatFormatError`` for messages the model's format cannot
        take (``PromptTooLong`` when the prompt does not fit even after dropping the oldest turns),
        ``QueueFull`` when too many requests wait, ``EngineStopped`` when not running.

        The prompt gets what the context leaves after ``max_new_tokens``, and at most
        ``max_prompt_tokens`` when given (a server's limit)."""
        if not self.alive:
            raise EngineStopped(self.status()[1] or "the engine is not running")
        handle = self._encode(messages, params or SamplingParams(), max_prompt_tokens)
        params = handle.params
        needed = handle.prompt_tokens + params.max_new_tokens
        if self.kv_budget_tokens is not None and needed > self.kv_budget_tokens:
            raise ChatFormatError(
                f"this request may need {needed} tokens of KV cache (prompt {handle.prompt_tokens} + "
                f"max_tokens {params.max_new_tokens}) but the server holds at most {self.kv_budget_tokens}: "
                "lower max_tokens or shorten the conversation")
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                self.stats["rejected"] += 1
                self.metrics.request_rejected()
                raise QueueFull(f"{len(self._waiting)} requests are already waiting: try again shortly")
            self._waiting.append(handle)
            self.stats["requests"] += 1
            self._cond.notify()
        return handle

    # -- the worker
    def _work(self) -> None:
        import torch

        try:
            with torch.inference_mode():
                self._prepare()
                self._ready.set()
                while not self._stopping.is_set():
                    try:
                        self._admit()
                        if self._batch:
                            self._step()
                    except Exception as exc:  # noqa: BLE001 - a fault outside the model call: fail what it touched, go on
                        self._recover(exc)
        except BaseException as exc:  # the thread ends here: say why (status(), /health, new requests)
            if not self._stopping.is_set():
                self.failure = f"{type(exc).__name__}: {exc}"
                traceback.print_exception(exc)
        finally:
            self._ready.set()
            if self._stopping.is_set():
                self._fail_batch("the server is shutting down")
            else:  # died: nobody may wait for it (new requests get EngineStopped from submit)
                self.failure = self.failure or "the worker thread ended"
                print(f"[engine] the worker stopped: {self.failure}", flush=True)
                with self._cond:
                    waiting, self._waiting = list(self._waiting), deque()
                message = f"the engine worker stopped: {self.failure}"
                self._fail_batch(message)
                self._fail_handles(self._admitting + waiting, message)

    def _recover(self, exc: Exception) -> None:
        """An exception escaped a step (not the model call, which ``_step`` handles): the requests
        it may have touched (the running batch, those being admitted) end with the error, their
        slots are freed, and the worker goes on with the next requests."""
        traceback.print_exception(exc)
        message = _describe_error(exc)
        self._fail_batch(message)
        self._fail_handles(self._admitting, message)
        self._admitting = []
        _free_cuda_cache()

    def _prepare(self) -> None:
        """Size the KV budget and check that batching gives the same results as one at a time."""
        if self.kv_budget_tokens is None:
            self.kv_budget_tokens = _default_kv_budget(self.loaded)
        if self.max_batch == 1:
            self.batching_note = "one request at a time (max_batch=1)"
            return
        if not self.check_batching:
            self.batching_note = f"batching on: up to {self.max_batch} requests together (not self-checked)"
            return
        problem = _check_batching(self)
        if not problem:
            self.batching_note = (f"batching on: up to {self.max_batch} requests together (self-check: batched "
                                  "logits equal single-request logits)")
            return
        # Qwen v1 and BlueLM rotate by the cache length, not position_ids: try turning the keys of
        # rows that move (kvcache.Rotary) and check again
        from .kvcache import Rotary

        self._rotary = Rotary.from_model(self.loaded.model)
        if self._rotary is not None and not _check_batching(self):
            self.batching_note = (f"batching on: up to {self.max_batch} requests together, with re-rotated keys "
                                  "(the model takes positions from the cache length, not position_ids)")
            print(f"[engine] {self.batching_note}", flush=True)
            return
        self._rotary = None
        self.batching_note = f"batching disabled: {problem}; one request at a time"
        print(f"[engine] {self.batching_note}", flush=True)
        self.max_batch = 1

    def _admit(self) -> None:
        """Move waiting requests into the batch while there is room (blocks when idle)."""
        with self._cond:
            while not self._waiting and not self._batch and not self._stopping.is_set():
                self._cond.wait(0.5)
            admitted = []
            while self._waiting and len(self._batch) + len(admitted) < self.max_batch:
                head = self._waiting[0]
                if head.cancelled:
                    self._waiting.popleft()
                    self.stats["cancelled"] += 1
                    self.metrics.request_finished(head, "cancelled", time.time())
                    _deliver([(head, Event(finish_reason="cancelled"))])
                    continue
                if not self._fits(head, admitted):
                    break
                admitted.append(self._waiting.popleft())
            self._admitting = admitted
        if self._stopping.is_set():
            _deliver([(h, Event(finish_reason="error", error="the server is shutting down")) for h in admitted])
            self._admitting = []
            return
        for group in self._prefill_groups(admitted):
            self._prefill(group)
        self._admitting = []

    def _fits(self, handle: RequestHandle, admitted: list) -> bool:
        if self.kv_budget_tokens is None or not (self._batch or admitted):
            return True
        reserved = [s.reserved for s in self._batch] + [h.prompt_tokens + h.params.max_new_tokens for h in admitted]
        reserved.append(handle.prompt_tokens + handle.params.max_new_tokens)
        # rows are padded to the longest one: the batch costs rows x longest
        return len(reserved) * max(reserved) <= self.kv_budget_tokens

    def _forward(self, input_ids, mask, positions, past, padded: bool | None = None):
        """One forward pass; the mask goes to the model only when some row is padded (``padded``:
        known by the caller, else read off the mask)."""
        if padded is None:
            padded = mask is not None and not bool(mask.all())
        kwargs = {"input_ids": input_ids, "attention_mask": mask if padded else None, "position_ids": positions,
                  "past_key_values": past, "use_cache": True, "return_dict": True}
        if self._forward_args is not None:  # only what the model's forward takes (BlueLM: no position_ids)
            kwargs = {k: v for k, v in kwargs.items() if k in self._forward_args}
        out = self.loaded.model(**kwargs)
        return out.logits[:, -1, :], out.past_key_values

    #: padded prompt tokens one prefill forward may take (bounds the full-vocabulary logits
    #: the model computes for every prompt position)
    prefill_tokens = 2048

    def _prefill_groups(self, handles: list[RequestHandle]) -> list[list[RequestHandle]]:
        groups: list[list[RequestHandle]] = []
        for handle in handles:
            group = groups[-1] if groups else None
            if group and (len(group) + 1) * max(handle.prompt_tokens, *(h.prompt_tokens for h in group)) \
                    <= self.prefill_tokens:
                group.append(handle)
            else:
                groups.append([handle])
        return groups

    def _prefill(self, handles: list[RequestHandle]) -> None:
        """Run the prompts of newly admitted requests (together, left-padded) and add them to the
        running batch with their first token."""
        import torch

        from .kvcache import FAMILY_SEQ_DIM, BatchCache, detect_seq_dim

        seqs = [_Sequence(h, self) for h in handles]
        now = time.time()
        for h in handles:
            h.started = now
        width = max(len(s.prompt) for s in seqs)
        try:
            ids = torch.tensor([[self.loaded.pad_id or 0] * (width - len(s.prompt)) + s.prompt for s in seqs],
                               dtype=torch.long, device=self.device)
            mask = torch.tensor([[0] * (width - len(s.prompt)) + [1] * len(s.prompt) for s in seqs],
                                dtype=torch.long, device=self.device)
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            logits, past = self._forward(ids, mask, positions, None)
            if self._seq_dim is None:
                self._seq_dim = detect_seq_dim(past, width, FAMILY_SEQ_DIM.get(self.loaded.family, 2))
            cache = BatchCache.from_model(past, mask, self._seq_dim, self._rotary)
            seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
            seen[mask.nonzero(as_tuple=True)[0], ids[mask.bool()]] = True
            tokens = _sample(logits, seqs, seen, self._vocab_limit)
            seen[torch.arange(len(seqs), device=seen.device), torch.tensor(tokens, device=seen.device)] = True
        except Exception as exc:  # these requests fail; the running batch goes on
            self._fail(seqs, exc)
            return
        if self._cache is None or not self._batch:
            self._cache, self._seen = cache, seen
        else:
            self._cache.merge(cache)
            self._seen = torch.cat([self._seen, seen])
        self._batch.extend(seqs)
        self.stats["peak_batch"] = max(self.stats["peak_batch"], len(self._batch))
        events: list = []
        self._retire(self._advance(seqs, tokens, events))
        _deliver(events)

    def _step(self) -> None:
        import torch

        cache = self._cache
        seqs = self._batch
        last = torch.tensor([[s.generated[-1]] for s in seqs], dtype=torch.long, device=self.device)
        positions = torch.tensor([[s.length - 1] for s in seqs], dtype=torch.long, device=self.device)
        mask = torch.cat([cache.mask, cache.mask.new_ones((len(seqs), 1))], dim=1)
        try:
            logits, past = self._forward(last, mask, positions, cache.to_model(), padded=cache.padded)
        except Exception as exc:  # a fault in the shared step fails the whole batch
            self._fail(list(seqs), exc)
            self._batch, self._cache, self._seen = [], None, None
            _free_cuda_cache()
            return
        cache.update(past, mask)
        self.stats["steps"] += 1
        tokens = _sample(logits, seqs, self._seen, self._vocab_limit)
        if any(s.params.repetition_penalty != 1.0 for s in seqs):
            # only a penalized row's own seen-mask is ever read (its prompt was marked at prefill)
            self._seen[torch.arange(len(seqs), device=self._seen.device),
                       torch.tensor(tokens, device=self._seen.device)] = True
        events: list = []
        done = self._advance(seqs, tokens, events)
        self._retire(done)
        _deliver(events)

    def _advance(self, seqs: Sequence[_Sequence], tokens: Sequence[int], events: list) -> list[int]:
        """Append each row's new token; return the indices (in ``self._batch``) that finished."""
        stop_ids = set(self.loaded.stop_ids)
        finished = []
        now = time.time()
        for seq, token in zip(seqs, tokens):
            handle = seq.handle
            if handle.first_token is None:
                handle.first_token = now
            seq.generated.append(token)
            handle.completion_tokens = len(seq.generated)
            reason = None
            try:
                if token in stop_ids and not seq.params.ignore_eos:
                    reason = "stop"
                else:
                    seq.pending += seq.detok.add([token])
                    if seq.detok.stopped:
                        reason = "stop"
                if reason is None:
                    if handle.cancelled:
                        reason = "cancelled"
                    elif seq.deadline is not None and now > seq.deadline:
                        reason = "timeout"
                    elif len(seq.generated) >= seq.params.max_new_tokens or seq.length >= self.loaded.context_length:
                        reason = "length"
                text = seq.pending + seq.detok.flush() if reason is not None else ""
            except Exception as exc:  # noqa: BLE001 - e.g. an id the tokenizer cannot decode: this request only
                traceback.print_exception(exc)
                self.stats["failed"] += 1
                self.metrics.request_finished(handle, "error", now)
                events.append((handle, Event(finish_reason="error",
                                             error=f"could not decode token {token}: {_describe_error(exc)}")))
                finished.append(self._batch.index(seq))
                continue
            if reason is not None:
                if text:
                    events.append((handle, Event(text=text)))
                events.append((handle, Event(finish_reason=reason)))
                self._count(seq, reason)
                finished.append(self._batch.index(seq))
            elif seq.pending and now - seq.flushed >= self.stream_interval:
                events.append((handle, Event(text=seq.pending)))
                seq.pending, seq.flushed = "", now
        return finished

    def _count(self, seq: _Sequence, reason: str) -> None:
        self.metrics.request_finished(seq.handle, reason, time.time())
        self.stats["cancelled" if reason == "cancelled" else "completed"] += 1
        self.stats["prompt_tokens"] += len(seq.prompt)
        self.stats["completion_tokens"] += len(seq.generated)

    def _retire(self, finished: list[int]) -> None:
        if not finished:
            return
        keep = [i for i in range(len(self._batch)) if i not in set(finished)]
        self._batch = [self._batch[i] for i in keep]
        if not self._batch:
            self._cache = self._seen = None
            return
        self._cache.keep(keep)
        self._seen = self._seen[keep]

    def _fail(self, seqs: Sequence[_Sequence], exc: BaseException) -> None:
        traceback.print_exception(exc)
        self._fail_handles([s.handle for s in seqs], _describe_error(exc))
        _free_cuda_cache()

    def _fail_batch(self, message: str) -> None:
        seqs, self._batch, self._cache, self._seen = self._batch, [], None, None
        self._fail_handles([s.handle for s in seqs], message)

    def _fail_handles(self, handles: Sequence[RequestHandle], message: str) -> None:
        handles = [h for h in handles if not h.done]
        now = time.time()
        for handle in handles:
            self.metrics.request_finished(handle, "error", now)
        self.stats["failed"] += len(handles)
        _deliver([(h, Event(finish_reason="error", error=message)) for h in handles])


def forward_arguments(model) -> frozenset[str] | None:
    """The keyword arguments ``model.forward`` takes (read once, from its class), or None when it
    takes any (``**kwargs``). Remote code differs: BlueLM's forward has no ``position_ids`` and
    raises TypeError when given one; Qwen v1 takes it and ignores it."""
    try:
        params = inspect.signature(type(model).forward).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - no signature to read: pass everything
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                         inspect.Parameter.KEYWORD_ONLY))


def decodable_ids(tokenizer) -> int | None:
    """How many ids the tokenizer can decode (``len(tokenizer)``: its vocabulary and added tokens)."""
    try:
        return len(tokenizer)
    except TypeError:  # pragma: no cover - a tokenizer without a length: no limit
        return None


def _default_kv_budget(loaded) -> int | None:
    """KV-cache tokens that fit in the GPU memory left after loading (keeping 10% and at least
    1.5 GB for activations and logits); None (no limit) on the CPU."""
    import torch

    from .kvcache import kv_bytes_per_token

    if not str(loaded.device).startswith("cuda") or not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(torch.device(loaded.device))
    reserve = max(int(1.5 * 1024**3), int(0.1 * total))
    per_token = kv_bytes_per_token(loaded.model.config, loaded.dtype)
    return max(0, (free - reserve) // per_token)


def _check_batching(engine: Engine) -> str:
    """Run two prompts of different lengths alone and together (the shorter one first, the longer
    one joining a step later, then leaving so that the padding in front of the shorter one is
    trimmed) and compare the logits. Remote model code that ignores position ids or padding masks
    gives different numbers (an empty string means: batching is safe)."""
    import torch

    from .kvcache import FAMILY_SEQ_DIM, BatchCache, detect_seq_dim

    tok, fmt = engine.loaded.tokenizer, engine.loaded.chat_format
    short = fmt.encode(tok, [{"role": "user", "content": "Hi"}])
    long = fmt.encode(tok, [{"role": "user", "content": "Please tell me a long story about the sea."}])
    if len(long) < len(short) + 3:  # the joiner must be longer, so that the shorter one gets padded
        long = long + short + short
    device = engine.device
    default_dim = FAMILY_SEQ_DIM.get(engine.loaded.family, 2)

    def prefill(ids):
        t = torch.tensor([ids], dtype=torch.long, device=device)
        logits, past = engine._forward(t, None, torch.arange(len(ids), device=device).unsqueeze(0), None)
        dim = detect_seq_dim(past, len(ids), default_dim)
        return logits, BatchCache.from_model(past, torch.ones((1, len(ids)), dtype=torch.long, device=device), dim,
                                             engine._rotary)

    def step(cache, tokens, lengths):
        ids = torch.tensor([[t] for t in tokens], dtype=torch.long, device=device)
        pos = torch.tensor([[n] for n in lengths], dtype=torch.long, device=device)
        mask = torch.cat([cache.mask, cache.mask.new_ones((len(tokens), 1))], dim=1)
        logits, past = engine._forward(ids, mask, pos, cache.to_model())
        cache.update(past, mask)
        return logits

    try:
        # alone
        a0, ca = prefill(short)
        ta = int(a0.argmax(-1))
        a1 = step(ca, [ta], [len(short)])
        ta2 = int(a1.argmax(-1))
        a2 = step(ca, [ta2], [len(short) + 1])
        ta3 = int(a2.argmax(-1))
        a3 = step(ca, [ta3], [len(short) + 2])
        b0, cb = prefill(long)
        tb = int(b0.argmax(-1))
        b1 = step(cb, [tb], [len(long)])
        # together: the short one runs a step, then the long one joins
        x0, cx = prefill(short)
        step(cx, [ta], [len(short)])
        _, cy = prefill(long)
        cx.merge(cy)
        both = step(cx, [ta2, tb], [len(short) + 1, len(long)])
        cx.keep([0])  # the long one leaves: the padding in front of the short one goes
        after = step(cx, [ta3], [len(short) + 2])
        # both prompts in one left-padded prefill
        width = len(long)
        ids = torch.tensor([[engine.loaded.pad_id or 0] * (width - len(short)) + short, long], device=device)
        mask = torch.tensor([[0] * (width - len(short)) + [1] * len(short), [1] * width], device=device)
        padded, _ = engine._forward(ids, mask, (mask.cumsum(1) - 1).clamp(min=0), None)
    except Exception as exc:  # noqa: BLE001 - any failure means: do not batch
        return f"{type(exc).__name__}: {exc}"
    for got, want in ((both[0], a2[0]), (both[1], b1[0]), (after[0], a3[0]), (padded[0], a0[0]), (padded[1], b0[0])):
        got, want = got.detach().float(), want.detach().float()
        scale = float(want.std()) or 1.0
        diff = float((got - want).abs().max()) / scale
        if diff > 0.05:
            return f"batched logits differ from single-request logits (relative difference {diff:.3f})"
    return ""


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
