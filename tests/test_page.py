"""The chat page (GET /) in a real headless browser: Debian's chromium driven by Playwright for
Python (never ``playwright install``: nothing is downloaded), against background servers on the
stand-ins. A streamed answer grows token by token, Stop ends the generation on the server, and
429 / 401 / an unreachable server are explained in the page.

Chromium is installed with apt-get when missing (as root on Debian; scripts/test.sh does the same);
the tests skip, saying why, only when it cannot be installed."""

import os
import shutil
import subprocess
import time

import pytest
import requests

from helpers.background import start_server
from helpers.engine import Engine

from .conftest import free_port

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed "
                               "(pip install -r requirements-test.txt)")

KEY = "sk-page-" + "k" * 24
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _chromium() -> str | None:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if path or os.geteuid() != 0 or not shutil.which("apt-get") or not os.path.exists("/etc/debian_version"):
        return path
    try:
        subprocess.run("apt-get update -qq && apt-get install -y -qq chromium", shell=True, check=True,
                       capture_output=True, timeout=600)
    except (subprocess.SubprocessError, OSError):
        return None
    return shutil.which("chromium")


@pytest.fixture(scope="module")
def browser():
    path = _chromium()
    if path is None:
        pytest.skip("chromium is not installed and could not be installed (apt-get install chromium, as root "
                    "on Debian)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 700})
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    context.close()


@pytest.fixture(scope="module")
def server(tiny_loaded):
    srv = start_server(tiny_loaded("qwen"), host="127.0.0.1", port=free_port())
    yield srv
    srv.stop()


def _answer_lengths(page, seconds: float, index: int = -1) -> list[int]:
    out = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        out.append(page.evaluate(f"[...document.querySelectorAll('.msg.assistant .content')].at({index})"
                                 "?.textContent.length ?? 0"))
        time.sleep(0.1)
    return out


def _ask(page, question: str) -> None:
    page.fill("#input", question)
    page.press("#input", "Enter")


def test_page_and_files_are_open_without_a_key_and_post_root_is_unchanged(tiny_loaded):
    srv = start_server(tiny_loaded("qwen"), host="127.0.0.1", port=free_port(), api_keys=[KEY])
    try:
        r = requests.get(srv.url + "/", timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "/static/chat.js" in r.text and "http" not in r.text.replace(srv.url, "")  # nothing external
        for name, kind in (("chat.js", "text/javascript"), ("chat.css", "text/css")):
            r = requests.get(f"{srv.url}/static/{name}", timeout=10)
            assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
        assert requests.get(srv.url + "/static/nothing.js", timeout=10).status_code == 404
        # the seed API and the rest still need the key
        r = requests.post(srv.url + "/", json={"prompt": "hi"}, timeout=10)
        assert r.status_code == 401 and r.json()["status"] == 401
        assert requests.get(srv.url + "/v1/models", timeout=10).status_code == 401
        assert requests.post(srv.url + "/static/chat.js", timeout=10).status_code == 401  # open for GET only
        ok = requests.post(srv.url + "/", json={"prompt": "hi", "max_length": 4},
                           headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        assert ok.status_code == 200 and set(ok.json()) == {"response", "history", "status", "time"}
        paths = requests.get(srv.url + "/openapi.json", timeout=10).json()["paths"]
        assert set(paths["/"]) == {"post"} and not any(p.startswith("/static") for p in paths)
    finally:
        srv.stop()


@pytest.fixture()
def slow_model(server, monkeypatch):
    """~100 tokens/s instead of ~600: a long answer is still being generated when Stop is clicked."""
    model = server.app.state.engine.loaded.model
    forward = model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(0.01)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", slow_forward)


def test_streamed_multi_turn_answer_stop_and_screenshot(server, slow_model, page, tmp_path):
    engine = server.app.state.engine
    requests_sent = []
    page.on("request", lambda req: requests_sent.append(req.post_data_json)
            if req.url.endswith("/v1/chat/completions") else None)
    page.goto(server.url + "/")
    sync_api.expect(page.locator("#model")).to_have_text("qwen-7b-chat")
    assert page.locator("#send").inner_text() == "发送"  # Chinese by default
    assert page.locator("#system-box").is_visible()  # Qwen has a system role

    # a short answer: usage and the finish reason arrive
    page.fill("#max-tokens", "16")
    page.fill("#system", "你是一位耐心的助教。")
    _ask(page, "你好")
    meta = page.locator(".msg.assistant .meta").first
    sync_api.expect(meta).to_contain_text("tokens")
    assert page.locator(".msg.user").first.inner_text() == "你好"
    body = requests_sent[0]
    assert body["stream"] is True and body["max_tokens"] == 16 and body["model"] == "qwen-7b-chat"
    assert body["messages"] == [{"role": "system", "content": "你是一位耐心的助教。"},
                                {"role": "user", "content": "你好"}]

    # a long answer (ignore_eos: the random stand-in would stop at a random point) grows, then Stop
    page.evaluate("window.chatExtraBody = {ignore_eos: true}")
    page.fill("#max-tokens", "3000")
    _ask(page, "讲一个很长的故事。")
    sync_api.expect(page.locator("#stop")).to_be_enabled()
    page.wait_for_function("document.querySelectorAll('.msg.assistant .content')[1]?.textContent.length > 0")
    grows = _answer_lengths(page, 0.5)
    assert engine.running == 1
    page.click("#stop")
    assert grows[-1] > grows[0] > 0, grows
    sync_api.expect(page.locator("#send")).to_be_enabled()
    sync_api.expect(page.locator(".msg.assistant .meta").nth(1)).to_contain_text("已停止")
    deadline = time.monotonic() + 5
    while engine.running or engine.waiting:
        assert time.monotonic() < deadline, "the server is still generating after Stop"
        time.sleep(0.05)
    after = _answer_lengths(page, 0.5)
    assert len(set(after)) == 1, after  # no longer growing
    second = requests_sent[1]["messages"]
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]  # multi-turn

    page.screenshot(path=str(tmp_path / "chat.png"))
    print("screenshot:", tmp_path / "chat.png")

    # English UI
    page.click("#lang")
    assert page.locator("#send").inner_text() == "Send"
    assert page.locator(".msg.assistant .meta").count() == 2


def test_wrong_key_is_explained_and_the_right_one_works(tiny_loaded, page):
    srv = start_server(tiny_loaded("qwen"), host="127.0.0.1", port=free_port(), api_keys=[KEY])
    try:
        page.goto(srv.url + "/")
        notice = page.locator("#notice")
        sync_api.expect(notice).to_have_attribute("data-kind", "key")  # /v1/models without a key
        page.fill("#api-key", "sk-wrong")
        page.dispatch_event("#api-key", "change")
        sync_api.expect(notice).to_contain_text("not valid")
        sync_api.expect(notice).to_contain_text("API 密钥")
        page.fill("#api-key", KEY)
        page.dispatch_event("#api-key", "change")
        sync_api.expect(page.locator("#model")).to_have_text("qwen-7b-chat")
        assert notice.is_hidden()
        page.fill("#max-tokens", "8")
        _ask(page, "hi")
        sync_api.expect(page.locator(".msg.assistant .meta")).to_contain_text("tokens")
        assert page.evaluate("localStorage.getItem('chat.apiKey')") == KEY
    finally:
        srv.stop()


def test_busy_and_down_are_explained(tiny_loaded, page):
    engine = Engine(tiny_loaded("qwen"), max_queue=0, max_batch=1).start()  # refuses every request: 429
    srv = start_server(engine, host="127.0.0.1", port=free_port())
    try:
        page.goto(srv.url + "/")
        sync_api.expect(page.locator("#model")).to_have_text("qwen-7b-chat")
        _ask(page, "hi")
        notice = page.locator("#notice")
        sync_api.expect(notice).to_have_attribute("data-kind", "busy")
        assert "秒后再试" in notice.inner_text() and any(ch.isdigit() for ch in notice.inner_text())
        assert page.locator(".msg").count() == 0  # nothing half-shown: the question is back in the input
        assert page.input_value("#input") == "hi"
        page.fill("#input", "")
        srv.stop()
        _ask(page, "hi again")
        sync_api.expect(notice).to_have_attribute("data-kind", "down")
        sync_api.expect(page.locator("#server-status")).to_have_text("服务器离线")
    finally:
        srv.stop()
        engine.stop()


def test_no_system_prompt_for_xverse(tiny_loaded, page):
    srv = start_server(tiny_loaded("xverse"), host="127.0.0.1", port=free_port())
    try:
        page.goto(srv.url + "/")
        sync_api.expect(page.locator("#no-system")).to_be_visible()
        assert page.locator("#system-box").is_hidden()
    finally:
        srv.stop()


def test_loading_then_ready_and_a_stopped_engine_are_explained(tiny_loaded, page):
    """/health answers 503 while the model loads: the page says so and tries again by itself."""
    from helpers.background import BackgroundServer
    from helpers.server import LoadingApp, create_app

    gate = LoadingApp("qwen-7b-chat", retry_after=1)
    srv = BackgroundServer(gate, "127.0.0.1", free_port()).start()
    engine = Engine(tiny_loaded("qwen")).start()
    try:
        page.goto(f"http://127.0.0.1:{srv.port}/")
        notice = page.locator("#notice")
        sync_api.expect(notice).to_have_attribute("data-kind", "loading")
        assert "还在加载" in notice.inner_text()
        sync_api.expect(page.locator("#server-status")).to_have_text("暂不能生成")
        gate.ready(create_app(engine))
        sync_api.expect(page.locator("#model")).to_have_text("qwen-7b-chat")  # picked up without a reload
        sync_api.expect(page.locator("#server-status")).to_have_text("服务器在线")
        assert page.locator("#notice").is_hidden()
        engine.stop()
        page.reload()
        sync_api.expect(notice).to_have_attribute("data-kind", "error")
        assert "stopping" in notice.inner_text()
    finally:
        srv.stop()
        engine.stop()
