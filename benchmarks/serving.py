"""Serving benchmark: our server vs a seed-tutorial-style server vs the offline ceiling.

For 1, 4, 8 and 16 concurrent clients (each sends REQUESTS requests back to back on its own
keep-alive connection, 64 new tokens each, greedy, no repetition penalty, stop tokens ignored so
every answer has the same length) it prints tokens per
second, time to first token, p50/p99 latency and the p99 of ``GET /health`` polled during the
load, for

  (a) ours:    ``python -m helpers serve`` (continuous batching), streaming clients;
  (b) seed:    benchmarks/seed_server.py (``async def`` endpoint calling generate());
  (c) ceiling: the same requests as one offline batched ``generate()`` call, no server;
  (d) optional, with ``--transformers-serve PYTHON`` (or ``HF_SERVE_PYTHON``): ``transformers serve
      --continuous-batching`` (paged attention), streaming clients, on the same stand-in;
  (e) optional, with ``--vllm [PYTHON]``: vLLM direct: a vLLM OpenAI server (``helpers.vllm.VLLMServer``,
      from its own venv) asked on its own ``/v1/completions``, streaming, with the prompt as token ids;
  (f) with (e): vLLM through our front: ``python -m helpers serve --upstream <that vLLM server>`` (an
      ``UpstreamGenerator``), streaming clients on our ``/v1/chat/completions`` exactly as for (a);

plus a lone request through our server against a bare ``generate()`` (and, with (e), a lone request to
vLLM direct and through the front). Every server runs in its own process with one torch thread; the
clients run here. Everything is loopback only.

    python benchmarks/serving.py                 # the tiny stand-in and the bench stand-in
    python benchmarks/serving.py --size bench --clients 8 --runs 1
    python benchmarks/serving.py --vllm          # + (e) and (f); vLLM from $VLLM_PYTHON or scripts/setup_vllm.sh's venv

Column (d) needs a newer transformers than the project's pinned 4.48.3, so it lives in a venv of
its own; make it once with (the CPU torch 2.13.0 first, then the pinned transformers[serving])

    bash benchmarks/setup_transformers_serve.sh /work/tsvenv
    python benchmarks/serving.py --transformers-serve /work/tsvenv/bin/python   # or .../bin/transformers

How (d) is run, so that it does the same work as (a):

* the stand-in is copied to a sibling folder ``<stand-in>-hfserve`` whose tokenizer_config.json
  gets the ChatML chat template (the stand-ins ship none), with Qwen's default system prompt: the
  prompt token ids are the ones our server builds for the "qwen" family;
* ``transformers serve <that folder> --continuous-batching --device cpu --dtype DTYPE
  --cb-num-blocks N``, DTYPE being the stand-in's as for every column (float32 for tiny, bfloat16
  for bench; the model is preloaded; without ``--cb-num-blocks`` the KV cache takes 60% of the
  free RAM on CPU), ``OMP_NUM_THREADS=1``, ``HF_HUB_OFFLINE=1``; its log goes to a file;
* requests name the model by that folder's path; ``ignore_eos`` is refused there (422), so each
  request carries a ``generation_config`` field instead, the JSON string
  ``{"eos_token_id": -1, "do_sample": false}`` (-1 = no EOS: every answer is --tokens long);
  tokens are counted from ``usage``, which it puts on the last chunk (it ignores
  ``stream_options``);
* its continuous batching drops ``repetition_penalty``, so every column runs without one (the
  stand-in's generation_config.json says 1.1: our requests and the seed-style server pass 1.0),
  and it is initialised with the first request's generation settings, so a warm-up request with
  the same settings goes first; ``GET /health`` exists there too and is polled the same way.

How (e) and (f) are run, so that they do the same work as (a):

* the model: vLLM 0.32 serves Qwen2 natively but no longer Qwen v1. The bench stand-in is a native
  ``Qwen2ForCausalLM``: vLLM serves that very folder. The tiny "qwen" stand-in is Qwen v1 remote code
  (``QWenLMHeadModel``): vLLM serves its conversion to Qwen2 (``helpers.convert.convert_qwen``, into
  ``<stand-in>-qwen2``: the same weights and the same logits), while (a)-(d) run the stand-in itself;
  the output says which folder each side ran;
* the prompt ids are our ChatFormat's (what (a) and (c) run), and (e) sends vLLM the very body our front
  sends for (f): it is built by the same code (``UpstreamGenerator._encode`` and ``request_body``, with
  the settings our server derives from (a)'s request: greedy, ``repetition_penalty`` 1.0, ``ignore_eos``,
  the family's stop strings, ``max_tokens`` = --tokens, stream with usage); so (f) vs (e)
  is the cost of the front alone: our HTTP layer, encoding, one more HTTP hop, re-streaming;
* tokens are counted from ``usage`` in every streamed column, and each load checks that every
  column generated clients x requests x tokens tokens: a column whose answers stopped early is named
  in a WARNING line under the tables (its tok/s would not be comparable). With ``ignore_eos`` vLLM
  skips only the model's EOS, not ``stop_token_ids``: the front must leave those out of an
  ``ignore_eos`` request for (e) and (f) to generate every token, as the built-in engine does;
* dtype: every column runs in the stand-in's dtype, vLLM too (float32 for tiny, bfloat16 for bench;
  ``--vllm-dtype`` overrides it for vLLM alone). A float32 vLLM against bfloat16 columns would compare
  dtypes, not servers (on this CPU vLLM served the bench stand-in at 37 tok/s to one client in float32,
  68 in bfloat16). The project serves vLLM in float32 on CPUs by default because its bfloat16 CPU
  attention (the "amx" kernels) killed the worker when the FIRST request after start had a 2-4-token
  prompt; every prompt here is a ChatML conversation with Qwen's system prompt (26 tokens for the
  warm-up, 55 for the measured ones), which never triggered it. If vLLM dies anyway the benchmark
  stops with its log (vllm-<port>.log in the temp folder); then use ``--vllm-dtype fp32``;
* vLLM is started as ``python -m helpers serve --engine vllm`` starts it: ``--generation-config vllm``,
  ``--max-model-len`` = the context our server uses, ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB of KV cache),
  its default CPU thread binding (the model's one OpenMP thread on core 0, its API server and engine
  core on the rest: "Reducing Torch threads from 2 to 1"); ``--vllm-arg`` adds arguments. Under load
  vLLM alone keeps both of this box's cores busy (the worker one, its engine core polling most of the
  other), so the front and the clients take their CPU from vLLM: the front's overhead here includes
  that contention (on a GPU box the front's CPU is not the model's), and on the tiny stand-in (steps
  under 1 ms, a few thousand tokens a second to relay) the vLLM columns swing with every other process
  on the machine: read the per-round figures printed next to the median;
* (e) and (f) are measured back to back, last in each round, their order swapped every round; the
  front's overhead is the median over the rounds of each pair's ratio;
* its ``/health`` (and the front's) is polled like the others'; its peak memory is the sum over its
  processes (API server, engine core, worker).

All servers are started at once and stay up (idle) while the others are measured; the runs are
interleaved (each round measures the ceiling and every server for each client count in turn) so
that this shared machine's slow and fast spells fall on all of them alike. Figures are medians
over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(n: int) -> list[str]:
    return [f"第 {i} 个问题：请写一段关于春天的文字。Question {i}: tell me about spring." for i in range(n)]


def pct(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


# --------------------------------------------------------------------------- servers


class Server:
    """A server in its own process. ``log``: a file for its stderr instead of a pipe (transformers
    serve logs a line per request: a pipe nobody reads would fill up and stall it)."""

    def __init__(self, cmd, port, *, env=None, log=None, start_timeout=120):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env or {}))
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        stderr = subprocess.PIPE if log is None else open(log, "w")  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        finally:
            if log is not None:
                stderr.close()
        deadline = time.time() + start_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.errors()}")
            try:
                r = requests.get(self.url + "/health", timeout=1)
                if r.status_code == 200 and r.json().get("status") == "ok":
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not start: {self.errors()[-2000:]}")

    def errors(self) -> str:
        if self.log is None:
            return self.proc.stderr.read() if self.proc.poll() is not None else ""
        return Path(self.log).read_text(errors="replace")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# The dtype each stand-in runs in (every column alike): the bench stand-in in bfloat16, as the real
# models run on the GPU box (see SIZES in helpers/tiny.py for why).
DTYPES = {"tiny": "fp32", "bench": "bf16"}
HF_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def log_file(name, port) -> Path:
    return Path(tempfile.gettempdir()) / f"{name}-{port}.log"


def ours(model_dir, port, dtype, max_batch=16):
    # its log to a file: it writes a line per finished request, which would fill an unread pipe
    return Server([sys.executable, "-m", "helpers", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
                   "--port", str(port), "--log-level", "warning", "--max-batch", str(max_batch),
                   "--dtype", dtype], port, log=log_file("ours", port))


def front(model_dir, port, upstream_url):
    """(f): our server with an UpstreamGenerator in front of the vLLM server at ``upstream_url``
    (``--upstream``: it loads the tokenizer side of ``model_dir`` only)."""
    return Server([sys.executable, "-m", "helpers", "serve", "--model", str(model_dir), "--family", "qwen",
                   "--upstream", upstream_url, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                  port, log=log_file("front", port))


def seed(model_dir, port, dtype):
    return Server([sys.executable, str(ROOT / "benchmarks" / "seed_server.py"), str(model_dir), str(port), dtype],
                  port)


# ChatML as our "qwen" format writes it (QwenFormat in helpers/formats.py): Qwen's default system
# prompt unless the conversation starts with a system message.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# Per-request settings for transformers serve: no EOS (-1), greedy. Its continuous batching takes
# the sampling settings of the first request it sees, so the warm-up request sends the same.
HF_GENERATION_CONFIG = json.dumps({"eos_token_id": -1, "do_sample": False})


def hf_model_dir(model_dir) -> Path:
    """A copy of a stand-in folder beside it (``<name>-hfserve``) with the ChatML chat template in
    tokenizer_config.json: transformers serve renders prompts with the tokenizer's chat template."""
    model_dir = Path(model_dir)
    target = model_dir.with_name(model_dir.name + "-hfserve")
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(model_dir, target)
    config_file = target / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["chat_template"] = CHATML_TEMPLATE
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return target


def hf_cli(executable) -> list[str]:
    """The command that runs the ``transformers`` CLI: the venv's ``transformers`` script itself, or
    its python running the CLI's entry point."""
    if Path(executable).name.startswith("python"):
        return [str(executable), "-c", ("import sys; from transformers.cli.transformers import main; "
                                        "sys.argv[0] = 'transformers'; sys.exit(main())")]
    return [str(executable)]


def hf_version(executable) -> str:
    out = subprocess.run([*hf_cli(executable), "version"], check=False, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))
    if out.returncode != 0:
        raise RuntimeError(f"{executable} cannot run the transformers CLI: {out.stderr.strip()[-2000:]}")
    return out.stdout.strip().splitlines()[-1]


def hf_serve(model_dir, port, executable, dtype, num_blocks=64):
    """``transformers serve`` with continuous batching on the CPU, the model preloaded.
    It only listens once the model is loaded, so /health answering means ready (a longer timeout
    than ours: importing transformers 5 and its server takes a while)."""
    log = Path(tempfile.gettempdir()) / f"hfserve-{port}.log"
    return Server([*hf_cli(executable), "serve", str(model_dir), "--continuous-batching", "--device", "cpu",
                   "--dtype", HF_DTYPES[dtype], "--cb-num-blocks", str(num_blocks), "--host", "127.0.0.1",
                   "--port", str(port), "--log-level", "warning"], port,
                  env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}, log=log, start_timeout=300)


# vLLM's CPU build: GiB of KV cache (its default, 4, is more than this benchmark needs)
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


def vllm_model_dir(model_dir) -> tuple[Path, str]:
    """The folder vLLM serves for a stand-in, and what it is: the stand-in itself if it is a native
    Qwen2 (bench), else (tiny: Qwen v1 remote code) its conversion to Qwen2 beside it."""
    from helpers.convert import convert_qwen

    model_dir = Path(model_dir)
    if "Qwen2ForCausalLM" in architecture(model_dir):
        return model_dir, "the stand-in itself (Qwen2ForCausalLM, native in vLLM)"
    target = convert_qwen(model_dir, model_dir.with_name(model_dir.name + "-qwen2"), overwrite=True)
    return Path(target), (f"{Path(target).name}: the Qwen v1 stand-in converted to Qwen2ForCausalLM by "
                          "helpers.convert.convert_qwen (same weights, same logits)")


def architecture(model_dir) -> str:
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    return ", ".join(config.get("architectures") or ["?"])


def vllm_serve(model_dir, python, dtype, extra=()):
    """(e): a vLLM OpenAI server for ``model_dir``, started the way ``helpers serve --engine vllm``
    starts it (``helpers.vllm.VLLMServer``), its log in a file."""
    from helpers.loading import load_tokenizer_side
    from helpers.vllm import VLLMServer

    loaded = load_tokenizer_side(model_dir, family="qwen")
    port = free_port()
    log = log_file("vllm", port)
    log.write_text("")

    def write(line, path=log):
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    process = VLLMServer(model_dir, "qwen", served_name=loaded.name, python=python, port=port,
                         max_model_len=loaded.context_length, dtype=HF_DTYPES[dtype], extra=list(extra),
                         env={**VLLM_ENV, "OMP_NUM_THREADS": "1"}, log=write)
    process.log_file = log
    try:
        process.start(timeout=900)
    except Exception:
        process.stop()
        raise
    return process, loaded


def vllm_version(python) -> str:
    out = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], check=False, capture_output=True,
                         text=True, timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    if out.returncode != 0:
        raise RuntimeError(f"{python} cannot import vllm: {out.stderr.strip()[-2000:]}")
    return out.stdout.strip().splitlines()[-1]


def group_rss_mb(pgid) -> float:
    """Peak RSS summed over the processes of a process group (vLLM: API server, engine core, worker)."""
    total = 0.0
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # field 5 of /proc/PID/stat: the process group
                total += peak_rss_mb(int(status.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    return total


# --------------------------------------------------------------------------- clients


def stream_chat(http, url, body):
    """POST a streaming chat completion; return (completion tokens, time to first content, total
    time). Tokens come from ``usage`` (if a stream has none, content chunks are counted); an
    error event in the stream raises."""
    t0 = time.perf_counter()
    first = None
    n = chunks = 0
    with http.post(url + "/v1/chat/completions", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"error in the stream: {chunk['error']}")
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                chunks += 1
                if first is None:
                    first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return n or chunks, total if first is None else first, total


def ask_ours(http, url, model, prompt, tokens):
    return stream_chat(http, url, {
        "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
        "temperature": 0, "repetition_penalty": 1.0, "stream": True, "ignore_eos": True,
        "stream_options": {"include_usage": True}})


def ask_hf(http, url, model, prompt, tokens):
    """For transformers serve: the model is the served folder's path and EOS is turned off
    through ``generation_config``."""
    return stream_chat(http, url, {
        "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
        "temperature": 0, "stream": True, "generation_config": HF_GENERATION_CONFIG})


class VLLMDirect:
    """(e)'s requests: for each prompt, the ``/v1/completions`` body our front sends vLLM for (a)'s
    request (built by the same code, ``UpstreamGenerator``, with the settings our server derives from
    (a)'s request body), cached so that the clients only send it."""

    def __init__(self, loaded, served_name):
        from helpers.upstream import UpstreamGenerator

        self.generator = UpstreamGenerator(loaded, "http://unused", upstream_model=served_name)  # never started
        self.bodies: dict[tuple[str, int], dict] = {}

    def body(self, prompt, tokens) -> dict:
        key = (prompt, tokens)
        if key not in self.bodies:
            g = self.generator
            # as helpers.server's sampling() for ask_ours's body
            params = g.params(max_new_tokens=tokens, temperature=0.0, repetition_penalty=1.0, ignore_eos=True)
            handle = g._encode([{"role": "user", "content": prompt}], params, None)
            self.bodies[key] = g.request_body(handle)
        return self.bodies[key]

    def ask(self, http, url, model, prompt, tokens):
        """Stream one completion; (completion tokens, time to first text, total time)."""
        body = self.body(prompt, tokens)
        t0 = time.perf_counter()
        first = None
        n = chunks = 0
        with http.post(url + "/v1/completions", json=body, stream=True, timeout=600) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"error in the stream: {chunk['error']}")
                if chunk.get("usage"):
                    n = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter() - t0
        total = time.perf_counter() - t0
        return n or chunks, total if first is None else first, total


def ask_seed(http, url, model, prompt, tokens):
    t0 = time.perf_counter()
    r = http.post(url, json={"prompt": prompt, "history": [], "max_length": tokens}, timeout=600)
    r.raise_for_status()
    elapsed = time.perf_counter() - t0
    return r.json()["tokens"], elapsed, elapsed  # no streaming: the first token comes with the last


def load(url, ask, model, clients, per_client, tokens):
    """``clients`` threads, each sending ``per_client`` requests back to back on its own
    keep-alive connection, while another thread polls ``/health``."""
    results, errors = [], []
    health = []
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                requests.get(url + "/health", timeout=30)
                health.append(time.perf_counter() - t0)
            except requests.RequestException:
                health.append(30.0)
            time.sleep(0.02)

    def client(i):
        with requests.Session() as http:  # one keep-alive connection per client, like the openai client
            for j in range(per_client):
                try:
                    results.append(ask(http, url, model, prompts(clients * per_client)[i * per_client + j], tokens))
                except Exception as exc:  # noqa: BLE001
                    errors.append(exc)

    poller = threading.Thread(target=poll, daemon=True)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    poller.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    stop.set()
    poller.join()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0]!r}")
    total = sum(r[0] for r in results)
    return {"tok_s": total / wall, "ttft": statistics.median(r[1] for r in results),
            "p50": pct([r[2] for r in results], 50), "p99": pct([r[2] for r in results], 99),
            "health_p99": pct(health, 99), "tokens": total}


# --------------------------------------------------------------------------- offline ceiling


class Offline:
    """The ceiling: the same requests as offline batched ``generate()`` calls (``clients`` prompts
    per call), in this process, no server."""

    def __init__(self, model_dir, dtype):
        import torch

        from helpers.loading import load_model

        torch.set_num_threads(1)
        self.loaded = load_model(model_dir, dtype=dtype)
        self.generate([prompts(1)[0]], 4)  # warm up

    def generate(self, texts, tokens) -> int:
        import torch

        loaded = self.loaded
        batch = [loaded.chat_format.encode(loaded.tokenizer, [{"role": "user", "content": p}]) for p in texts]
        width = max(len(x) for x in batch)
        ids = torch.tensor([[loaded.pad_id] * (width - len(x)) + x for x in batch])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch])
        out = loaded.model.generate(ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                                    do_sample=False, temperature=1.0, top_p=1.0, top_k=50, repetition_penalty=1.0,
                                    eos_token_id=loaded.stop_ids, pad_token_id=loaded.pad_id)
        return (out.shape[1] - width) * len(batch)

    def load(self, clients, per_client, tokens):
        texts = prompts(clients * per_client)
        t0 = time.perf_counter()
        total = sum(self.generate(texts[i:i + clients], tokens) for i in range(0, len(texts), clients))
        return {"tok_s": total / (time.perf_counter() - t0)}

    def lone(self, tokens) -> float:
        t0 = time.perf_counter()
        self.generate(prompts(1), tokens)
        return time.perf_counter() - t0


# --------------------------------------------------------------------------- main


def medians(got: list[dict]) -> dict:
    return {k: statistics.median(g[k] for g in got) for k in got[0]}


def peak_rss_mb(pid) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def run(size, clients_list, per_client, tokens, runs, hf=None, hf_num_blocks=64, dtype=None, vllm=None,
        vllm_dtype=None, vllm_extra=()):
    """``hf``: the python (or ``transformers`` script) of a venv with transformers serve, for (d);
    ``vllm``: the python of a venv with vLLM, for (e) and (f)."""
    from helpers.tiny import build_tiny

    model_dir = build_tiny("qwen", Path(tempfile.gettempdir()) / f"helpers-bench-{size}", size=size)
    model = "qwen-7b-chat"
    dtype = dtype or DTYPES[size]
    vdtype = vllm_dtype or dtype
    rows = []
    short = []  # (column, clients, tokens generated, tokens asked for)
    # All servers run (idle) side by side and the runs are interleaved: every round measures the
    # ceiling and each server in turn, so that this shared machine's slow and fast spells fall on
    # all of them alike; each figure is the median over the rounds.
    servers = []
    vllm_proc = None
    try:
        servers.append(ours(model_dir, free_port(), dtype))
        servers.append(seed(model_dir, free_port(), dtype))
        mine_srv, seed_srv = servers[0], servers[1]
        hf_srv = vllm_front = direct = None
        if hf:
            hf_dir = hf_model_dir(model_dir)
            hf_srv = hf_serve(hf_dir, free_port(), hf, dtype, num_blocks=hf_num_blocks)
            servers.append(hf_srv)
        if vllm:
            vllm_dir, vllm_what = vllm_model_dir(model_dir)
            vllm_proc, vllm_loaded = vllm_serve(vllm_dir, vllm, vdtype, vllm_extra)
            direct = VLLMDirect(vllm_loaded, vllm_proc.served_name)
            vllm_front = front(vllm_dir, free_port(), vllm_proc.url)
            servers.append(vllm_front)
        ask_ours(requests, mine_srv.url, model, "warm up", 4)
        ask_seed(requests, seed_srv.url, model, "warm up", 4)
        if hf:
            ask_hf(requests, hf_srv.url, str(hf_dir), "warm up", 4)  # also starts its batching with these settings
        if vllm:
            direct.ask(requests, vllm_proc.url, model, "warm up", 4)
            ask_ours(requests, vllm_front.url, model, "warm up", 4)
        ceiling = Offline(model_dir, dtype)
        columns = [("ours", mine_srv.url, ask_ours, model), ("seed", seed_srv.url, ask_seed, model)]
        if hf:
            columns.append(("hf", hf_srv.url, ask_hf, str(hf_dir)))
        if vllm:
            columns += [("vllm", vllm_proc.url, direct.ask, model), ("front", vllm_front.url, ask_ours, model)]
        got = {name: {c: [] for c in clients_list} for name in ["offline"] + [col[0] for col in columns]}
        lones = {"bare": [], "ours": [], "vllm": [], "front": []}
        adds = {c: [] for c in clients_list}  # per round: (e) tok/s / (f) tok/s - 1, the two measured back to back
        with requests.Session() as http:
            for r in range(runs):
                for c in clients_list:
                    got["offline"][c].append(ceiling.load(c, per_client, tokens))
                    # (e) and (f) last and back to back, their order swapped every round (e f, f e, ...)
                    order = columns if r % 2 == 0 or not vllm else columns[:-2] + columns[:-3:-1]
                    for name, url, ask, name_in_request in order:
                        result = load(url, ask, name_in_request, c, per_client, tokens)
                        got[name][c].append(result)
                        if result["tokens"] < c * per_client * tokens:
                            short.append((name, c, result["tokens"], c * per_client * tokens))
                    if vllm:
                        adds[c].append(got["vllm"][c][-1]["tok_s"] / got["front"][c][-1]["tok_s"] - 1)
                for _ in range(3):
                    lones["bare"].append(ceiling.lone(tokens))
                    lones["ours"].append(ask_ours(http, mine_srv.url, model, prompts(1)[0], tokens)[2])
                    if vllm:
                        lones["vllm"].append(direct.ask(http, vllm_proc.url, model, prompts(1)[0], tokens)[2])
                        lones["front"].append(ask_ours(http, vllm_front.url, model, prompts(1)[0], tokens)[2])
        med = {name: {c: medians(got[name][c]) for c in clients_list} for name in got}
        ceilings, mine, theirs = med["offline"], med["ours"], med["seed"]
        hfs = med.get("hf", {})
        ours_rss, seed_rss = peak_rss_mb(mine_srv.proc.pid), peak_rss_mb(seed_srv.proc.pid)
        hf_rss = peak_rss_mb(hf_srv.proc.pid) if hf else None
        if vllm:
            vllm_rss, front_rss = group_rss_mb(vllm_proc.proc.pid), peak_rss_mb(vllm_front.proc.pid)
    finally:
        for server in servers:
            server.stop()
        if vllm_proc is not None:
            if vllm_proc.returncode is not None:
                print(f"vLLM exited with code {vllm_proc.returncode} during the benchmark: its log is "
                      f"{vllm_proc.log_file}", file=sys.stderr)
            vllm_proc.stop()

    print(f"\n## {size} stand-in ({architecture(model_dir)}, {HF_DTYPES[dtype]}), {tokens} new tokens per request, "
          f"{per_client} requests per client, median of {runs} runs\n")
    if not hf:
        print("| clients | ours tok/s | seed tok/s | offline tok/s | ours/seed | ours/offline | ours TTFT | seed TTFT "
              "| ours p50 / p99 | seed p50 / p99 | ours /health p99 | seed /health p99 |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for c in clients_list:
            m, s, o = mine[c], theirs[c], ceilings[c]
            print(f"| {c} | {m['tok_s']:.0f} | {s['tok_s']:.0f} | {o['tok_s']:.0f} | {m['tok_s'] / s['tok_s']:.1f}x "
                  f"| {m['tok_s'] / o['tok_s']:.2f}x | {m['ttft'] * 1000:.0f} ms | {s['ttft'] * 1000:.0f} ms "
                  f"| {m['p50'] * 1000:.0f} / {m['p99'] * 1000:.0f} ms "
                  f"| {s['p50'] * 1000:.0f} / {s['p99'] * 1000:.0f} ms "
                  f"| {m['health_p99'] * 1000:.1f} ms | {s['health_p99'] * 1000:.0f} ms |")
    else:
        print(f"(d) hf = transformers serve (CB): transformers {hf_version(hf)}, --continuous-batching "
              f"--cb-num-blocks {hf_num_blocks}, {HF_DTYPES[dtype]} on the CPU, no EOS via generation_config; "
              "its /health polled like ours\n")
        print("| clients | ours tok/s | seed tok/s | offline tok/s | hf tok/s | ours/seed | ours/offline | ours/hf "
              "| ours TTFT | seed TTFT | hf TTFT | ours p50 / p99 | seed p50 / p99 | hf p50 / p99 "
              "| ours /health p99 | seed /health p99 | hf /health p99 |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for c in clients_list:
            m, s, o, h = mine[c], theirs[c], ceilings[c], hfs[c]
            print(f"| {c} | {m['tok_s']:.0f} | {s['tok_s']:.0f} | {o['tok_s']:.0f} | {h['tok_s']:.0f} "
                  f"| {m['tok_s'] / s['tok_s']:.1f}x | {m['tok_s'] / o['tok_s']:.2f}x | {m['tok_s'] / h['tok_s']:.2f}x "
                  f"| {m['ttft'] * 1000:.0f} ms | {s['ttft'] * 1000:.0f} ms | {h['ttft'] * 1000:.0f} ms "
                  f"| {m['p50'] * 1000:.0f} / {m['p99'] * 1000:.0f} ms "
                  f"| {s['p50'] * 1000:.0f} / {s['p99'] * 1000:.0f} ms "
                  f"| {h['p50'] * 1000:.0f} / {h['p99'] * 1000:.0f} ms "
                  f"| {m['health_p99'] * 1000:.1f} ms | {s['health_p99'] * 1000:.0f} ms "
                  f"| {h['health_p99'] * 1000:.1f} ms |")
    bare, lone = statistics.median(lones["bare"]), statistics.median(lones["ours"])
    print(f"\nLone request (median of {len(lones['ours'])}): {lone * 1000:.0f} ms through our server (streaming) vs "
          f"{bare * 1000:.0f} ms "
          f"for a bare generate() ({lone / bare:.2f}x). Peak memory (RSS): ours {ours_rss:.0f} MB, "
          f"seed-style {seed_rss:.0f} MB" + (f", transformers serve {hf_rss:.0f} MB." if hf else "."))
    if vllm:
        vs, fs = med["vllm"], med["front"]
        print(f"\n### vLLM on the {size} stand-in: (e) vLLM direct and (f) vLLM through our front\n")
        print(f"vLLM {vllm_version(vllm)} (CPU build), {HF_DTYPES[vdtype]}, serving {vllm_what}; "
              f"(a)-(c) above ran {model_dir.name} ({architecture(model_dir)}) in {HF_DTYPES[dtype]}. "
              "(e) streams vLLM's /v1/completions with our prompt ids (the body our front sends); "
              "(f) streams our /v1/chat/completions with --upstream at the same vLLM server. "
              "\"front adds\" = (e) tok/s / (f) tok/s - 1, the extra wall time for the same tokens: the median "
              "over the rounds of that ratio for (e) and (f) measured back to back (in brackets: each round's).\n")
        print("| clients | vLLM direct tok/s | via our front tok/s | front adds | ours tok/s | ours/vLLM direct "
              "| TTFT (direct / front / ours) | p50 / p99 direct | p50 / p99 front "
              "| /health p99 (direct / front) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for c in clients_list:
            v, f, m = vs[c], fs[c], mine[c]
            each = ", ".join(f"{a * 100:+.0f}" for a in adds[c])
            print(f"| {c} | {v['tok_s']:.0f} | {f['tok_s']:.0f} | {statistics.median(adds[c]) * 100:+.1f}% ({each}) "
                  f"| {m['tok_s']:.0f} | {m['tok_s'] / v['tok_s']:.2f}x "
                  f"| {v['ttft'] * 1000:.0f} / {f['ttft'] * 1000:.0f} / {m['ttft'] * 1000:.0f} ms "
                  f"| {v['p50'] * 1000:.0f} / {v['p99'] * 1000:.0f} ms "
                  f"| {f['p50'] * 1000:.0f} / {f['p99'] * 1000:.0f} ms "
                  f"| {v['health_p99'] * 1000:.1f} / {f['health_p99'] * 1000:.1f} ms |")
        lv, lf = statistics.median(lones["vllm"]), statistics.median(lones["front"])
        print(f"\nLone request (median of {len(lones['vllm'])}): vLLM direct {lv * 1000:.0f} ms, through our front "
              f"{lf * 1000:.0f} ms ({(lf / lv - 1) * 100:+.1f}%). Peak memory (RSS): vLLM {vllm_rss:.0f} MB "
              f"(all its processes), our front {front_rss:.0f} MB.")
    for name, c, n, want in sorted(set(short)):
        print(f"WARNING: {name} generated {n} of {want} tokens at {c} clients in a round (answers stopped "
              "early: its tok/s is not comparable)")
    rows.append((size, mine, theirs, ceilings) + ((hfs,) if hf else ()) + ((med["vllm"], med["front"]) if vllm else ()))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "bench", "both"], default="both")
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--requests", type=int, default=4,
                        help="requests per client (its first one also opens the connection: a few more "
                             "measure the steady state rather than the ramp-up)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtype", choices=sorted(HF_DTYPES), default=None,
                        help="run every column in this dtype (default: fp32 for tiny, bf16 for bench)")
    parser.add_argument("--transformers-serve", metavar="PYTHON", default=os.environ.get("HF_SERVE_PYTHON") or None,
                        help="python (or transformers script) of a venv with transformers serve: adds column (d); "
                             "default: $HF_SERVE_PYTHON, else off (make one: benchmarks/setup_transformers_serve.sh)")
    parser.add_argument("--hf-cb-num-blocks", type=int, default=64,
                        help="KV-cache blocks (256 tokens each) for transformers serve's continuous batching")
    parser.add_argument("--vllm", nargs="?", const="", default=None, metavar="PYTHON",
                        help="add columns (e) vLLM direct and (f) vLLM through our front, vLLM from PYTHON "
                             "(default: $VLLM_PYTHON, else the venv of scripts/setup_vllm.sh)")
    parser.add_argument("--vllm-dtype", choices=sorted(HF_DTYPES), default=None,
                        help="vLLM's dtype (default: the stand-in's, as for every column)")
    parser.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                        help="one more argument for vLLM (repeatable), e.g. --vllm-arg=--enforce-eager")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    if args.transformers_serve:
        hf_version(args.transformers_serve)  # fail now, not after the other columns ran
    vllm = None
    if args.vllm is not None:
        from helpers.vllm import vllm_python

        vllm = vllm_python(args.vllm or None)
        vllm_version(vllm)  # fail now, not after the other columns ran
    print(f"# serving benchmark ({os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})")
    for size in (["tiny", "bench"] if args.size == "both" else [args.size]):
        run(size, clients, args.requests, args.tokens, args.runs, hf=args.transformers_serve,
            hf_num_blocks=args.hf_cb_num_blocks, dtype=args.dtype, vllm=vllm, vllm_dtype=args.vllm_dtype,
            vllm_extra=args.vllm_arg)


if __name__ == "__main__":
    main()
