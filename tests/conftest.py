import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
# Prompts produced by the vendors' own code (a copy kept in the repository: tests read nothing outside it)
GOLDEN = ROOT / "tests" / "golden" / "chat_formats.json"


def pytest_configure(config):
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass


@pytest.fixture(scope="session")
def golden():
    import json

    return json.loads(GOLDEN.read_text(encoding="utf-8"))


FAMILIES = ["qwen", "internlm2", "xverse", "bluelm", "minicpm"]


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_root):
    """``tiny_model_dir(family)``: the folder of a stand-in, built once per test session."""
    from helpers.tiny import build_tiny

    def build(family: str) -> Path:
        return build_tiny(family, tiny_root / family)

    return build


_loaded_cache: dict = {}


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    """``tiny_loaded(family)``: a LoadedModel of the stand-in, loaded once per test session."""
    from helpers.loading import load_model

    def load(family: str):
        if family not in _loaded_cache:
            _loaded_cache[family] = load_model(tiny_model_dir(family))
        return _loaded_cache[family]

    return load


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(proc, url: str, seconds: float = 90, what: str = "the server") -> dict:
    """Wait until a server started as a subprocess answers ``/health`` with its model loaded;
    fail with its output if it exits or does not get there in time."""
    import time

    from helpers.client import wait_until_ready

    deadline = time.monotonic() + seconds
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode} before serving:\n{proc.communicate()[0]}")
        try:
            return wait_until_ready(url, timeout=1)
        except TimeoutError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"{what} did not serve within {seconds:.0f} s:\n{proc.communicate()[0]}")


def vllm_python_or_skip() -> str:
    """The python of the vLLM environment (``VLLM_PYTHON``, else the venv of ``scripts/setup_vllm.sh``);
    skip without one, fail in CI (where scripts/test.sh installs it)."""
    from helpers.vllm import VLLMError, vllm_python

    try:
        return vllm_python()
    except VLLMError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{exc} (scripts/test.sh installs it in CI)")
        pytest.skip(str(exc))
