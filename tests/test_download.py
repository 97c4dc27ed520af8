"""download(): local copy first, seeded caches found by modelscope itself, fast failure offline.

Nothing here touches the internet: MODELSCOPE_ENDPOINT points at a closed localhost port and
proxies are removed, so any network attempt fails at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time

import pytest

from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

# imported here, once: modelscope's log handler then writes to the session's stderr
from modelscope.hub.snapshot_download import snapshot_download

import importlib

dl = importlib.import_module("helpers.download")  # the module (helpers.download is also the function)
from helpers.download import DownloadError, download, seed_cache
from helpers.registry import MODELS

SPECS = list(MODELS.values())
IDS = [s.name for s in SPECS]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _offline_env(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("ms")
    monkeypatch.setenv("MODELSCOPE_CACHE", str(home / "cache"))
    monkeypatch.setenv("MODELSCOPE_HOME", str(home / "home"))
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    for var in ("MODEL_CACHE_DIR", "MODELSCOPE_DOMAIN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                "http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def _fake_model(folder, tag="fake") -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump({"model_type": tag}, fh)
    with open(os.path.join(folder, "model.safetensors"), "wb") as fh:
        fh.write(b"\0" * 64)
    return str(folder)


def _snapshot_local(model_id, revision, cache_dir) -> str:
    return snapshot_download(model_id, revision=revision, cache_dir=cache_dir, local_files_only=True)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_seed_cache_is_found_by_modelscope(spec, tmp_path):
    src = _fake_model(tmp_path / "src", spec.name)
    cache = tmp_path / "cache"
    path = seed_cache(spec.name, src, cache)

    assert os.path.isabs(path)
    owner, name = spec.model_id.split("/")
    assert path == os.path.join(str(cache), "models", owner, name.replace(".", "___"))
    # modelscope's own lookup, with the registry revision (v1.1.4 for Qwen) and without one
    assert _snapshot_local(spec.model_id, spec.revision, str(cache)) == path
    assert _snapshot_local(spec.model_id, None, str(cache)) == path
    assert "." not in os.path.basename(path)
    assert json.load(open(os.path.join(path, "config.json")))["model_type"] == spec.name


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_download_returns_seeded_copy_quickly(spec, tmp_path, capsys):
    cache = tmp_path / "cache"
    seeded = seed_cache(spec.model_id, _fake_model(tmp_path / "src", spec.name), cache)

    start = time.monotonic()
    path = download(spec.name, cache_dir=str(cache))
    assert time.monotonic() - start < 2
    assert path == seeded
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    assert "." not in os.path.basename(path)
    assert "Found a local copy" in capsys.readouterr().out
    # the ModelScope id and a Path work too
    assert download(spec.model_id, cache_dir=cache) == seeded


def test_qwen_revision_is_passed_to_modelscope(tmp_path, monkeypatch):
    calls = []
    real = dl._find_local

    def spy(model_id, revision, cache):
        calls.append((model_id, revision))
        return real(model_id, revision, cache)

    monkeypatch.setattr(dl, "_find_local", spy)
    seed_cache("qwen-7b-chat", _fake_model(tmp_path / "src"), tmp_path / "c")
    download("qwen-7b-chat", cache_dir=tmp_path / "c")
    assert calls[-1] == ("qwen/Qwen-7B-Chat", "v1.1.4")


def test_relative_and_home_cache_dir_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seeded = seed_cache("xverse-7b-chat", _fake_model(tmp_path / "src"), "rel-cache")
    assert seeded == str(tmp_path / "rel-cache" / "models" / "xverse" / "XVERSE-7B-Chat")
    assert download("xverse-7b-chat", cache_dir="rel-cache") == seeded
    assert download("xverse-7b-chat", cache_dir="./rel-cache/") == seeded

    monkeypatch.setenv("HOME", str(tmp_path))
    assert download("xverse-7b-chat", cache_dir="~/rel-cache") == seeded
    monkeypatch.chdir("/")  # the same call from another folder finds the same copy
    assert download("xverse-7b-chat", cache_dir=str(tmp_path / "rel-cache")) == seeded


def test_default_cache_dir_from_env(tmp_path, monkeypatch):
    seeded = seed_cache("bluelm-7b-chat", _fake_model(tmp_path / "src"), tmp_path / "c1")
    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path / "c1"))
    assert download("bluelm-7b-chat") == seeded

    monkeypatch.delenv("MODEL_CACHE_DIR")
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "c2"))
    seeded2 = seed_cache("bluelm-7b-chat", _fake_model(tmp_path / "src2"), tmp_path / "c2")
    assert download("bluelm-7b-chat") == seeded2


def test_local_folder_is_returned_as_is(tmp_path, monkeypatch):
    folder = _fake_model(tmp_path / "my-model")
    assert download(folder) == folder
    assert download(folder, cache_dir=tmp_path / "unused") == folder
    monkeypatch.chdir(tmp_path)
    assert download("my-model") == folder
    assert download("./my-model/") == folder
    with pytest.raises(DownloadError, match="no such folder"):
        download(str(tmp_path / "missing"))


def test_unknown_name_is_rejected():
    with pytest.raises(ValueError, match="qwen-7b-chat"):
        download("not-a-model")


def test_model_id_outside_registry_with_dots(tmp_path):
    seeded = seed_cache("Qwen/Qwen1.5-0.5B-Chat", _fake_model(tmp_path / "src"), tmp_path / "c")
    assert os.path.basename(seeded) == "Qwen1___5-0___5B-Chat"
    assert _snapshot_local("Qwen/Qwen1.5-0.5B-Chat", "v1.0.0", str(tmp_path / "c")) == seeded
    assert download("Qwen/Qwen1.5-0.5B-Chat", cache_dir=tmp_path / "c", revision="v1.0.0") == seeded


def test_modelscope_own_layout_with_dotted_revision_gets_a_dot_free_path(tmp_path):
    # What modelscope 1.40's snapshot_download writes by itself: .../snapshots/<revision>
    cache = tmp_path / "c"
    snap = _fake_model(cache / "models" / "qwen--Qwen-7B-Chat" / "snapshots" / "v1.1.4")
    assert _snapshot_local("qwen/Qwen-7B-Chat", "v1.1.4", str(cache)) == snap

    path = download("qwen-7b-chat", cache_dir=cache)
    assert path == str(cache / "models" / "qwen" / "Qwen-7B-Chat")
    assert "." not in os.path.basename(path)
    assert os.path.realpath(path) == os.path.realpath(snap)
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    # modelscope now finds the dot-free name too, and so does the next call
    assert _snapshot_local("qwen/Qwen-7B-Chat", "v1.1.4", str(cache)) == path
    assert download("qwen-7b-chat", cache_dir=cache) == path


def test_no_network_fails_fast_with_advice(tmp_path):
    start = time.monotonic()
    with pytest.raises(DownloadError) as info:
        download("internlm2-chat-7b", cache_dir=tmp_path / "empty")
    assert time.monotonic() - start < 15
    msg = str(info.value)
    assert "unreachable" in msg
    assert "/etc/network_turbo" in msg
    assert "modelscope download Shanghai_AI_Laboratory/internlm2-chat-7b" in msg
    assert str(tmp_path / "empty" / "models" / "Shanghai_AI_Laboratory" / "internlm2-chat-7b") in msg


def test_endpoint_that_never_answers_is_bounded_by_probe_timeout(tmp_path, monkeypatch):
    # A firewall that drops packets (or a hanging DNS look-up): the request never returns.
    import requests

    release = threading.Event()
    monkeypatch.setattr(requests, "head", lambda *a, **k: release.wait(30))
    monkeypatch.setattr(dl, "_PROBE_TIMEOUT", 1.0)
    start = time.monotonic()
    try:
        with pytest.raises(DownloadError, match="no answer within 1 s"):
            download("minicpm-2b-sft", cache_dir=tmp_path / "empty")
        assert time.monotonic() - start < 3
    finally:
        release.set()


def test_endpoint_env_is_read_at_each_call(tmp_path, monkeypatch):
    # modelscope-hub caches its config per process; download() passes the endpoint explicitly.
    seen = {}

    def fake_fetch(model_id, revision, cache, target, endpoint):
        seen["endpoint"] = endpoint
        return _fake_model(target)

    monkeypatch.setattr(dl, "_reachable_endpoint", lambda timeout: ("http://mirror.test", ""))
    monkeypatch.setattr(dl, "_fetch", fake_fetch)
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "http://mirror.test/")
    path = download("xverse-7b-chat", cache_dir=tmp_path)
    assert seen["endpoint"] == "http://mirror.test"
    assert path == str(tmp_path / "models" / "xverse" / "XVERSE-7B-Chat")
    assert download("xverse-7b-chat", cache_dir=tmp_path) == path  # now found locally


def test_default_endpoints_when_none_configured(monkeypatch):
    monkeypatch.delenv("MODELSCOPE_ENDPOINT")
    assert dl._endpoints() == ["https://modelscope.cn", "https://www.modelscope.ai"]
    monkeypatch.setenv("MODELSCOPE_DOMAIN", "mirror.example.org")
    assert dl._endpoints() == ["https://mirror.example.org"]


def test_local_files_only_never_probes(tmp_path, monkeypatch):
    def boom(timeout):
        raise AssertionError("network probe with local_files_only")

    monkeypatch.setattr(dl, "_reachable_endpoint", boom)
    with pytest.raises(DownloadError, match="local_files_only"):
        download("qwen-7b-chat", cache_dir=tmp_path, local_files_only=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match="No complete local copy"):
        download("qwen-7b-chat", cache_dir=tmp_path)


def test_incomplete_copy_is_not_returned(tmp_path):
    cache = tmp_path / "c"
    seeded = seed_cache("minicpm-2b-sft", _fake_model(tmp_path / "src"), cache)
    open(os.path.join(seeded, "pytorch_model.bin.incomplete"), "wb").close()
    with pytest.raises(DownloadError, match="incomplete copy"):
        download("minicpm-2b-sft", cache_dir=cache)
    os.remove(os.path.join(seeded, "pytorch_model.bin.incomplete"))
    with open(os.path.join(seeded, "model-00001-of-00002.safetensors"), "wb") as fh:
        fh.write(b"\0")
    assert "missing weight shard model-00002-of-00002.safetensors" in dl._incomplete(seeded)
    with pytest.raises(DownloadError, match="incomplete copy"):
        download("minicpm-2b-sft", cache_dir=cache)


def test_disk_space_is_checked_before_downloading(tmp_path, monkeypatch):
    def no_fetch(*args):
        raise AssertionError("download started")

    monkeypatch.setattr(dl, "_reachable_endpoint", lambda timeout: ("http://mirror.test", ""))
    monkeypatch.setattr(dl, "_fetch", no_fetch)
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda p: type("U", (), {"free": 10**9})())
    with pytest.raises(DownloadError, match="Not enough disk space"):
        download("qwen-7b-chat", cache_dir=tmp_path)


def test_failing_modelscope_download_is_wrapped(tmp_path, monkeypatch):
    # The probe says yes but the real snapshot_download (modelscope's own code, a closed port)
    # fails after its retries (~7 s): the error still says what to do.
    monkeypatch.setattr(dl, "_reachable_endpoint", lambda timeout: ("http://127.0.0.1", ""))
    start = time.monotonic()
    with pytest.raises(DownloadError, match="Downloading test-org/tiny-model from .* failed") as info:
        download("test-org/tiny-model", cache_dir=tmp_path)
    assert time.monotonic() - start < 30
    assert "/etc/network_turbo" in str(info.value)


def test_progress_bars_can_be_switched_off(monkeypatch):
    import modelscope_hub._download as hub_download

    original = hub_download.tqdm
    with dl._progress_bars(False):
        assert hub_download.tqdm(total=1).disable
    assert hub_download.tqdm is original
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    assert not dl._progress_enabled()
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS")
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert dl._progress_enabled()


# --- a real download through modelscope's own code, from a fake hub on localhost -------------

FAKE_FILES = {"config.json": b'{"model_type": "fake"}', "model.safetensors": b"\0" * 300_000,
              "tokenizer/vocab.txt": b"hello"}


class _FakeHub(BaseHTTPRequestHandler):
    """The two legacy API calls modelscope 1.40 makes: list files, fetch one file."""

    requests: list[str] = []
    files = FAKE_FILES

    def log_message(self, *args):
        pass

    def _send(self, code, body, ctype="application/json"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        url = urlparse(self.path)
        query = parse_qs(url.query)
        self.requests.append(f"{self.command} {url.path}")
        if "/absent/" in url.path:
            return self._send(404, b'{"Code": 10010205001, "Message": "model not found", "Success": false}')
        if url.path.endswith("/repo/files"):
            files = [{"Path": p, "Type": "blob", "Size": len(b), "Sha256": hashlib.sha256(b).hexdigest()}
                     for p, b in self.files.items()]
            body = {"Code": 200, "Success": True, "Data": {"Files": files}}
            return self._send(200, json.dumps(body).encode())
        if url.path.endswith("/repo") and query.get("FilePath", [""])[0] in self.files:
            return self._send(200, self.files[query["FilePath"][0]], "application/octet-stream")
        return self._send(404, b'{"Code": 404, "Message": "not found"}')


@pytest.fixture
def fake_hub(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _FakeHub.requests = []
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    yield _FakeHub
    server.shutdown()
    server.server_close()


def test_download_from_hub_lands_where_the_next_call_finds_it(tmp_path, fake_hub, capsys):
    cache = tmp_path / "c"
    path = download("test-org/tiny-model.v1", cache_dir=cache, revision="v1.0")
    assert path == str(cache / "models" / "test-org" / "tiny-model___v1")
    assert "." not in os.path.basename(path)
    for name, data in FAKE_FILES.items():
        assert open(os.path.join(path, name), "rb").read() == data
    out = capsys.readouterr()
    assert "Downloading test-org/tiny-model.v1 (v1.0)" in out.out
    assert "%|" not in out.err  # no progress bars with HF_HUB_DISABLE_PROGRESS_BARS=1
    assert any(r.endswith("/repo/files") for r in fake_hub.requests)

    # next time: found locally (modelscope's own lookup agrees), no request at all
    fake_hub.requests.clear()
    assert _snapshot_local("test-org/tiny-model.v1", "v1.0", str(cache)) == path
    assert download("test-org/tiny-model.v1", cache_dir=cache, revision="v1.0") == path
    assert fake_hub.requests == []

    # an interrupted download is resumed, not returned
    os.remove(os.path.join(path, "model.safetensors"))
    open(os.path.join(path, "model.safetensors.incomplete"), "wb").close()
    assert download("test-org/tiny-model.v1", cache_dir=cache, revision="v1.0") == path
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors", "tokenizer"]


def test_missing_model_or_revision_on_hub_is_reported(tmp_path, fake_hub):
    with pytest.raises(DownloadError, match="model id and revision") as info:
        download("test-org/absent", cache_dir=tmp_path)
    assert "network_turbo" not in str(info.value)


def test_hub_listing_without_model_files_is_an_error(tmp_path, fake_hub, monkeypatch):
    monkeypatch.setattr(_FakeHub, "files", {"README.md": b"# nothing here"})
    with pytest.raises(DownloadError, match="no config.json"):
        download("test-org/tiny-model", cache_dir=tmp_path)
