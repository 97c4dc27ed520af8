"""The lessons' notebooks, run top to bottom with nbval on the tiny stand-ins.

Each lesson ``notebooks/NN-<model name>-....ipynb`` is run unchanged, as the student runs it on the
GPU box; only the environment differs: a temporary model cache seeded with the random-weight
stand-in under the real ModelScope id (``MODEL_CACHE_DIR``), a free ``PORT``, progress bars off.
The environment lesson (``00-...``, no model) runs with an empty cache. A lesson runs from a copy in a
temporary folder, so that what it writes next to itself (``%%writefile api.py``, ``keys.txt``) stays
out of the checkout.

Lesson 06 is for teachers and comes in two notebooks. The teacher's (``06-classroom-server``) names
no model in its file name: it compares all five, then serves the one its config cell names
(``MODEL_NAME = "..."``), which is the stand-in seeded for it; its simulated class is made small and
short (``CLASS_SIZE``, ``CLASS_SECONDS``). The student's (``06-classroom-student``) needs only an
address and a key: the test first runs the terminal commands the teacher's lesson gives
(``python -m helpers keys N > keys.txt``, ``python -m helpers serve ...``) on that stand-in, then hands
the notebook ``CLASS_URL`` and ``CLASS_KEY`` through the environment; the server must stop cleanly
with Ctrl-C afterwards.

Lesson 07 (``07-vllm-...``) serves the model its config cell names through a vLLM server (the CPU
build, in the venv made by ``scripts/setup_vllm.sh``): the test hands it ``VLLM_PYTHON`` (or skips
with what to run when there is no vLLM environment; in CI, where ``scripts/test.sh`` installs it, it
fails) and a smaller side-by-side run (``BENCH_CLIENTS``, ``BENCH_TOKENS``). The notebook must stop
every vLLM process it started: processes of the run still alive afterwards are stopped and reported.

``pytest --nbval-lax`` runs every cell and compares the output of the cells whose first line is
``# NBVAL_CHECK_OUTPUT`` with the output stored in the notebook (cells marked ``# NBVAL_SKIP`` are
not run). nbval compares only against a stored cell that has an execution count: a checked cell
saved without one (or without output) is silently not checked. So a notebook on disk keeps exactly
the checked cells' expected outputs, with an execution count (the cell's position among the code
cells, as after a run from the top), and nothing else: no other outputs or execution counts, no
extra metadata (``test_notebook_saved_clean``). After editing a lesson in JupyterLab, clean it with::

    python tests/test_notebooks.py strip notebooks/01-....ipynb [--expected executed.ipynb]

(``--expected``: take the checked cells' outputs from an executed copy, e.g. from
``jupyter nbconvert --to notebook --execute --output executed.ipynb ...``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"

# Registry name -> stand-in family. A lesson is run once its model is listed here.
STANDINS = {
    "qwen-7b-chat": "qwen",
    "xverse-7b-chat": "xverse",
    "bluelm-7b-chat": "bluelm",
    "internlm2-chat-7b": "internlm2",
    "minicpm-2b-sft": "minicpm",
}
ENVIRONMENT_LESSON = "00-autodl-environment.ipynb"  # the one lesson without a model
CLASSROOM_LESSON = "06-classroom-server.ipynb"      # the teacher's lesson: serves the model its config names
STUDENT_NOTEBOOK = "06-classroom-student.ipynb"     # the students' notebook: calls the teacher's server
CLASSROOM_ENV = {"CLASS_SIZE": "8", "CLASS_SECONDS": "12"}  # a smaller, shorter simulated class
VLLM_LESSON = "07-vllm-one-api-two-engines.ipynb"  # the same API with a vLLM server generating
VLLM_LESSON_ENV = {"BENCH_CLIENTS": "8", "BENCH_TOKENS": "128"}  # a smaller side-by-side run
RUN_MARK = "HELPERS_NOTEBOOK_RUN"  # in the environment of every process a notebook run starts

TIMEOUT = 600        # seconds for a whole notebook
CELL_TIMEOUT = 300   # seconds for one cell

CHECK_MARK = "# NBVAL_CHECK_OUTPUT"
SKIP_MARK = "# NBVAL_SKIP"
NOTEBOOK_METADATA = {"kernelspec", "language_info"}
CELL_METADATA = {"tags"}

# Run by the kernel at start-up (IPython startup file): records which Python runs the notebook and
# where it imports ``helpers`` from, without touching the notebook.
KERNEL_PROBE = """\
import importlib.util, json, os, sys
_spec = importlib.util.find_spec("helpers")
with open(os.environ["NOTEBOOK_KERNEL_INFO"], "w", encoding="utf-8") as _f:
    json.dump({"prefix": sys.prefix, "executable": sys.executable,
               "helpers": _spec.origin if _spec else None}, _f)
del _spec, _f
"""


def lesson_notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9][0-9]-*.ipynb"))


def model_of(notebook: Path) -> str | None:
    """The registry model a lesson is about: the longest registry name in its file name."""
    from helpers.registry import MODELS

    names = [name for name in MODELS if name in notebook.stem.lower()]
    return max(names, key=len) if names else None


def served_model(notebook: Path) -> str | None:
    """The registry model a notebook serves: its lesson's model (``model_of``), else the one its
    config cell names (``MODEL_NAME = "..."``, the classroom lesson), else (the student notebook) the
    one the classroom lesson serves."""
    model = model_of(notebook)
    if model is not None:
        return model
    if notebook.name == STUDENT_NOTEBOOK:
        return served_model(NOTEBOOKS / CLASSROOM_LESSON)
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    names = set(re.findall(r'^MODEL_NAME = "([^"]+)"', code, flags=re.M))
    return names.pop() if len(names) == 1 else None


def terminal_commands(notebook: Path, program: str = "python -m helpers") -> list[str]:
    """The command lines of ``program`` in the notebook's markdown code blocks (continuation lines
    joined), as a reader would paste them into a terminal."""
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    markdown = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    lines = []
    for language, block in re.findall(r"```(\w*)\n(.*?)```", markdown, flags=re.S):
        if language in ("", "bash", "sh"):
            lines += block.replace("\\\n", " ").splitlines()
    return [line.split("  #", 1)[0].strip() for line in lines if line.strip().startswith(program)]


@contextlib.contextmanager
def classroom_server(env: dict, work: Path):
    """Run the classroom lesson's terminal commands (``keys N > keys.txt``, then ``serve``) in
    ``work`` on a free port; yield ``(url, first key)``; stop the server with Ctrl-C."""
    from .conftest import wait_for_server

    commands = terminal_commands(NOTEBOOKS / CLASSROOM_LESSON)
    keys_cmd = [c for c in commands if c.split()[3:4] == ["keys"]]
    serve_cmd = [c for c in commands if c.split()[3:4] == ["serve"]]
    assert len(keys_cmd) == 1 and len(serve_cmd) == 1, f"{CLASSROOM_LESSON}: terminal commands {commands}"
    keys_args, _, keys_file = keys_cmd[0].partition(">")
    with open(work / keys_file.strip(), "w", encoding="utf-8") as out:
        subprocess.run([sys.executable] + shlex.split(keys_args)[1:], cwd=work, env=env, stdout=out, check=True)
    keys = [line.split("#")[0].strip() for line in (work / keys_file.strip()).read_text(encoding="utf-8").splitlines()]
    port = _free_port()
    args = shlex.split(serve_cmd[0])[1:]
    args[args.index("--port") + 1] = str(port)
    proc = subprocess.Popen([sys.executable] + args, cwd=work, env=dict(env, PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(proc, url, 120, serve_cmd[0])
        yield url, keys[0]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
    assert proc.returncode == 0 and "Server stopped." in output, f"{serve_cmd[0]} did not stop cleanly:\n{output}"
    assert not any(k in output for k in keys), "the server printed a key"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def processes_marked(mark: str) -> list[int]:
    """Pids of the processes whose environment holds ``RUN_MARK=mark`` (started by one test run)."""
    needle = f"{RUN_MARK}={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def stop_marked(mark: str, timeout: float = 30.0) -> list[str]:
    """Stop what a run left behind (SIGTERM, then SIGKILL); return their command lines. Only the run's
    own processes carry the mark: nothing else on the machine is touched."""
    left = processes_marked(mark)
    commands = []
    for pid in left:
        try:
            commands.append((Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200])
            os.kill(pid, signal.SIGTERM)
        except (OSError, ProcessLookupError):
            pass
    deadline = time.monotonic() + timeout
    while processes_marked(mark) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in processes_marked(mark):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return commands


def _first_line(cell) -> str:
    source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
    return source.lstrip().split("\n", 1)[0].strip()


def _checked(cell) -> bool:
    return cell["cell_type"] == "code" and _first_line(cell) == CHECK_MARK


# --------------------------------------------------------------------------- the notebooks run


@pytest.mark.parametrize("notebook", lesson_notebooks(), ids=lambda p: p.name)
def test_notebook_runs(notebook: Path, tmp_path: Path):
    from helpers.download import seed_cache
    from helpers.registry import get_spec
    from helpers.tiny import build_tiny

    model = served_model(notebook)
    if model is None and notebook.name != ENVIRONMENT_LESSON:
        pytest.skip(f"{notebook.name} names no registry model")
    if model is not None and model not in STANDINS:
        pytest.skip(f"no stand-in listed for {model}: add {model!r}: {get_spec(model).family!r} to STANDINS")
    if shutil.which("curl") is None:
        pytest.skip("the lessons call the server with curl, which is not installed")

    cache = tmp_path / "cache"
    cache.mkdir()
    if model is not None:
        seed_cache(model, build_tiny(STANDINS[model], tmp_path / "standin"), cache)
    work = tmp_path / "notebooks"  # the kernel runs here: files the lesson writes stay out of the checkout
    work.mkdir()
    shutil.copy(notebook, work / notebook.name)
    ipython_dir = tmp_path / "ipython"
    startup = ipython_dir / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-record-kernel.py").write_text(KERNEL_PROBE, encoding="utf-8")
    kernel_info = tmp_path / "kernel.json"

    env = dict(os.environ)
    for key in [k for k in env if k.startswith("PYTEST_")]:
        del env[key]
    env.update(
        MODEL_CACHE_DIR=str(cache),
        PORT=str(_free_port()),
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        CI="true",
        IPYTHONDIR=str(ipython_dir),
        NOTEBOOK_KERNEL_INFO=str(kernel_info),
        # `!curl ... | python -m json.tool` in the notebook: the venv's python first
        PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
        # the kernel imports this checkout's helpers, wherever the notebook copy runs
        PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]),
    )
    if notebook.name == CLASSROOM_LESSON:
        env.update(CLASSROOM_ENV)
    mark = None
    if notebook.name == VLLM_LESSON:
        from .conftest import vllm_python_or_skip  # here: this file also runs as a script (strip)

        mark = str(tmp_path)  # unique to this run
        env.update(VLLM_LESSON_ENV, VLLM_PYTHON=vllm_python_or_skip(), **{RUN_MARK: mark})
    cmd = [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env",
           f"--nbval-cell-timeout={CELL_TIMEOUT}", "-p", "no:cacheprovider", "-q", "-rs", notebook.name]
    with contextlib.ExitStack() as stack:
        if notebook.name == STUDENT_NOTEBOOK:  # the teacher's server, started from the terminal commands
            server_dir = tmp_path / "teacher"
            server_dir.mkdir()
            url, key = stack.enter_context(classroom_server(env, server_dir))
            env.update(CLASS_URL=url, CLASS_KEY=key)
        started = time.monotonic()
        # own session, so that a timeout ends pytest and its kernel together
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            pytest.fail(f"{notebook.name} did not finish within {TIMEOUT} s:\n{out[-20000:]}")
        finally:
            # vLLM runs in a session of its own: a failed or killed run could leave it behind
            left = stop_marked(mark) if mark else []
    seconds = time.monotonic() - started
    assert proc.returncode == 0, f"nbval failed on {notebook.name} (exit {proc.returncode}):\n{out[-30000:]}"
    vllm_left = [c for c in left if "vllm" in c.lower()]
    assert not vllm_left, f"{notebook.name} left vLLM running (stopped now): {vllm_left}"
    print(f"{notebook.name}: nbval passed in {seconds:.0f} s")

    # the kernel was this environment's Python, importing this checkout's helpers
    info = json.loads(kernel_info.read_text(encoding="utf-8"))
    assert Path(info["prefix"]).resolve() == Path(sys.prefix).resolve(), info
    assert info["helpers"] and Path(info["helpers"]).resolve() == ROOT / "helpers" / "__init__.py", info


# --------------------------------------------------------------------------- saved clean


def clean_problems(nb: dict) -> list[str]:
    """What keeps a notebook from being clean (empty list if it is)."""
    problems = []
    extra = set(nb.get("metadata", {})) - NOTEBOOK_METADATA
    if extra:
        problems.append(f"notebook metadata has {sorted(extra)} (keep only {sorted(NOTEBOOK_METADATA)})")
    if nb.get("metadata", {}).get("kernelspec", {}).get("name") != "python3":
        problems.append("kernelspec must be python3")
    for i, cell in enumerate(nb["cells"]):
        where = f"cell {i} ({cell.get('id', '?')}: {_first_line(cell)[:40]!r})"
        extra = set(cell.get("metadata", {})) - CELL_METADATA
        if extra:
            problems.append(f"{where}: cell metadata {sorted(extra)}")
        if cell["cell_type"] != "code":
            continue
        outputs = cell.get("outputs", [])
        if not _checked(cell):
            if cell.get("execution_count") is not None:
                problems.append(f"{where}: execution_count {cell['execution_count']}")
            if outputs:
                problems.append(f"{where}: saved outputs (only {CHECK_MARK} cells keep theirs)")
            continue
        if not outputs or cell.get("execution_count") is None:
            problems.append(f"{where}: {CHECK_MARK} needs its expected output and an execution count "
                            "saved, else nbval does not check it")
        for out in outputs:
            if out.get("output_type") == "error" or out.get("name") == "stderr":
                problems.append(f"{where}: the expected output is an error / stderr")
    return problems


@pytest.mark.parametrize("notebook", lesson_notebooks(), ids=lambda p: p.name)
def test_notebook_saved_clean(notebook: Path):
    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    nbformat.validate(nb)
    problems = clean_problems(nb)
    assert not problems, (f"{notebook.name} is not saved clean; run "
                          f"`python tests/test_notebooks.py strip {notebook.relative_to(ROOT)}`:\n  "
                          + "\n  ".join(problems))


def test_lessons_are_found():
    from helpers.registry import MODELS

    names = [p.name for p in lesson_notebooks()]
    assert names[0] == ENVIRONMENT_LESSON and model_of(NOTEBOOKS / ENVIRONMENT_LESSON) is None
    assert "01-qwen-7b-chat-fastapi.ipynb" in names
    assert model_of(NOTEBOOKS / "01-qwen-7b-chat-fastapi.ipynb") == "qwen-7b-chat"
    # one lesson per registry model, each run on its family's stand-in
    models = [model_of(p) for p in lesson_notebooks() if model_of(p) is not None]
    assert sorted(models) == sorted(MODELS), names
    assert all(STANDINS[m] == MODELS[m].family for m in models)
    # the lessons about no single model: the environment, the classroom (teacher and students), vLLM
    others = [n for n in names if model_of(NOTEBOOKS / n) is None]
    assert others == [ENVIRONMENT_LESSON, CLASSROOM_LESSON, STUDENT_NOTEBOOK, VLLM_LESSON], others
    assert served_model(NOTEBOOKS / CLASSROOM_LESSON) in STANDINS
    assert served_model(NOTEBOOKS / VLLM_LESSON) in STANDINS
    assert served_model(NOTEBOOKS / STUDENT_NOTEBOOK) == served_model(NOTEBOOKS / CLASSROOM_LESSON)
    # numbered 00, 01, 02, ... without gaps; only the classroom lesson's two notebooks share a number
    numbers = [n[:2] for n in names if n != STUDENT_NOTEBOOK]
    assert numbers == [f"{i:02d}" for i in range(len(numbers))], names
    assert STUDENT_NOTEBOOK[:2] == CLASSROOM_LESSON[:2]


# --------------------------------------------------------------------------- cleaning tool


def strip(path: Path, expected: Path | None = None) -> list[str]:
    """Clear outputs, execution counts and extra metadata; keep (or take from ``expected``, an
    executed copy) the outputs of the checked cells. Returns what is still wrong."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    reference = {}
    if expected is not None:
        reference = {c.get("id"): c for c in nbformat.read(str(expected), as_version=4).cells}
    nb.metadata = {k: v for k, v in nb.metadata.items() if k in NOTEBOOK_METADATA}
    number = 0
    for cell in nb.cells:
        cell.metadata = {k: v for k, v in cell.metadata.items() if k in CELL_METADATA}
        if cell.cell_type != "code":
            continue
        number += 1
        if not _checked(cell):
            cell.execution_count = None
            cell.outputs = []
            continue
        source = reference.get(cell.get("id"), cell)
        outputs = []
        for out in source.get("outputs", []):
            out = dict(out)
            if "metadata" in out:
                out["metadata"] = {}
            if out.get("output_type") == "execute_result":
                out["execution_count"] = number
            previous = outputs[-1] if outputs else None
            if (out.get("output_type") == "stream" and previous is not None
                    and previous.get("output_type") == "stream" and previous.get("name") == out.get("name")):
                # one stream output per run of prints, as JupyterLab saves it (nbclient saves pieces)
                previous["text"] = "".join(previous["text"]) + "".join(out["text"])
                continue
            outputs.append(nbformat.from_dict(out))
        cell.outputs = outputs
        cell.execution_count = number if outputs else None
    nbformat.validate(nb)
    nbformat.write(nb, str(path))
    return clean_problems(nb)


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="keep only the expected outputs of checked cells")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("strip")
    p.add_argument("notebook", type=Path)
    p.add_argument("--expected", type=Path, default=None, help="executed copy to take checked outputs from")
    args = parser.parse_args(argv)
    problems = strip(args.notebook, args.expected)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
