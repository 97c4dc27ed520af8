"""GET /metrics: Prometheus text that a Prometheus parser reads, moving when requests run."""


import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from helpers.background import start_server
from helpers.engine import Engine, SamplingParams

from .conftest import free_port

MODEL = "qwen-7b-chat"


def scrape(url) -> dict:
    r = requests.get(url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "model_name"))
            samples[(sample.name, labels)] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def server(tiny_loaded):
    engine = Engine(tiny_loaded("qwen"), max_batch=1, max_queue=1).start()
    srv = start_server(engine, host="127.0.0.1", port=free_port(), api_keys=["sekret-key-1"])
    yield srv, engine
    srv.stop()
    engine.stop()


def test_metrics_count_what_happened(server):
    srv, engine = server
    auth = {"Authorization": "Bearer sekret-key-1"}
    before = scrape(srv.url)  # open without a key, like /health
    for stream in (False, True):
        r = requests.post(srv.url + "/v1/chat/completions", headers=auth, json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
            "temperature": 0, "ignore_eos": True, "stream": stream})
        assert r.status_code == 200
    after = scrape(srv.url)
    assert value(after, "helpers:generation_tokens_total") - value(before, "helpers:generation_tokens_total") == 16
    assert value(after, "helpers:prompt_tokens_total") > value(before, "helpers:prompt_tokens_total")
    assert value(after, "helpers:request_success_total", finished_reason="length") - \
        value(before, "helpers:request_success_total", finished_reason="length") == 2
    for name in ("helpers:time_to_first_token_seconds_count", "helpers:e2e_request_latency_seconds_count"):
        assert value(after, name) - value(before, name) == 2
    assert value(after, "helpers:e2e_request_latency_seconds_sum") > value(before, "helpers:e2e_request_latency_seconds_sum")
    assert value(after, "helpers:e2e_request_latency_seconds_bucket", le="+Inf") == \
        value(after, "helpers:e2e_request_latency_seconds_count")
    assert "sekret" not in requests.get(srv.url + "/metrics").text


def test_gauges_and_rejections_move_under_load(server):
    srv, engine = server
    auth = {"Authorization": "Bearer sekret-key-1"}
    long = engine.submit([{"role": "user", "content": "a"}],
                         SamplingParams(max_new_tokens=1500, temperature=0, ignore_eos=True))
    next(iter(long))
    waiting = engine.submit([{"role": "user", "content": "b"}],
                            SamplingParams(max_new_tokens=1500, temperature=0, ignore_eos=True))
    busy = scrape(srv.url)
    r = requests.post(srv.url + "/v1/chat/completions", headers=auth, json={
        "model": MODEL, "messages": [{"role": "user", "content": "c"}], "max_tokens": 4})
    assert r.status_code == 429
    long.cancel()
    waiting.cancel()
    list(long), list(waiting)
    after = scrape(srv.url)
    assert value(busy, "helpers:num_requests_running") == 1
    assert value(busy, "helpers:num_requests_waiting") == 1
    assert value(after, "helpers:num_requests_running") == 0
    assert value(after, "helpers:request_rejected_total") - value(busy, "helpers:request_rejected_total") == 1
    assert value(after, "helpers:request_success_total", finished_reason="cancelled") >= 2


def test_one_log_line_per_request_without_secrets(server, caplog):
    srv, _ = server
    caplog.set_level("INFO", logger="helpers.requests")
    requests.post(srv.url, headers={"Authorization": "Bearer sekret-key-1"},
                  json={"prompt": "a secret prompt", "max_length": 4, "temperature": 0})
    lines = [r.getMessage() for r in caplog.records if r.name == "helpers.requests"]
    assert len(lines) == 1
    assert "completion_tokens=" in lines[0] and "seconds=" in lines[0] and "finished=" in lines[0]
    assert "sekret" not in lines[0] and "secret prompt" not in lines[0]


def test_client_metrics_helper(server):
    from helpers.client import metrics

    srv, _ = server
    m = metrics(srv.url)
    assert m["helpers:num_requests_running"] == 0
    assert m["helpers:e2e_request_latency_seconds_count"] == sum(
        v for k, v in m.items() if k == "helpers:request_success_total")
