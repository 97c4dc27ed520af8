"""The lessons as documents: every exported ``api.py`` serves, and text and code agree.

* ``api.py``: each model lesson has one ``%%writefile api.py`` cell. Its body is written to a temporary
  folder and started with ``python api.py`` on the lesson's stand-in (seeded under the real ModelScope
  id in ``MODEL_CACHE_DIR``, on a free ``PORT``), called with the seed tutorials' ``requests`` snippet
  and the official ``openai`` client (sync and streaming), then stopped with Ctrl-C (SIGINT): it must
  exit cleanly.
* Agreement: the ModelScope id, revision, port and model name a lesson's markdown mentions are the ones
  its code uses and the registry holds; images and lesson links in the markdown resolve, images have
  alt text; the README's lesson index matches the registry. The classroom lesson's terminal commands
  serve the model, keys and limits of its config cell; the students' notebook needs nothing but
  ``requests`` and ``openai`` (no ``helpers``: students do not install this repository). The vLLM
  lesson serves the model of its config cell with ``--engine vllm``; its terminal command is run on the
  stand-in with the real vLLM (CPU build): it serves the seed API and the openai client and stops
  vLLM with Ctrl-C.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

from .conftest import free_port, vllm_python_or_skip, wait_for_server
from .test_notebooks import (CLASSROOM_LESSON, ENVIRONMENT_LESSON, NOTEBOOKS, ROOT, RUN_MARK, STANDINS,
                             STUDENT_NOTEBOOK, VLLM_LESSON, lesson_notebooks, model_of, served_model, stop_marked,
                             terminal_commands)

WRITEFILE = "%%writefile api.py"
API_MAX_LINES = 35  # "short enough to read on one screen"
DEFAULT_PORT = 6006
MODEL_LESSONS = [p for p in lesson_notebooks() if model_of(p) is not None]


def _cells(notebook: Path) -> list[dict]:
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    return [dict(c, source=c["source"] if isinstance(c["source"], str) else "".join(c["source"]))
            for c in nb["cells"]]


def markdown_of(notebook: Path) -> str:
    return "\n\n".join(c["source"] for c in _cells(notebook) if c["cell_type"] == "markdown")


def code_cells(notebook: Path) -> list[str]:
    return [c["source"] for c in _cells(notebook) if c["cell_type"] == "code"]


def api_source(notebook: Path) -> str:
    """The body of the lesson's ``%%writefile api.py`` cell: what a reader who copies it gets."""
    cells = [s for s in code_cells(notebook) if s.lstrip().startswith(WRITEFILE)]
    assert len(cells) == 1, f"{notebook.name}: expected one `{WRITEFILE}` cell, found {len(cells)}"
    return cells[0].lstrip()[len(WRITEFILE):].lstrip("\n")


# --------------------------------------------------------------------------- api.py serves


def _stop(proc: subprocess.Popen) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return -9, out
    return proc.returncode, out


@pytest.mark.parametrize("notebook", MODEL_LESSONS, ids=lambda p: p.name)
def test_exported_api_py_serves_and_stops(notebook: Path, tmp_path: Path):
    import requests
    from openai import BadRequestError, OpenAI

    from helpers.download import seed_cache
    from helpers.formats import get_chat_format
    from helpers.registry import MODELS
    from helpers.tiny import build_tiny

    model = model_of(notebook)
    source = api_source(notebook)
    assert len(source.splitlines()) <= API_MAX_LINES, f"{notebook.name}: api.py has grown past {API_MAX_LINES} lines"
    work = tmp_path / "work"
    work.mkdir()
    (work / "api.py").write_text(source, encoding="utf-8")
    cache = tmp_path / "cache"
    seed_cache(model, build_tiny(STANDINS[model], tmp_path / "standin"), cache)

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(MODEL_CACHE_DIR=str(cache), PORT=str(port), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.Popen([sys.executable, "api.py"], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        health = wait_for_server(proc, url, 120, "python api.py")
        assert health["model"] == model and health["status"] == "ok", health

        # the seed tutorials' requests snippet, unchanged but for the URL
        headers = {'Content-Type': 'application/json'}
        data = {"prompt": "你好", "history": []}
        response = requests.post(url=url, headers=headers, data=json.dumps(data))
        assert response.status_code == 200, response.text
        assert isinstance(response.json()['response'], str)
        assert response.json()["history"] == [["你好", response.json()["response"]]]

        client = OpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0)
        assert [m.id for m in client.models.list().data] == [model]
        messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                    {"role": "user", "content": "讲个笑话吧。"}]
        out = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
        assert out.choices[0].finish_reason in ("stop", "length")
        chunks = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                                stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        # the non-streamed answer is post-processed (Qwen's chat() strips it)
        assert out.choices[0].message.content in (streamed, streamed.strip())

        with_system = [{"role": "system", "content": "你是一位耐心的老师。"}] + messages
        if get_chat_format(MODELS[model].family).supports_system:
            client.chat.completions.create(model=model, messages=with_system, max_tokens=4)
        else:  # what the XVERSE lesson shows: HTTP 400 with a message that says what to change
            with pytest.raises(BadRequestError) as err:
                client.chat.completions.create(model=model, messages=with_system, max_tokens=4)
            assert err.value.status_code == 400 and "system" in str(err.value)
    finally:
        code, output = _stop(proc)
    assert code == 0, f"python api.py did not exit cleanly after Ctrl-C (exit {code}):\n{output}"
    assert "Traceback" not in output, output
    assert "Server stopped." in output, output


# --------------------------------------------------------------------------- text and code agree


def _registry_ids() -> dict[str, str]:
    from helpers.registry import MODELS

    return {spec.model_id: name for name, spec in MODELS.items()}


def modelscope_ids_in(text: str) -> set[str]:
    """ModelScope ids (``owner/name``) in ``text`` whose owner is one of the registry's owners,
    written in any case (so that a miscased or mistyped id is caught too)."""
    owners = {model_id.split("/")[0].lower() for model_id in _registry_ids()}
    found = set()
    # overlapping matches: the id inside /root/autodl-tmp/models/qwen/Qwen-7B-Chat counts too
    for match in re.finditer(r"(?<![A-Za-z0-9_-])(?=([A-Za-z0-9_-]+)/([A-Za-z0-9][A-Za-z0-9_.-]*[A-Za-z0-9]))", text):
        owner, name = match.groups()
        if owner.lower() in owners:
            found.add(f"{owner}/{name}")
    return found


def ports_in(markdown: str) -> set[int]:
    """Ports the text says the server uses: ``127.0.0.1:N``, ``0.0.0.0:N``, ``--port N``, ``端口 N``,
    ``N 端口``, ``-L N:...``."""
    patterns = [r"(?:127\.0\.0\.1|0\.0\.0\.0|localhost):(\d{2,5})\b", r"--port[ =](\d{2,5})\b",
                r"端口\s?(\d{2,5})\b", r"\b(\d{4,5})\s?端口", r"-L\s?(\d{2,5}):"]
    return {int(p) for pattern in patterns for p in re.findall(pattern, markdown)}


@pytest.mark.parametrize("notebook", lesson_notebooks(), ids=lambda p: p.name)
def test_markdown_and_code_agree(notebook: Path):
    from helpers.registry import MODELS

    markdown = markdown_of(notebook)
    code = "\n\n".join(code_cells(notebook))
    model = model_of(notebook)
    ids = modelscope_ids_in(markdown)
    revisions = set(re.findall(r"\bv\d+\.\d+\.\d+\b", markdown))

    if model is None:  # the environment, classroom and vLLM lessons: whatever they name is in the registry
        assert notebook.name in (ENVIRONMENT_LESSON, CLASSROOM_LESSON, STUDENT_NOTEBOOK, VLLM_LESSON), notebook.name
        assert ids <= set(_registry_ids()), f"ids not in the registry: {ids - set(_registry_ids())}"
        pinned = {spec.revision for spec in MODELS.values() if spec.revision}
        assert revisions <= pinned, f"revisions not in the registry: {revisions - pinned}"
    else:
        spec = MODELS[model]
        # the ModelScope id in the text is the registry's, and no other model's id slips in
        assert ids == {spec.model_id}, f"ModelScope ids in the text: {ids}, registry: {spec.model_id}"
        # the revision in the text is the pinned one (and a pinned revision is mentioned)
        assert revisions == ({spec.revision} if spec.revision else set()), (revisions, spec.revision)
        # the code serves this lesson's model: config cell, api.py, curl bodies, one-liners
        names = re.findall(r'^MODEL_NAME = "([^"]+)"', code, flags=re.M)
        assert names == [model, model], f"MODEL_NAME in the config cell and api.py: {names}"
        assert set(re.findall(r'"model": "([^"]+)"', code)) <= {model}
        assert set(re.findall(r"--model ([\w.:/-]+)", markdown)) == {model}
        # every lesson starts from the environment lesson
        assert f"]({ENVIRONMENT_LESSON})" in markdown, f"{notebook.name} does not link to {ENVIRONMENT_LESSON}"
        api = api_source(notebook)
        assert 'HOST = "0.0.0.0"' in api and 'os.environ.get("MODEL_CACHE_DIR", "/root/autodl-tmp")' in api
        assert "uvicorn.run(app, host=HOST, port=PORT" in api

    if notebook.name == CLASSROOM_LESSON:
        check_classroom_lesson(notebook, markdown, code)
    if notebook.name == STUDENT_NOTEBOOK:
        check_student_notebook(markdown, code)
    if notebook.name == VLLM_LESSON:
        check_vllm_lesson(notebook, markdown, code)

    # the port: the code's default is the one the text names, and AutoDL's 6006
    defaults = {int(p) for p in re.findall(r'os\.environ\.get\("PORT", "(\d+)"\)', code)}
    if notebook.name == STUDENT_NOTEBOOK:  # it calls the address the teacher hands out
        assert not defaults and ports_in(markdown) <= {DEFAULT_PORT}, (defaults, ports_in(markdown))
    else:
        assert defaults == {DEFAULT_PORT}, defaults
        assert ports_in(markdown) == {DEFAULT_PORT}, f"ports in the text: {ports_in(markdown)}"
    if model is not None or notebook.name in (CLASSROOM_LESSON, VLLM_LESSON):
        assert 'HOST = "0.0.0.0"' in code

    # images: existing files under images/, with alt text; links to lessons: existing notebooks
    images = re.findall(r"!\[([^\]]*)\]\(([^)\s]+)\)", markdown)
    assert images, f"{notebook.name} shows no figure (the flow diagram at least)"
    for alt, target in images:
        path = (NOTEBOOKS / target).resolve()
        assert path.is_file(), f"{notebook.name}: image {target} does not exist"
        assert path.parent == ROOT / "images", f"{notebook.name}: image {target} is not in images/"
        assert len(alt.strip()) >= 10, f"{notebook.name}: image {target} needs alt text"
    for target in re.findall(r"\]\(([^)\s]+\.ipynb)\)", markdown):
        assert (NOTEBOOKS / target).is_file(), f"{notebook.name}: link to missing lesson {target}"


def check_classroom_lesson(notebook: Path, markdown: str, code: str) -> None:
    """The teacher's lesson: it serves one registry model, named once in its config cell; its
    terminal commands make as many keys as there are groups and serve that model with the limits of
    the config cell; it links to the environment lesson and to the students' notebook."""
    from helpers.registry import MODELS

    served = served_model(notebook)
    assert served in MODELS and re.findall(r'^MODEL_NAME = "([^"]+)"', code, flags=re.M) == [served]
    config = {name: value for name, value in re.findall(r"^([A-Z_]+) = (\d+)\b", code, flags=re.M)}
    commands = terminal_commands(notebook)
    serve = [shlex.split(c) for c in commands if c.split()[3:4] == ["serve"]]
    keys = [c for c in commands if c.split()[3:4] == ["keys"]]
    assert len(serve) == 1 and keys == [f"python -m helpers keys {config['GROUPS']} > keys.txt"], commands
    args = serve[0]
    flag = {name: args[args.index(name) + 1] for name in args if name.startswith("--")}
    assert flag["--model"] == served and flag["--host"] == "0.0.0.0" and flag["--port"] == str(DEFAULT_PORT), flag
    assert flag["--api-key-file"] == "keys.txt"
    for option, constant in [("--max-tokens-limit", "MAX_TOKENS_LIMIT"), ("--max-prompt-tokens", "MAX_PROMPT_TOKENS"),
                             ("--max-batch", "MAX_BATCH"), ("--max-queue", "MAX_QUEUE")]:
        assert flag[option] == config[constant], (option, flag[option], constant, config[constant])
    assert set(re.findall(r"--model ([\w.:/-]+)", markdown)) == {served}
    assert f"]({ENVIRONMENT_LESSON})" in markdown and f"]({STUDENT_NOTEBOOK})" in markdown
    assert 'os.environ.get("MODEL_CACHE_DIR", "/root/autodl-tmp")' in code


def vllm_serve_command(notebook: Path) -> str:
    """The lesson's terminal command that serves its own model with vLLM (no extra vLLM arguments)."""
    served = served_model(notebook)
    commands = [c for c in terminal_commands(notebook) if c.split()[3:4] == ["serve"]
                and f"--model {served} " in c + " " and "--engine vllm" in c and "--vllm-arg" not in c]
    assert len(commands) == 1, f"{notebook.name}: serve commands for {served}: {terminal_commands(notebook)}"
    return commands[0]


def check_vllm_lesson(notebook: Path, markdown: str, code: str) -> None:
    """The vLLM lesson: one registry model in its config cell, native in vLLM; every serve command it
    shows uses vLLM (--engine vllm or --upstream), the lesson's own on 0.0.0.0:6006; the code starts
    VLLMServer + UpstreamGenerator + start_server; it links to the environment lesson and to its model's
    lesson."""
    from helpers.registry import MODELS

    served = served_model(notebook)
    assert served in MODELS and re.findall(r'^MODEL_NAME = "([^"]+)"', code, flags=re.M) == [served]
    assert MODELS[served].family in ("internlm2", "minicpm"), "the lesson's model should be native in vLLM"
    serve = [c for c in terminal_commands(notebook) if c.split()[3:4] == ["serve"]]
    assert serve and all("--engine vllm" in c or "--upstream" in c for c in serve), serve
    args = shlex.split(vllm_serve_command(notebook))
    flag = {name: args[args.index(name) + 1] for name in ("--host", "--port")}
    assert flag == {"--host": "0.0.0.0", "--port": str(DEFAULT_PORT)}, flag
    for name in ("VLLMServer(", "UpstreamGenerator(", "start_server(generator",
                 'os.environ.get("MODEL_CACHE_DIR", "/root/autodl-tmp")'):
        assert name in code, f"{notebook.name} does not use {name}"
    lesson = next(p.name for p in lesson_notebooks() if model_of(p) == served)
    assert f"]({ENVIRONMENT_LESSON})" in markdown and f"]({lesson})" in markdown


def check_student_notebook(markdown: str, code: str) -> None:
    """The students' notebook: the address and key come from the config cell (the test hands them in
    through CLASS_URL / CLASS_KEY); it calls the server with requests and openai only."""
    assert 'os.environ.get("CLASS_URL", ' in code and 'os.environ.get("CLASS_KEY", ' in code
    assert not re.search(r"^\s*(from|import) helpers\b", code, flags=re.M), "students do not install helpers"
    assert "import requests" in code and "from openai import OpenAI" in code
    assert f"]({CLASSROOM_LESSON})" in markdown


def test_api_cells_exist_only_in_model_lessons():
    others = [p for p in lesson_notebooks() if model_of(p) is None]
    assert [p.name for p in others] == [ENVIRONMENT_LESSON, CLASSROOM_LESSON, STUDENT_NOTEBOOK, VLLM_LESSON]
    for notebook in others:
        assert not [s for s in code_cells(notebook) if s.lstrip().startswith(WRITEFILE)], notebook.name
    assert len(MODEL_LESSONS) == len(lesson_notebooks()) - len(others)


def test_readme_lesson_index_matches_the_registry():
    from helpers.registry import MODELS

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = [line for line in readme.splitlines() if line.startswith("| [")]
    for notebook in lesson_notebooks():
        link = f"(notebooks/{notebook.name})"
        matching = [row for row in rows if link in row]
        assert len(matching) == 1, f"README's lesson index has {len(matching)} rows linking {link}"
        model = model_of(notebook)
        if model is None:
            continue
        row, spec = matching[0], MODELS[model]
        assert f"`{spec.model_id}`" in row, (row, spec.model_id)
        sizes = [float(n) for n in re.findall(r"(\d+(?:\.\d+)?) GB", row)]
        assert sizes[:2] == [spec.gpu_memory_gb, spec.download_gb], (row, spec.gpu_memory_gb, spec.download_gb)
    assert "即将推出" not in readme


@pytest.mark.parametrize("notebook", [NOTEBOOKS / VLLM_LESSON], ids=lambda p: p.name)
def test_vllm_lesson_terminal_command_serves_and_stops(notebook: Path, tmp_path: Path):
    """The vLLM lesson's `python -m helpers serve ... --engine vllm`, run as printed (on a free port, on
    the stand-in seeded under the real id, vLLM's CPU build): the seed API and the openai client answer,
    /health says vllm, and Ctrl-C stops the front and vLLM with it."""
    import requests
    from openai import OpenAI

    from helpers.download import seed_cache
    from helpers.tiny import build_tiny

    model = served_model(notebook)
    python = vllm_python_or_skip()
    cache = tmp_path / "cache"
    seed_cache(model, build_tiny(STANDINS[model], tmp_path / "standin"), cache)
    port = free_port()
    args = shlex.split(vllm_serve_command(notebook))[1:]
    args[args.index("--port") + 1] = str(port)
    # on the CPU, as the lesson's config cell does without a GPU: no CUDA graphs, 1 GiB of KV cache
    args.append("--vllm-arg=--enforce-eager")
    mark = str(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(MODEL_CACHE_DIR=str(cache), VLLM_PYTHON=python, VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]),
               **{RUN_MARK: mark})
    proc = subprocess.Popen([sys.executable] + args, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        health = wait_for_server(proc, url, 600, " ".join(args))
        assert health["model"] == model and health["device"] == "vllm", health
        r = requests.post(url, json={"prompt": "你好", "history": [], "max_length": 8}, timeout=120)
        assert r.status_code == 200 and r.json()["history"] == [["你好", r.json()["response"]]], r.text
        client = OpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0)
        assert [m.id for m in client.models.list().data] == [model]
        chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "你好"}],
                                                     max_tokens=8, temperature=0, stream=True))
        finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finals and finals[-1] in ("stop", "length"), chunks[-3:]
    finally:
        code, output = _stop(proc)
        left = stop_marked(mark)
    assert code == 0 and "Server stopped." in output, f"did not stop cleanly (exit {code}):\n{output[-5000:]}"
    # our own lines only: vLLM's shutdown sometimes logs its own EngineDeadError traceback
    ours = "\n".join(line for line in output.splitlines() if not line.startswith("[vllm]"))
    assert "Traceback" not in ours, ours[-5000:]
    assert not [c for c in left if "vllm" in c.lower()], f"vLLM outlived the server (stopped now): {left}"


@pytest.mark.parametrize("image", sorted((ROOT / "images").glob("*.svg")), ids=lambda p: p.name)
def test_svg_figures_are_well_formed_and_titled(image: Path):
    root = ElementTree.parse(image).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    assert root.tag == f"{ns}svg"
    title = root.find(f"{ns}title")
    assert title is not None and title.text and title.text.strip(), f"{image.name} needs a <title>"
    assert root.get("role") == "img"


def test_chat_formats_figure_is_current():
    """images/chat-formats.svg is drawn from helpers.formats: it must match what the script draws now."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("chat_formats_figure", ROOT / "scripts" / "chat_formats_figure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = (ROOT / "images" / "chat-formats.svg").read_text(encoding="utf-8")
    assert committed == module.svg(), "images/chat-formats.svg is stale: run `python scripts/chat_formats_figure.py`"
