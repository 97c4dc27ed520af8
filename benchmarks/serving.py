"""Serving benchmark: our server vs a seed-tutorial-style server vs the offline ceiling.

For 1, 4, 8 and 16 concurrent clients (each sends REQUESTS requests back to back, 64 new tokens
each, greedy, stop tokens ignored so every answer has the same length) it prints tokens per
second, time to first token, p50/p99 latency and the p99 of ``GET /health`` polled during the
load, for

  (a) ours:    ``python -m helpers serve`` (continuous batching), streaming clients;
  (b) seed:    benchmarks/seed_server.py (``async def`` endpoint calling generate());
  (c) ceiling: the same requests as one offline batched ``generate()`` call, no server;

plus a lone request through our server against a bare ``generate()``. Both servers run in their
own process with one torch thread; the clients run here. Everything is loopback only.

    python benchmarks/serving.py                 # the tiny stand-in and the bench stand-in
    python benchmarks/serving.py --size bench --clients 8 --runs 1
"""

from __future__ import annotations

import argparse
import json
import os
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
    def __init__(self, cmd, port):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()}")
            try:
                r = requests.get(self.url + "/health", timeout=1)
                if r.status_code == 200 and r.json().get("status") == "ok":
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not start")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def ours(model_dir, port, max_batch=16):
    return Server([sys.executable, "-m", "helpers", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
                   "--port", str(port), "--log-level", "warning", "--max-batch", str(max_batch)], port)


def seed(model_dir, port):
    return Server([sys.executable, str(ROOT / "benchmarks" / "seed_server.py"), str(model_dir), str(port)], port)


# --------------------------------------------------------------------------- clients


def ask_ours(http, url, model, prompt, tokens):
    t0 = time.perf_counter()
    first = None
    n = 0
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "temperature": 0, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    with http.post(url + "/v1/chat/completions", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t0
    return n, first, time.perf_counter() - t0


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


def offline(model_dir, clients, per_client, tokens):
    import torch

    from helpers.loading import load_model

    torch.set_num_threads(1)
    loaded = load_model(model_dir)
    tok, fmt = loaded.tokenizer, loaded.chat_format
    encoded = [fmt.encode(tok, [{"role": "user", "content": p}]) for p in prompts(clients * per_client)]

    def batch_generate(batch):
        width = max(len(x) for x in batch)
        ids = torch.tensor([[loaded.pad_id] * (width - len(x)) + x for x in batch])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch])
        out = loaded.model.generate(ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                                    do_sample=False, temperature=1.0, top_p=1.0, top_k=50, repetition_penalty=1.0,
                                    eos_token_id=loaded.stop_ids, pad_token_id=loaded.pad_id)
        return (out.shape[1] - width) * len(batch)

    batch_generate(encoded[:1])  # warm up
    t0 = time.perf_counter()
    total = sum(batch_generate(encoded[i:i + clients]) for i in range(0, len(encoded), clients))
    wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    batch_generate(encoded[:1])
    lone = time.perf_counter() - t1
    return {"tok_s": total / wall, "lone": lone}


# --------------------------------------------------------------------------- main


def median_of(runs, fn):
    got = [fn() for _ in range(runs)]
    return {k: statistics.median(g[k] for g in got) for k in got[0]}


def peak_rss_mb(pid) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def run(size, clients_list, per_client, tokens, runs):
    from helpers.tiny import build_tiny

    model_dir = build_tiny("qwen", Path(tempfile.gettempdir()) / f"helpers-bench-{size}", size=size)
    model = "qwen-7b-chat"
    rows = []
    ceilings = {c: median_of(runs, lambda c=c: offline(model_dir, c, per_client, tokens)) for c in clients_list}
    server = ours(model_dir, free_port())
    try:
        requests.post(server.url + "/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "warm up"}], "max_tokens": 4}).raise_for_status()
        mine = {c: median_of(runs, lambda c=c: load(server.url, ask_ours, model, c, per_client, tokens))
                for c in clients_list}
        with requests.Session() as http:
            lone = median_of(max(runs, 3), lambda: {"lat": ask_ours(http, server.url, model, prompts(1)[0], tokens)[2]})
        ours_rss = peak_rss_mb(server.proc.pid)
    finally:
        server.stop()
    server = seed(model_dir, free_port())
    try:
        theirs = {c: median_of(runs, lambda c=c: load(server.url, ask_seed, model, c, per_client, tokens))
                  for c in clients_list}
        seed_rss = peak_rss_mb(server.proc.pid)
    finally:
        server.stop()

    print(f"\n## {size} stand-in (Qwen2-shaped), {tokens} new tokens per request, "
          f"{per_client} requests per client, median of {runs} runs\n")
    print("| clients | ours tok/s | seed tok/s | offline tok/s | ours/seed | ours/offline | ours TTFT | seed TTFT "
          "| ours p50 / p99 | seed p50 / p99 | ours /health p99 | seed /health p99 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c in clients_list:
        m, s, o = mine[c], theirs[c], ceilings[c]
        print(f"| {c} | {m['tok_s']:.0f} | {s['tok_s']:.0f} | {o['tok_s']:.0f} | {m['tok_s'] / s['tok_s']:.1f}x "
              f"| {m['tok_s'] / o['tok_s']:.2f}x | {m['ttft'] * 1000:.0f} ms | {s['ttft'] * 1000:.0f} ms "
              f"| {m['p50'] * 1000:.0f} / {m['p99'] * 1000:.0f} ms | {s['p50'] * 1000:.0f} / {s['p99'] * 1000:.0f} ms "
              f"| {m['health_p99'] * 1000:.1f} ms | {s['health_p99'] * 1000:.0f} ms |")
    bare = ceilings[clients_list[0]]["lone"]
    print(f"\nLone request: {lone['lat'] * 1000:.0f} ms through our server (streaming) vs {bare * 1000:.0f} ms "
          f"for a bare generate() ({lone['lat'] / bare:.2f}x). Peak memory (RSS): ours {ours_rss:.0f} MB, "
          f"seed-style {seed_rss:.0f} MB.")
    rows.append((size, mine, theirs, ceilings))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "bench", "both"], default="both")
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    print(f"# serving benchmark ({os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})")
    for size in (["tiny", "bench"] if args.size == "both" else [args.size]):
        run(size, clients, args.requests, args.tokens, args.runs)


if __name__ == "__main__":
    main()
