"""A bounded load test on loopback: a few dozen concurrent clients (seed API, OpenAI API, streaming
and not) against a server with a small queue. Every request is either answered in full or refused
with 429 + Retry-After; none is lost, cut short or failed; /health answers throughout and after.

The figures (requests, answered, refused, latency) are printed: run with ``-s``.
"""

import asyncio
import json
import statistics
import time

import httpx
import pytest

from helpers.background import start_server

from .conftest import free_port

CLIENTS = 32
REQUESTS_EACH = 4
MAX_TOKENS = 16
MAX_QUEUE = 6
RETRIES = 2  # after a 429, wait Retry-After and try again this many times
DEADLINE = 50  # seconds for the whole test: it stops by itself


@pytest.fixture(scope="module")
def server(tiny_loaded):
    srv = start_server(tiny_loaded("qwen"), host="127.0.0.1", port=free_port(), max_queue=MAX_QUEUE)
    yield srv
    srv.stop()


def _check_answer(kind: str, prompt: str, r: httpx.Response) -> str | None:
    """What is wrong with a 200 answer (None if it is complete)."""
    if kind == "seed":
        body = r.json()
        if body["status"] != 200 or not isinstance(body["response"], str):
            return f"seed answer {body}"
        if body["history"][-1] != [prompt, body["response"]]:
            return "seed history does not end with this turn"
        return None
    if kind == "chat":
        body = r.json()
        choice, usage = body["choices"][0], body["usage"]
        if choice["finish_reason"] not in ("stop", "length") or not isinstance(choice["message"]["content"], str):
            return f"chat answer {body}"
        if not 0 < usage["completion_tokens"] <= MAX_TOKENS or (
                choice["finish_reason"] == "length" and usage["completion_tokens"] != MAX_TOKENS):
            return f"chat usage {usage} with finish_reason {choice['finish_reason']}"
        return None
    lines = [line for line in r.text.splitlines() if line]
    if lines[-1] != "data: [DONE]":
        return "stream does not end with [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    if any("error" in e for e in events):
        return f"stream error {events}"
    finishes = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
    usage = events[-1].get("usage")
    if finishes not in (["stop"], ["length"]) or usage is None:
        return f"stream end {events[-2:]}"
    if finishes == ["length"] and usage["completion_tokens"] != MAX_TOKENS:
        return f"stream stopped at {usage['completion_tokens']} tokens"
    return None


async def _client(http: httpx.AsyncClient, n: int, outcomes: list, refusals: list):
    """A student's script: a few questions in a row; after a 429 it waits Retry-After seconds and
    tries again, at most RETRIES times (then the request counts as refused)."""
    for i in range(REQUESTS_EACH):
        kind = ("seed", "chat", "stream")[(n + i) % 3]
        prompt = f"client {n} question {i}: 讲个笑话"
        if kind == "seed":
            path, body = "/", {"prompt": prompt, "history": [["你好", "你好！"]], "max_length": MAX_TOKENS,
                               "temperature": 0}
        else:
            path, body = "/v1/chat/completions", {
                "model": "qwen-7b-chat", "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
                "temperature": 0.7, "seed": n, "stream": kind == "stream",
                "stream_options": {"include_usage": True} if kind == "stream" else None}
        started = time.perf_counter()
        for attempt in range(RETRIES + 1):
            try:
                r = await http.post(path, json=body)
            except httpx.HTTPError as exc:
                outcome = ("lost", kind, time.perf_counter() - started, repr(exc))
                break
            seconds = time.perf_counter() - started
            if r.status_code == 429:
                error = r.json()["error"]
                retry_after = r.headers.get("Retry-After", "")
                ok = retry_after.isdigit() and error["code"] == "queue_full"
                ok = ok and (r.json()["status"] == 429 if kind == "seed" else True)
                outcome = ("refused" if ok else "bad 429", kind, seconds, r.text[:200])
                refusals.append(ok)
                if not ok or attempt == RETRIES:
                    break
                await asyncio.sleep(int(retry_after))
            elif r.status_code == 200:
                problem = _check_answer(kind, prompt, r)
                outcome = ("answered" if problem is None else "incomplete", kind, seconds, problem)
                break
            else:
                outcome = (f"status {r.status_code}", kind, seconds, r.text[:300])
                break
        outcomes.append(outcome)


async def _load(url: str):
    outcomes: list = []
    refusals: list = []
    health: list = []
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=CLIENTS + 4, max_keepalive_connections=CLIENTS + 4)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
        async def watch_health():
            while not stop.is_set():
                r = await http.get("/health")
                health.append(r.status_code)
                await asyncio.sleep(0.2)

        watcher = asyncio.create_task(watch_health())
        started = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*[_client(http, n, outcomes, refusals) for n in range(CLIENTS)]), DEADLINE)
        wall = time.perf_counter() - started
        stop.set()
        await watcher
    return outcomes, refusals, health, wall


def test_load_every_request_answered_in_full_or_refused(server):
    outcomes, refusals, health, wall = asyncio.run(_load(server.url))
    total = CLIENTS * REQUESTS_EACH
    answered = [o for o in outcomes if o[0] == "answered"]
    refused = [o for o in outcomes if o[0] == "refused"]
    latencies = sorted(o[2] for o in answered)
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    print(f"\nload: {CLIENTS} clients x {REQUESTS_EACH} requests (max_tokens {MAX_TOKENS}, queue {MAX_QUEUE}) "
          f"in {wall:.1f} s: {len(refusals)} answers were 429 (Retry-After honoured, {RETRIES} retries); in the end "
          f"{len(answered)} answered in full, {len(refused)} refused, "
          f"{total - len(answered) - len(refused)} other; answered latency p50 {p50:.2f} s, p99 {p99:.2f} s; "
          f"/health polled {len(health)} times")
    problems = [o for o in outcomes if o[0] not in ("answered", "refused")]
    assert not problems, problems[:5]
    assert len(outcomes) == total  # none lost
    assert refusals and all(refusals)  # the queue limit was reached, always with a proper 429
    assert len(answered) >= total // 4  # and a client that waits as told gets served
    assert {kind for _, kind, _, _ in answered} == {"seed", "chat", "stream"}
    assert health and set(health) == {200}
    after = httpx.get(server.url + "/health", timeout=10).json()
    assert after == {**after, "status": "ok", "running": 0, "waiting": 0}
    assert server.engine.stats["failed"] == 0
    r = httpx.post(server.url + "/", json={"prompt": "还在吗？", "max_length": 4}, timeout=30)
    assert r.status_code == 200 and r.json()["status"] == 200
