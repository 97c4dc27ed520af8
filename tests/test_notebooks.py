"""The lessons' notebooks, run top to bottom with nbval on the tiny stand-ins.

Each lesson ``notebooks/NN-<model name>-....ipynb`` is run unchanged, as the student runs it on the
GPU box; only the environment differs: a temporary model cache seeded with the random-weight
stand-in under the real ModelScope id (``MODEL_CACHE_DIR``), a free ``PORT``, progress bars off.
The environment lesson (``00-...``, no model) runs with an empty cache. A lesson runs from a copy in a
temporary folder, so that what it writes next to itself (``%%writefile api.py``) stays out of the
checkout.

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

import json
import os
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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


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

    model = model_of(notebook)
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
    cmd = [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env",
           f"--nbval-cell-timeout={CELL_TIMEOUT}", "-p", "no:cacheprovider", "-q", "-rs", notebook.name]
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
    seconds = time.monotonic() - started
    assert proc.returncode == 0, f"nbval failed on {notebook.name} (exit {proc.returncode}):\n{out[-30000:]}"
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
    models = [model_of(p) for p in lesson_notebooks()[1:]]
    assert sorted(models) == sorted(MODELS), names
    assert all(STANDINS[m] == MODELS[m].family for m in models)
    # numbered 00, 01, 02, ... without gaps or duplicates
    assert [n[:2] for n in names] == [f"{i:02d}" for i in range(len(names))], names


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
