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

plus a lone request through our server against a bare ``generate()``. Every server runs in its
own process with one torch thread; the clients run here. Everything is loopback only.

    python benchmarks/serving.py                 # the tiny stand-in and the bench stand-in
    python benchmarks/serving.py --size bench --clients 8 --runs 1

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


def ours(model_dir, port, dtype, max_batch=16):
    return Server([sys.executable, "-m", "helpers", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
                   "--port", str(port), "--log-level", "warning", "--max-batch", str(max_batch),
                   "--dtype", dtype], port)


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
        return [str(executable), "-c", "import sys; from transformers.cli.transformers import main; "
                "sys.argv[0] = 'transformers'; sys.exit(main())"]
    return [str(executable)]


def hf_version(executable) -> str:
    out = subprocess.run([*hf_cli(executable), "version"], capture_output=True, text=True, timeout=120,
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
    return n or chunks, first, time.perf_counter() - t0


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


def run(size, clients_list, per_client, tokens, runs, hf=None, hf_num_blocks=64, dtype=None):
    """``hf``: the python (or ``transformers`` script) of a venv with transformers serve, for (d)."""
    from helpers.tiny import build_tiny

    model_dir = build_tiny("qwen", Path(tempfile.gettempdir()) / f"helpers-bench-{size}", size=size)
    model = "qwen-7b-chat"
    dtype = dtype or DTYPES[size]
    rows = []
    # All servers run (idle) side by side and the runs are interleaved: every round measures the
    # ceiling and each server in turn, so that this shared machine's slow and fast spells fall on
    # all of them alike; each figure is the median over the rounds.
    servers = []
    try:
        servers.append(ours(model_dir, free_port(), dtype))
        servers.append(seed(model_dir, free_port(), dtype))
        if hf:
            hf_dir = hf_model_dir(model_dir)
            servers.append(hf_serve(hf_dir, free_port(), hf, dtype, num_blocks=hf_num_blocks))
        mine_srv, seed_srv = servers[0], servers[1]
        ask_ours(requests, mine_srv.url, model, "warm up", 4)
        ask_seed(requests, seed_srv.url, model, "warm up", 4)
        if hf:
            ask_hf(requests, servers[2].url, str(hf_dir), "warm up", 4)  # also starts its batching with these settings
        ceiling = Offline(model_dir, dtype)
        got = {name: {c: [] for c in clients_list} for name in ("offline", "ours", "seed", "hf")}
        lones, bares = [], []
        with requests.Session() as http:
            for _ in range(runs):
                for c in clients_list:
                    got["offline"][c].append(ceiling.load(c, per_client, tokens))
                    got["ours"][c].append(load(mine_srv.url, ask_ours, model, c, per_client, tokens))
                    got["seed"][c].append(load(seed_srv.url, ask_seed, model, c, per_client, tokens))
                    if hf:
                        got["hf"][c].append(load(servers[2].url, ask_hf, str(hf_dir), c, per_client, tokens))
                for _ in range(3):
                    bares.append(ceiling.lone(tokens))
                    lones.append(ask_ours(http, mine_srv.url, model, prompts(1)[0], tokens)[2])
        ceilings = {c: medians(got["offline"][c]) for c in clients_list}
        mine = {c: medians(got["ours"][c]) for c in clients_list}
        theirs = {c: medians(got["seed"][c]) for c in clients_list}
        hfs = {c: medians(got["hf"][c]) for c in clients_list} if hf else {}
        ours_rss, seed_rss = peak_rss_mb(mine_srv.proc.pid), peak_rss_mb(seed_srv.proc.pid)
        hf_rss = peak_rss_mb(servers[2].proc.pid) if hf else None
    finally:
        for server in servers:
            server.stop()

    print(f"\n## {size} stand-in (Qwen2-shaped, {HF_DTYPES[dtype]}), {tokens} new tokens per request, "
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
    bare, lone = statistics.median(bares), statistics.median(lones)
    print(f"\nLone request (median of {len(lones)}): {lone * 1000:.0f} ms through our server (streaming) vs "
          f"{bare * 1000:.0f} ms "
          f"for a bare generate() ({lone / bare:.2f}x). Peak memory (RSS): ours {ours_rss:.0f} MB, "
          f"seed-style {seed_rss:.0f} MB" + (f", transformers serve {hf_rss:.0f} MB." if hf else "."))
    rows.append((size, mine, theirs, ceilings) + ((hfs,) if hf else ()))
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
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    if args.transformers_serve:
        hf_version(args.transformers_serve)  # fail now, not after the other columns ran
    print(f"# serving benchmark ({os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})")
    for size in (["tiny", "bench"] if args.size == "both" else [args.size]):
        run(size, clients, args.requests, args.tokens, args.runs, hf=args.transformers_serve,
            hf_num_blocks=args.hf_cb_num_blocks, dtype=args.dtype)


if __name__ == "__main__":
    main()
