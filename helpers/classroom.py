"""One server, a whole class: capacity, a simulated class and a live dashboard (lesson 06).

* **Capacity.** Each model's shape as its ``config.json`` gives it (``SHAPES``), the KV cache one
  token costs (2 x layers x KV heads x head size x bytes), the memory of its weights (parameters x
  bytes, counted from the shape), and how many students x context length fit beside them on one
  GPU after the reserve the engine keeps (``helpers.engine._default_kv_budget``: 10% of the card,
  at least 1.5 GiB, for activations and logits).
* **A simulated class.** ``SimulatedClass``: N students who ask, read and think, and ask again,
  against a running server (OpenAI route, one API key per group); 429s are counted and retried after
  ``Retry-After``, as the chat page tells a student to do.
* **A dashboard.** ``Dashboard`` reads ``GET /metrics`` (``helpers.client.metrics``) and draws
  running and waiting requests, tokens per second and the time to the first token with matplotlib,
  redrawn in place in a notebook (a PNG image output, so it shows in any front end).

matplotlib is imported only by the drawing functions; nothing here touches torch.
"""

from __future__ import annotations

import io
import math
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

GiB = 1024 ** 3
MiB = 1024 ** 2
BF16_BYTES = 2  # bytes per number in bf16 / fp16

# What the engine keeps free for activations and logits (helpers.engine._default_kv_budget)
RESERVE_FRACTION = 0.1
RESERVE_MIN_BYTES = int(1.5 * GiB)
# CUDA context and torch's own buffers after loading: an ESTIMATE (not measured here; no GPU). On the
# GPU box, ``engine.kv_budget_tokens`` is what the engine computed from the memory really left.
RUNTIME_BYTES = GiB // 2


# --------------------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only chat model that decide its memory (from its config.json)."""

    name: str
    hidden: int            # hidden_size
    layers: int            # num_hidden_layers
    heads: int             # num_attention_heads
    kv_heads: int          # num_key_value_heads (= heads without grouped-query attention)
    head_dim: int          # size of one head (hidden / heads for all five)
    intermediate: int      # width of ONE MLP branch (SwiGLU has three matrices of hidden x this)
    vocab: int             # vocab_size of the embedding and output layer (config, not tokenizer)
    tied_embeddings: bool = False  # output layer shares the embedding's weights (MiniCPM)
    qkv_bias: bool = False         # Qwen v1's c_attn has a bias
    embedding_norm: bool = False   # BlueLM: a LayerNorm (weight + bias) right after the embedding
    source: str = ""               # where the numbers come from

    # -- KV cache
    def kv_bytes_per_token(self, bytes_per_value: int = BF16_BYTES) -> int:
        """Key and value, every layer, every KV head: 2 x layers x kv_heads x head_dim x bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * bytes_per_value

    # -- weights
    def parameter_breakdown(self) -> dict[str, int]:
        """Parameters by part: embedding, attention, mlp, norms, output."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        attention = self.hidden * (q + 2 * kv) + q * self.hidden  # q, k, v, o projections
        if self.qkv_bias:
            attention += q + 2 * kv
        mlp = 3 * self.hidden * self.intermediate                  # gate, up, down
        norms = 2 * self.hidden * self.layers + self.hidden        # two RMSNorms a layer + the final one
        if self.embedding_norm:
            norms += 2 * self.hidden
        embedding = self.vocab * self.hidden
        return {"embedding": embedding, "attention": attention * self.layers, "mlp": mlp * self.layers,
                "norms": norms, "output": 0 if self.tied_embeddings else embedding}

    @property
    def parameters(self) -> int:
        return sum(self.parameter_breakdown().values())

    def weight_bytes(self, bytes_per_value: int = BF16_BYTES) -> int:
        return self.parameters * bytes_per_value

    @classmethod
    def from_config(cls, config: Any, name: str | None = None) -> "ModelShape":
        """The shape of a transformers config (an object, or a dict of config.json). Reads the names
        the five vendors use: Qwen v1 (``kv_channels``; ``intermediate_size`` is twice one branch,
        older files say ``n_embd``/``n_layer``/``n_head``/``ffn_hidden_size``), BlueLM
        (``use_stable_embedding``), the rest Llama-style."""
        get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))

        def first(*keys):
            for key in keys:
                value = get(key, None)
                if value is not None:
                    return value
            raise KeyError(f"the config has none of {keys}")

        model_type = str(get("model_type", "") or "").lower()
        hidden = int(first("hidden_size", "n_embd"))
        heads = int(first("num_attention_heads", "n_head"))
        qwen_v1 = model_type == "qwen" or get("kv_channels", None) is not None
        intermediate = int(first("intermediate_size", "ffn_hidden_size"))
        if qwen_v1:
            intermediate //= 2  # Qwen v1 stores both MLP branches' widths together (w1 and w2)
        return cls(
            name=name or str(get("_name_or_path", "") or model_type or "model"),
            hidden=hidden,
            layers=int(first("num_hidden_layers", "n_layer")),
            heads=heads,
            kv_heads=int(get("num_key_value_heads", None) or heads),
            head_dim=int(get("head_dim", None) or get("kv_channels", None) or hidden // heads),
            intermediate=intermediate,
            vocab=int(first("vocab_size", "padded_vocab_size")),
            tied_embeddings=bool(get("tie_word_embeddings", False)),
            qkv_bias=qwen_v1,
            embedding_norm=bool(get("use_stable_embedding", False)),
            source="config",
        )


# The five models of the series, from each vendor's config.json. Every number was checked against a
# public copy of the file (the address is in ``source``); tests/test_classroom.py checks the counting
# against the project's stand-ins, which carry the vendors' config names and layer layout.
SHAPES: dict[str, ModelShape] = {s.name: s for s in [
    # Qwen-7B-Chat: hidden 4096, 32 layers, 32 heads of kv_channels 128 (no GQA), MLP w1/w2 of 11008
    # (config "ffn_hidden_size"/"intermediate_size": 22016 = 2 x 11008), vocab 151936 (padded), untied;
    # c_attn = nn.Linear(hidden, 3 * projection) has a bias (modeling_qwen.py).
    # (the vendor's config.json and modeling_qwen.py, as copied in github.com/undefdev/Qwen-7B-Chat)
    ModelShape("qwen-7b-chat", hidden=4096, layers=32, heads=32, kv_heads=32, head_dim=128, intermediate=11008,
               vocab=151936, qkv_bias=True,
               source="Qwen-7B-Chat config.json + modeling_qwen.py (copy: github.com/undefdev/Qwen-7B-Chat)"),
    # XVERSE-7B-Chat: 4096, 32 layers, 32 heads (no num_key_value_heads: full MHA), 11008, vocab 100534
    ModelShape("xverse-7b-chat", hidden=4096, layers=32, heads=32, kv_heads=32, head_dim=128, intermediate=11008,
               vocab=100534,
               source="huggingface.co/xverse/XVERSE-7B-Chat/blob/cc952bf6c7fb6ad91adf904dafeadb420d29d29f/"
                      "config.json"),
    # BlueLM-7B-Chat: vocab_size 100096 in its config.json (the tokenizer has 100004), as quoted by
    # huggingface.co/vivo-ai/BlueLM-7B-Chat/discussions/3; 4096, 32 layers, 32 heads,
    # num_key_value_heads 32, 11008 and use_stable_embedding (a LayerNorm after the embedding) as in
    # the config.json of its siblings BlueLM-7B-Chat-32K and BlueLM-7B-Base-32K (same architecture)
    ModelShape("bluelm-7b-chat", hidden=4096, layers=32, heads=32, kv_heads=32, head_dim=128, intermediate=11008,
               vocab=100096, embedding_norm=True,
               source="huggingface.co/vivo-ai/BlueLM-7B-Chat/discussions/3 (vocab); "
                      "huggingface.co/vivo-ai/BlueLM-7B-Chat-32K config.json (layers)"),
    # InternLM2-chat-7b: 4096, 32 layers, 32 heads, num_key_value_heads 8 (GQA), 14336, vocab 92544
    ModelShape("internlm2-chat-7b", hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336,
               vocab=92544,
               source="huggingface.co/internlm/internlm2-chat-7b/blob/ef825b6d8297f101a2ce6c72696c39909a1a32f7/"
                      "config.json"),
    # MiniCPM-2B-sft: 2304, 40 layers, 36 heads of 64, num_key_value_heads 36, 5760, vocab 122753; its
    # config.json does not set tie_word_embeddings and configuration_minicpm.py defaults it to True
    # (the fp32 checkpoint is 10.9 GB = 2.72 B parameters x 4 bytes, counting the embedding once)
    ModelShape("minicpm-2b-sft", hidden=2304, layers=40, heads=36, kv_heads=36, head_dim=64, intermediate=5760,
               vocab=122753, tied_embeddings=True,
               source="huggingface.co/openbmb/MiniCPM-2B-sft-fp32/blame/90a956225c2a26d0d2a28e4951f788e6f5d4a03b/"
                      "config.json"),
]}


def get_shape(model: str | ModelShape) -> ModelShape:
    if isinstance(model, ModelShape):
        return model
    if model in SHAPES:
        return SHAPES[model]
    from .registry import get_spec

    return SHAPES[get_spec(model).name]


# --------------------------------------------------------------------------- capacity


def reserve_bytes(gpu_bytes: int) -> int:
    """What the engine keeps free for activations and logits: 10% of the card, at least 1.5 GiB."""
    return max(RESERVE_MIN_BYTES, int(RESERVE_FRACTION * gpu_bytes))


def kv_budget_tokens(free_bytes: int, gpu_bytes: int, kv_bytes_per_token: int) -> int:
    """KV-cache tokens that fit in ``free_bytes`` (left after loading) on a card of ``gpu_bytes``,
    computed as ``helpers.engine._default_kv_budget`` computes it."""
    return max(0, (free_bytes - reserve_bytes(gpu_bytes)) // kv_bytes_per_token)


@dataclass(frozen=True)
class Capacity:
    model: str
    kv_bytes_per_token: int
    weight_bytes: int
    gpu_bytes: int
    free_bytes: int        # after the weights and the CUDA runtime
    budget_tokens: int     # KV-cache tokens the engine may hold
    context: int           # tokens per student (prompt + answer)
    max_context: int       # the model's context length

    @property
    def students(self) -> int:
        """Students who can generate at the same time, each holding ``context`` tokens (0 when the
        model cannot take that context at all). The engine counts a batch as rows x longest row."""
        if self.context > self.max_context:
            return 0
        return self.budget_tokens // self.context


def capacity(model: str | ModelShape, *, context: int = 2048, gpu_gib: float = 24.0,
             runtime_bytes: int = RUNTIME_BYTES, bytes_per_value: int = BF16_BYTES) -> Capacity:
    """How ``model`` (a registry name or a shape) fits on a card of ``gpu_gib`` GiB, in bf16."""
    from .registry import MODELS

    shape = get_shape(model)
    gpu = int(gpu_gib * GiB)
    weights = shape.weight_bytes(bytes_per_value)
    free = gpu - weights - runtime_bytes
    per_token = shape.kv_bytes_per_token(bytes_per_value)
    spec = MODELS.get(shape.name)
    return Capacity(model=shape.name, kv_bytes_per_token=per_token, weight_bytes=weights, gpu_bytes=gpu,
                    free_bytes=free, budget_tokens=kv_budget_tokens(free, gpu, per_token), context=context,
                    max_context=spec.context_length if spec else 1 << 30)


def capacity_table(models: Iterable[str] | None = None, *, context: int = 2048, gpu_gib: float = 24.0) -> str:
    """A plain-text table of the five models' KV cache, weights and students that fit."""
    rows = [capacity(m, context=context, gpu_gib=gpu_gib) for m in (models or SHAPES)]
    head = (f"{'model':<18} {'KV/token':>9} {'weights':>9} {'KV budget':>11} "
            f"{'students x ' + str(context):>17} {'context':>8}")
    lines = [head, "-" * len(head)]
    for c in rows:
        lines.append(f"{c.model:<18} {c.kv_bytes_per_token / MiB:>5.3f} MiB {c.weight_bytes / GiB:>5.1f} GiB "
                     f"{c.budget_tokens:>11,} {c.students:>17} {c.max_context:>8}")
    lines.append(f"(a {gpu_gib:g} GiB card; bf16; {RUNTIME_BYTES / GiB:g} GiB CUDA runtime and the engine's "
                 f"reserve of max(1.5 GiB, 10%) kept free)")
    return "\n".join(lines)


CONTEXTS = (512, 1024, 2048, 4096, 8192, 16384, 32768)


def plot_capacity(models: Iterable[str] | None = None, *, contexts: Sequence[int] = CONTEXTS, gpu_gib: float = 24.0,
                  class_size: int | None = 30, max_batch: int | None = 16):
    """A matplotlib Figure: students who fit (y) against tokens per student (x), one line per model,
    each line ending at its model's context length."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(8, 4.6), dpi=100)
    ax = fig.add_subplot()
    for name in models or SHAPES:
        points = [(n, capacity(name, context=n, gpu_gib=gpu_gib).students) for n in contexts]
        points = [(n, s) for n, s in points if s > 0]
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
    if class_size:
        ax.axhline(class_size, color="grey", linestyle="--", linewidth=1)
        ax.annotate(f"class of {class_size}", (contexts[-1], class_size), textcoords="offset points",
                    xytext=(0, 4), ha="right", color="grey", fontsize=9)
    if max_batch:
        ax.axhline(max_batch, color="tab:red", linestyle=":", linewidth=1)
        ax.annotate(f"max_batch {max_batch} (default)", (contexts[-1], max_batch), textcoords="offset points",
                    xytext=(0, 4), ha="right", color="tab:red", fontsize=9)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.set_xticks(list(contexts), [f"{n // 1024}K" if n >= 1024 else str(n) for n in contexts])
    ax.set_xlabel("tokens per student (prompt + answer)")
    ax.set_ylabel("students generating at once")
    ax.set_title(f"What fits beside the weights on a {gpu_gib:g} GiB card (bf16)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    return fig


def figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def show(fig) -> None:
    """Show a matplotlib Figure in the notebook as a PNG image."""
    from IPython.display import Image, display

    display(Image(data=figure_png(fig), format="png"))


# --------------------------------------------------------------------------- a simulated class

QUESTIONS = (
    "用一句话解释什么是 HTTP。",
    "Python 里列表和元组有什么区别？",
    "给我出一道关于循环的练习题。",
    "什么是大语言模型的上下文长度？",
    "请把“机器学习”翻译成英文并解释。",
    "写一个计算阶乘的 Python 函数。",
    "为什么模型的回答有时会重复？",
    "解释一下什么是 API key。",
)


@dataclass
class ClassResult:
    """What the simulated students saw."""

    asked: int = 0
    answered: int = 0
    rejected: int = 0                 # 429: the queue was full
    failed: Counter = field(default_factory=Counter)  # other statuses / errors
    retry_after: Counter = field(default_factory=Counter)  # Retry-After values seen on 429s
    seconds: list[float] = field(default_factory=list)     # time to a whole answer
    errors: list[str] = field(default_factory=list)        # the first few messages

    def summary(self) -> str:
        mean = sum(self.seconds) / len(self.seconds) if self.seconds else float("nan")
        failed = sum(self.failed.values())
        return (f"asked {self.asked}, answered {self.answered} (whole answer after {mean:.1f} s on average), "
                f"rejected with 429 {self.rejected}, failed {failed}")


class SimulatedClass:
    """``students`` threads, each one a student of group ``i % len(keys)`` who asks a question
    (``POST /v1/chat/completions``), reads and thinks for ``think`` seconds (uniform), and asks again,
    until ``seconds`` have passed. A 429 is counted and the student asks again after its
    ``Retry-After``. Everyone starts within the first two seconds, as when the teacher says "go"; nobody
    asks after ``seconds`` (the questions still being answered then are waited for)."""

    def __init__(self, url: str, keys: Sequence[str] | str | None = None, *, students: int = 30,
                 think: tuple[float, float] = (5.0, 20.0), max_tokens: int = 128, model: str | None = None,
                 questions: Sequence[str] = QUESTIONS, seed: int = 0, timeout: float = 300.0):
        self.url = url.rstrip("/")
        self.keys = [keys] if isinstance(keys, str) else list(keys or [None])
        self.students, self.think, self.max_tokens = students, think, max_tokens
        self.model, self.questions, self.seed, self.timeout = model, list(questions), seed, timeout
        self.result = ClassResult()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.deadline = 0.0

    def _headers(self, i: int) -> dict[str, str]:
        key = self.keys[i % len(self.keys)]
        return {"Authorization": f"Bearer {key}"} if key else {}

    def start(self, seconds: float) -> "SimulatedClass":
        import requests

        if self.model is None:
            r = requests.get(self.url + "/v1/models", headers=self._headers(0), timeout=30)
            r.raise_for_status()
            self.model = r.json()["data"][0]["id"]
        self.deadline = time.monotonic() + seconds
        self._threads = [threading.Thread(target=self._student, args=(i,), name=f"student-{i}", daemon=True)
                         for i in range(self.students)]
        for t in self._threads:
            t.start()
        return self

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> ClassResult:
        end = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if end is None else max(0.0, end - time.monotonic()))
        return self.result

    def _student(self, i: int) -> None:
        import requests

        rng = random.Random(self.seed * 100_003 + i)
        session = requests.Session()
        session.headers.update(self._headers(i))
        self._stop.wait(rng.uniform(0, 2))
        while not self._stop.is_set() and time.monotonic() < self.deadline:
            body = {"model": self.model, "max_tokens": self.max_tokens,
                    "messages": [{"role": "user", "content": rng.choice(self.questions)}]}
            started = time.monotonic()
            wait = rng.uniform(*self.think)
            try:
                r = session.post(self.url + "/v1/chat/completions", json=body, timeout=self.timeout)
                status, text = r.status_code, r.text
            except requests.RequestException as exc:
                status, text = type(exc).__name__, str(exc)
            with self._lock:
                self.result.asked += 1
                if status == 200:
                    self.result.answered += 1
                    self.result.seconds.append(time.monotonic() - started)
                elif status == 429:
                    self.result.rejected += 1
                    retry = r.headers.get("Retry-After", "1")
                    self.result.retry_after[retry] += 1
                    wait = float(retry) if retry.replace(".", "", 1).isdigit() else 1.0
                else:
                    self.result.failed[status] += 1
                    if len(self.result.errors) < 5:
                        self.result.errors.append(f"{status}: {text[:200]}")
            self._stop.wait(min(wait, max(0.0, self.deadline - time.monotonic())))  # not past the end
        session.close()


# --------------------------------------------------------------------------- the dashboard


@dataclass(frozen=True)
class Sample:
    """One reading of ``GET /metrics``, ``t`` seconds after the watch started."""

    t: float
    running: float
    waiting: float
    generated: float      # generation tokens of finished requests, since the server started
    ttft_sum: float
    ttft_count: float
    rejected: float

    @classmethod
    def read(cls, url: str, t: float) -> "Sample":
        from .client import metrics

        m = metrics(url)
        p = "helpers:"
        return cls(t=t, running=m.get(p + "num_requests_running", 0.0), waiting=m.get(p + "num_requests_waiting", 0.0),
                   generated=m.get(p + "generation_tokens_total", 0.0),
                   ttft_sum=m.get(p + "time_to_first_token_seconds_sum", 0.0),
                   ttft_count=m.get(p + "time_to_first_token_seconds_count", 0.0),
                   rejected=m.get(p + "request_rejected_total", 0.0))


def rates(samples: Sequence[Sample], window: float = 5.0) -> dict[str, list[float]]:
    """Per sample: tokens per second and the mean time to first token of the requests that finished
    in the last ``window`` seconds (the counters grow when a request finishes), and 429s so far."""
    out: dict[str, list[float]] = {"t": [], "running": [], "waiting": [], "tokens_per_s": [], "ttft": [],
                                   "rejected": []}
    if not samples:
        return out
    first = samples[0]
    j = 0
    for s in samples:
        while j < len(samples) - 1 and samples[j].t < s.t - window:
            j += 1
        base = samples[j] if samples[j].t < s.t else None
        out["t"].append(s.t)
        out["running"].append(s.running)
        out["waiting"].append(s.waiting)
        out["rejected"].append(s.rejected - first.rejected)
        if base is None:
            out["tokens_per_s"].append(math.nan)
            out["ttft"].append(math.nan)
            continue
        out["tokens_per_s"].append((s.generated - base.generated) / (s.t - base.t))
        finished = s.ttft_count - base.ttft_count
        out["ttft"].append((s.ttft_sum - base.ttft_sum) / finished if finished > 0 else math.nan)
    return out


class Dashboard:
    """Reads ``/metrics`` every ``every`` seconds and redraws one figure in place (a PNG display
    updated by its display id), until the watched class is over."""

    def __init__(self, url: str, *, max_batch: int | None = None, max_queue: int | None = None,
                 window: float = 5.0, title: str = ""):
        self.url = url.rstrip("/")
        self.max_batch, self.max_queue, self.window, self.title = max_batch, max_queue, window, title
        self.samples: list[Sample] = []
        self.frames = 0  # figures drawn
        self._t0: float | None = None
        self._handle = None

    def read(self) -> Sample:
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
        sample = Sample.read(self.url, now - self._t0)
        self.samples.append(sample)
        return sample

    def figure(self, note: str = ""):
        from matplotlib.figure import Figure

        series = rates(self.samples, self.window)
        fig = Figure(figsize=(9, 6.4), dpi=90)
        top, middle, bottom = fig.subplots(3, 1, sharex=True)
        t = series["t"]
        top.step(t, series["running"], where="post", label="running (generating)", color="tab:green")
        top.step(t, series["waiting"], where="post", label="waiting (queued)", color="tab:orange")
        if self.max_batch:
            top.axhline(self.max_batch, color="tab:green", linestyle=":", linewidth=1,
                        label=f"max_batch {self.max_batch}")
        if self.max_queue:
            top.axhline(self.max_queue, color="tab:orange", linestyle=":", linewidth=1,
                        label=f"max_queue {self.max_queue}")
        top.set_ylabel("requests")
        top.set_ylim(bottom=0)
        top.legend(loc="upper left", fontsize=8, ncols=2)
        middle.plot(t, series["tokens_per_s"], color="tab:blue")
        middle.set_ylabel("tokens / s")
        middle.set_ylim(bottom=0)
        bottom.plot(t, series["ttft"], color="tab:purple", marker=".", linestyle="-")
        bottom.set_ylabel("first token (s)")
        bottom.set_ylim(bottom=0)
        bottom.set_xlabel("seconds")
        for ax in (top, middle, bottom):
            ax.grid(True, alpha=0.3)
        rejected = series["rejected"][-1] if t else 0
        title = self.title or "the class on /metrics"
        fig.suptitle(f"{title}: {rejected:.0f} rejected (429){'  |  ' + note if note else ''}", fontsize=11)
        middle.set_title(f"tokens/s and first-token time: requests finished in the last {self.window:g} s",
                         fontsize=9, loc="left")
        fig.tight_layout()
        return fig

    def draw(self, note: str = "") -> None:
        """Show the current figure (the first call adds the output, later calls replace it)."""
        from IPython.display import Image, display

        image = Image(data=figure_png(self.figure(note)), format="png")
        if self._handle is None:
            self._handle = display(image, display_id=True)
        else:
            self._handle.update(image)
        self.frames += 1

    def watch(self, simulated: SimulatedClass | None = None, seconds: float | None = None,
              every: float = 1.0) -> list[Sample]:
        """Read and redraw every ``every`` seconds while ``simulated`` runs (or for ``seconds``)."""
        end = time.monotonic() + seconds if seconds is not None else None
        while True:
            # decided before reading, so that the last frame shows every finished request
            over = (simulated is not None and not simulated.running) or (end is not None and time.monotonic() >= end)
            self.read()
            note = ""
            if simulated is not None:
                r = simulated.result
                note = f"asked {r.asked}, answered {r.answered}" + ("  (class over)" if over else "")
            self.draw(note)
            if over or (simulated is None and end is None):
                return self.samples
            time.sleep(every)


@dataclass
class ClassReport:
    result: ClassResult
    samples: list[Sample]
    frames: int

    def summary(self) -> str:
        return self.result.summary()


def run_class(url: str, keys: Sequence[str] | str | None = None, *, students: int = 30, seconds: float = 120,
              think: tuple[float, float] = (5.0, 20.0), max_tokens: int = 128, max_batch: int | None = None,
              max_queue: int | None = None, every: float = 1.0, seed: int = 0) -> ClassReport:
    """Simulate a class for ``seconds`` and draw the live dashboard meanwhile (in a notebook cell)."""
    simulated = SimulatedClass(url, keys, students=students, think=think, max_tokens=max_tokens, seed=seed)
    dashboard = Dashboard(url, max_batch=max_batch, max_queue=max_queue,
                          title=f"{students} students, {seconds:g} s")
    dashboard.read()  # the counters before the first question
    simulated.start(seconds)
    try:
        dashboard.watch(simulated, every=every)
    finally:
        simulated.stop()
        simulated.join(60)
    return ClassReport(simulated.result, dashboard.samples, dashboard.frames)


# --------------------------------------------------------------------------- overload


def burst(url: str, key: str | None, n: int, *, model: str, max_tokens: int = 32,
          prompt: str = "讲一个笑话。") -> list[Any]:
    """``n`` requests at the same moment (one thread each); returns their ``requests.Response``s in
    order, so you can look at the status codes and the ``Retry-After`` of the 429s."""
    import requests

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": prompt}]}
    out: list[Any] = [None] * n
    go = threading.Barrier(n)

    def one(i: int) -> None:
        go.wait()
        out[i] = requests.post(url.rstrip("/") + "/v1/chat/completions", json=body, headers=headers, timeout=300)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out
