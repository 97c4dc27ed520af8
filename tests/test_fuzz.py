"""Schema-based fuzzing: schemathesis generates requests from the app's own OpenAPI schema (valid
ones and deliberately invalid ones) and checks every answer: never a 5xx, always in the documented
shape, status code and content type (streams event by event), invalid input refused with a 4xx,
and the API key enforced. The app runs in-process on the Qwen stand-in, with an API key and answers
capped at 4 tokens so that generation is quick; Hypothesis is derandomized (same cases every run).

The figures (requests sent, status codes) are printed by ``test_fuzz_figures``: run with ``-s``.
"""

from collections import Counter
from types import SimpleNamespace

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks

from helpers.engine import Engine
from helpers.server import create_app

KEY = "sk-fuzz-" + "x" * 24
EXAMPLES = 150  # per operation and generation mode
STATUSES: Counter = Counter()


def _app(engine):
    return create_app(engine, api_keys=[KEY], max_tokens_limit=4)


class _LateApp:
    """The ASGI app the cases are sent to, set by the fixture below. The cases are generated from
    the schema when the tests are collected, before any fixture runs: the schema comes from an app
    around a placeholder engine (it depends only on the model's name and context length)."""

    app = None

    async def __call__(self, scope, receive, send):
        await self.app(scope, receive, send)


_late = _LateApp()
_placeholder = SimpleNamespace(loaded=SimpleNamespace(name="qwen-7b-chat", family="qwen", context_length=4096))
schema = schemathesis.openapi.from_dict(_app(_placeholder).openapi())
schema.app, schema.location = _late, "/openapi.json"  # as schemathesis.openapi.from_asgi sets them


@pytest.fixture(scope="module", autouse=True)
def fuzz_app(tiny_loaded):
    engine = Engine(tiny_loaded("qwen"), max_queue=8).start()
    app = _app(engine)
    assert app.openapi() == schema.raw_schema
    _late.app = app
    yield app
    _late.app = None
    engine.stop()


def _steer(case) -> None:
    """Send most generated chat requests to the model (any model name but the served one is a 404,
    and a conversation must end with a non-empty user message), so generation is fuzzed too."""
    body = case.body
    if not (isinstance(body, dict) and isinstance(body.get("model"), str)):
        return
    body["model"] = "qwen-7b-chat"
    messages = body.get("messages")
    positive = case.meta is not None and case.meta.generation.mode.value == "positive"
    if positive and isinstance(messages, list) and len(repr(body)) % 4:  # 3 cases in 4
        messages[:] = [m for i, m in enumerate(messages)
                       if not (isinstance(m, dict) and m.get("role") in ("system", "developer") and i)]
        for m in messages:
            if isinstance(m, dict) and m.get("role") == "user" and not str(m.get("content")).strip():
                m["content"] = "hi"
        messages.append({"role": "user", "content": "hi"})


@schema.parametrize()
@settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_fuzz_the_api(case):
    _steer(case)
    response = case.call_and_validate(
        headers={"Authorization": f"Bearer {KEY}"},
        checks=[checks.not_a_server_error, checks.response_schema_conformance, checks.status_code_conformance,
                checks.content_type_conformance, checks.response_headers_conformance,
                checks.negative_data_rejection, checks.ignored_auth])
    mode = case.meta.generation.mode.value if case.meta is not None else "explicit"
    STATUSES[(f"{case.operation.method.upper()} {case.operation.path}", mode, response.status_code)] += 1


def test_fuzz_figures():
    """Runs after the fuzzer: it sent a few hundred requests, none answered 5xx, many generated."""
    total = sum(STATUSES.values())
    print(f"\nfuzz: {total} requests")
    for (route, mode, status), n in sorted(STATUSES.items()):
        print(f"  {route:28s} {mode:9s} {status}: {n}")
    assert total >= 300
    assert not [key for key in STATUSES if key[2] >= 500]
    assert sum(n for (route, _, status), n in STATUSES.items() if status == 200 and route.startswith("POST")) >= 50
