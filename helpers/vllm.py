"""Start and stop a vLLM OpenAI server for one model, in a Python environment of its own.

vLLM pins a transformers release (5.x) that the five models' remote code does not run on (they need
4.36-4.48), so it never shares the lessons' environment: it runs from its own venv
(``scripts/setup_vllm.sh`` makes one; ``VLLM_PYTHON`` or ``python=`` points at its interpreter) as a
subprocess that this module starts, waits for, forwards the log of, and stops. Our FastAPI app stays
in front of it (``helpers.upstream.UpstreamGenerator``).

Which families vLLM serves, and how (vLLM 0.32):

* InternLM2 (``InternLM2ForCausalLM``) and MiniCPM (``MiniCPMForCausalLM``): native.
* XVERSE: its layers are Llama-shaped, served as ``LlamaForCausalLM`` (``--hf-overrides``).
* Qwen v1 (``QWenLMHeadModel``): no longer in vLLM; convert the weights to the Qwen2 architecture
  first (``python -m helpers convert-qwen SRC DST``, ``helpers.convert``) and serve the result.
* BlueLM: not in vLLM; refused with a message that says to use the built-in engine.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

DEFAULT_VENV = Path(os.environ.get("VLLM_VENV") or Path.home() / ".cache" / "llm-api-helpers" / "venv-vllm")


class VLLMError(RuntimeError):
    """vLLM cannot serve this model, is not installed, or did not start."""


def vllm_python(python: str | os.PathLike | None = None) -> str:
    """The interpreter of the vLLM environment: ``python``, else ``$VLLM_PYTHON``, else the venv
    made by ``scripts/setup_vllm.sh`` (``$VLLM_VENV``, default ~/.cache/llm-api-helpers/venv-vllm)."""
    candidate = Path(python or os.environ.get("VLLM_PYTHON") or DEFAULT_VENV / "bin" / "python")
    if not candidate.exists():
        raise VLLMError(f"no vLLM environment at {candidate}: make one with `bash scripts/setup_vllm.sh` "
                        "(or set VLLM_PYTHON to the python of a venv that has vLLM)")
    return str(candidate)


def vllm_args(path: str | os.PathLike, family: str) -> list[str]:
    """The family's extra vLLM arguments for the model folder ``path``, or ``VLLMError`` if vLLM
    cannot serve it as it is."""
    config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    architectures = config.get("architectures") or []
    if family == "bluelm":
        raise VLLMError("vLLM has no BlueLM model (BlueLMForCausalLM): serve BlueLM-7B-Chat with the built-in "
                        "engine (--engine builtin, the default)")
    if family == "qwen" and "QWenLMHeadModel" in architectures:
        raise VLLMError(f"vLLM 0.32 has no Qwen v1 model (QWenLMHeadModel): convert the weights to the Qwen2 "
                        f"architecture first: python -m helpers convert-qwen {path} {path}-qwen2 "
                        "(then serve that folder)")
    if family == "xverse":
        return ["--hf-overrides", json.dumps({"architectures": ["LlamaForCausalLM"]})]
    return []


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class VLLMServer:
    """One ``vllm.entrypoints.openai.api_server`` process for the model folder ``path``.

    ``start()`` launches it and waits until its ``/health`` answers (or it exits: then
    ``VLLMError`` with the end of its log); its output is forwarded line by line with a ``[vllm]``
    prefix; ``stop()`` ends it and its engine processes (SIGTERM to the group, then SIGKILL after
    ``timeout``). ``extra`` are more arguments for vLLM (e.g. ``["--tensor-parallel-size", "2"]``
    on a box with two GPUs).
    """

    def __init__(self, path: str | os.PathLike, family: str, *, served_name: str, python: str | None = None,
                 host: str = "127.0.0.1", port: int | None = None, max_model_len: int | None = None,
                 dtype: str = "auto", extra: list[str] | tuple[str, ...] = (), env: dict | None = None,
                 log=None):
        self.path, self.family, self.served_name = str(path), family, served_name
        self.args = vllm_args(path, family)
        self.python = vllm_python(python)
        self.host, self.port = host, port or free_port(host)
        self.max_model_len, self.dtype, self.extra = max_model_len, dtype, list(extra)
        self.env = dict(env or {})
        self.log = log or (lambda line: print(f"[vllm] {line}", file=sys.stderr, flush=True))
        self.proc: subprocess.Popen | None = None
        self._tail: list[str] = []

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def command(self) -> list[str]:
        # --generation-config vllm: the model's generation_config.json would otherwise fill in what a
        # request leaves out (XVERSE: repetition_penalty 1.1, top_k 30 ...); our front sends every
        # sampling setting and the family's stop ids itself
        cmd = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.path,
               "--served-model-name", self.served_name, "--host", self.host, "--port", str(self.port),
               "--trust-remote-code", "--dtype", self.dtype, "--generation-config", "vllm", *self.args]
        if self.max_model_len:
            cmd += ["--max-model-len", str(self.max_model_len)]
        return cmd + self.extra

    def start(self, timeout: float = 600.0) -> "VLLMServer":
        import requests

        env = dict(os.environ, VLLM_LOGGING_COLOR="0", **self.env)  # a notebook kernel sets FORCE_COLOR
        env.pop("PYTHONPATH", None)  # the lessons' packages must not leak into vLLM's environment
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env, start_new_session=True)
        threading.Thread(target=self._forward, name="vllm-log", daemon=True).start()
        atexit.register(self.stop)  # it runs in a session of its own: a kernel that exits must not leave it
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = "\n".join(self._tail[-15:])
                raise VLLMError(f"vLLM exited with code {self.proc.returncode} while starting:\n{tail}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise VLLMError(f"vLLM did not answer on {self.url} within {timeout:.0f} s")

    def _forward(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip()
            self._tail = (self._tail + [line])[-50:]
            self.log(line)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the whole process group (vLLM's engine runs in child processes that outlive a
        killed main process), then SIGKILL after ``timeout``."""
        if self.proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and _group_alive(self.proc.pid):
                self.proc.poll()
                time.sleep(0.2)
            if not _group_alive(self.proc.pid):
                self.proc.poll()
                return


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
