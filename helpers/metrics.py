"""Counters and histograms of what the engine served, in the Prometheus text format.

Names follow vLLM's (``vllm:num_requests_running`` ...) with our own prefix, so dashboards made for
vLLM need only the prefix changed. The engine records every finished request; ``GET /metrics``
renders them together with the live gauges (running and waiting requests).
"""

from __future__ import annotations

import logging
import threading

PREFIX = "helpers:"
# seconds; the same buckets as vLLM's time-to-first-token and end-to-end latency histograms
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)

log = logging.getLogger("helpers.requests")


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += 1
        self.sum += value

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{bound}"}} {count}' for bound, count in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.total}')
        out.append(f"{name}_sum{{{labels}}} {self.sum}" if labels else f"{name}_sum {self.sum}")
        out.append(f"{name}_count{{{labels}}} {self.total}" if labels else f"{name}_count {self.total}")
        return out


class Metrics:
    """Thread-safe record of finished requests (the engine's worker writes, the server reads)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}
        self.rejected = 0

    def request_finished(self, handle, reason: str, now: float) -> None:
        with self._lock:
            if handle.first_token is not None and reason != "error":
                self.ttft.observe(handle.first_token - handle.created)
            self.latency.observe(now - handle.created)
            self.prompt_tokens += handle.prompt_tokens
            self.generation_tokens += handle.completion_tokens
            self.finished[reason] = self.finished.get(reason, 0) + 1
        # one line per request: never the prompt, never a key
        log.info("%s finished=%s prompt_tokens=%d completion_tokens=%d seconds=%.3f", handle.id, reason,
                 handle.prompt_tokens, handle.completion_tokens, now - handle.created)

    def request_rejected(self) -> None:
        with self._lock:
            self.rejected += 1

    def render(self, *, model: str, running: int, waiting: int) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        label = f'model_name="{model}"'
        p = PREFIX
        with self._lock:
            lines = [
                f"# HELP {p}num_requests_running Requests generating right now.",
                f"# TYPE {p}num_requests_running gauge",
                f"{p}num_requests_running{{{label}}} {running}",
                f"# HELP {p}num_requests_waiting Requests waiting for a place in the batch.",
                f"# TYPE {p}num_requests_waiting gauge",
                f"{p}num_requests_waiting{{{label}}} {waiting}",
                f"# HELP {p}request_rejected_total Requests refused because the queue was full (429).",
                f"# TYPE {p}request_rejected_total counter",
                f"{p}request_rejected_total{{{label}}} {self.rejected}",
                f"# HELP {p}prompt_tokens_total Prompt tokens of finished requests.",
                f"# TYPE {p}prompt_tokens_total counter",
                f"{p}prompt_tokens_total{{{label}}} {self.prompt_tokens}",
                f"# HELP {p}generation_tokens_total Tokens generated for finished requests.",
                f"# TYPE {p}generation_tokens_total counter",
                f"{p}generation_tokens_total{{{label}}} {self.generation_tokens}",
                f"# HELP {p}request_success_total Finished requests by how they ended.",
                f"# TYPE {p}request_success_total counter",
            ]
            for reason in sorted(self.finished):
                lines.append(f'{p}request_success_total{{{label},finished_reason="{reason}"}} {self.finished[reason]}')
            lines += [f"# HELP {p}time_to_first_token_seconds Time from arrival to the first generated token.",
                      f"# TYPE {p}time_to_first_token_seconds histogram"]
            lines += self.ttft.lines(f"{p}time_to_first_token_seconds", label)
            lines += [f"# HELP {p}e2e_request_latency_seconds Time from arrival to the last token.",
                      f"# TYPE {p}e2e_request_latency_seconds histogram"]
            lines += self.latency.lines(f"{p}e2e_request_latency_seconds", label)
        return "\n".join(lines) + "\n"
