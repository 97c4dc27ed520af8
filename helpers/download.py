"""Get a model's weights onto this machine: a local copy first, ModelScope only when needed.

In a notebook on the GPU box::

    model_dir = download("qwen-7b-chat", cache_dir="/root/autodl-tmp")

``model`` is a registry name (``helpers.registry``), a ModelScope id (``org/name``) or a local
folder (returned as is). The result is an absolute folder whose last component has no dots, so
``trust_remote_code`` models import cleanly (transformers imports the remote code as a module
named after that folder).

Where the files live (modelscope 1.40, i.e. modelscope-hub 0.5)
--------------------------------------------------------------
``snapshot_download(model_id, revision=..., cache_dir=C, local_files_only=True)`` never touches
the network and returns the first non-empty folder of

1. ``C/models/<owner>/<name___>``, dots in the name written ``___`` (``Qwen-1.8B`` ->
   ``Qwen-1___8B``): the layout of modelscope <= 1.37, found for *any* revision;
2. ``C/hub/models/<owner>/<name___>`` (the old default cache);
3. ``C/models/<owner>--<name>/snapshots/<revision>``: what modelscope 1.40 writes by itself
   (no revision given: ``master``, ``main``, or the only snapshot there is);

and, only when neither ``C/models/<owner>/<name___>`` nor ``C/models/<owner>--<name>`` exists,
first ``C/<owner>/<name>``, ``C/<owner>/<name___>``, ``C/hub/<owner>/...`` or
``C/models/<owner>/<name>`` (older layouts: ``/root/autodl-tmp/qwen/Qwen-7B-Chat`` from the
seed tutorials is found this way).

"Non-empty" is all it checks: no revision file, no ``.mdl``/``.msc`` metadata (those and the
``._____temp`` download folder belong to modelscope < 1.38), no check that a download finished.
Unfinished files sit next to the finished ones as ``<file>.incomplete`` / ``<file>.parallel_tmp``,
so :func:`download` checks completeness itself.

This module always stores models in layout 1 (``C/models/<owner>/<name___>``): it is found first,
whatever the revision, and its last component is the model's name, never a revision such as
``v1.1.4`` (layout 3 would give ``.../snapshots/v1.1.4`` for Qwen). The revision is not recorded
there: every model in the registry has one fixed revision.

Default cache folder: ``$MODEL_CACHE_DIR``, else ``$MODELSCOPE_CACHE``, else ``~/autodl-tmp`` if
it exists (AutoDL's data disk; the system disk is too small for 7B weights), else
``~/.cache/modelscope`` (modelscope's own default, shared with plain ``snapshot_download`` calls).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import threading
import time
from typing import Iterator

from .registry import MODELS, ModelSpec, get_spec

__all__ = ["DownloadError", "download", "seed_cache"]

# How long the reachability check of the ModelScope endpoint may take, in seconds. Without it a
# download with no network retries for ~20 s (DNS failure) to minutes (dropped packets).
_PROBE_TIMEOUT = 5.0
# What modelscope-hub tries when no endpoint is configured (.cn first, then the .ai site).
_DEFAULT_ENDPOINTS = ("https://modelscope.cn", "https://www.modelscope.ai")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
_PARTIAL_SUFFIXES = (".incomplete", ".parallel_tmp")
_SHARD = re.compile(r"-(\d+)-of-(\d+)\.(safetensors|bin)$")
_MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class DownloadError(RuntimeError):
    """The model could not be found locally nor downloaded; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------


def download(
    model: str,
    cache_dir: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    *,
    local_files_only: bool | None = None,
) -> str:
    """Return the local folder of ``model``'s weights, downloading them from ModelScope if needed.

    ``model``: registry name (``"qwen-7b-chat"``), ModelScope id (``"qwen/Qwen-7B-Chat"``, also
    ids outside the registry) or an existing local folder (returned as is, made absolute).
    ``cache_dir``: where models are kept (see the module doc for the default and the layout).
    ``revision``: defaults to the registry's pinned revision (``v1.1.4`` for Qwen).
    ``local_files_only``: ``True`` never uses the network; ``False`` always asks ModelScope (it
    checks every file and fetches what is missing or changed); ``None`` (default) returns a
    complete local copy at once and downloads only without one. ``HF_HUB_OFFLINE=1`` or
    ``TRANSFORMERS_OFFLINE=1`` make the default ``True``.

    Raises :class:`DownloadError` (fast, within a few seconds when ModelScope is unreachable).
    """
    model = os.fspath(model)
    spec, model_id, revision = _resolve(model, revision)
    if model_id is None:  # a local folder
        return _local_folder(model)

    cache = _cache_dir(cache_dir)
    if local_files_only is None and (_env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE")):
        local_files_only = True
    label = f"{model_id} ({revision})" if revision else model_id
    target = _store_path(cache, model_id)

    found = _find_local(model_id, revision, cache)
    problem = _incomplete(found) if found else "no local copy"
    if found and not problem and local_files_only is not False:
        path = _dot_free(found, target)
        print(f"Found a local copy of {label} in {path}")
        return path

    if local_files_only:
        where = f"the copy in {found} is incomplete ({problem})" if found else f"looked in {cache}"
        raise DownloadError(
            f"No complete local copy of {label} ({where}) and downloading is switched off "
            f"(local_files_only=True, HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE).\n"
            + _advice(model_id, revision, cache, target, network=False)
        )

    # Resume where modelscope looks (an earlier partial copy), unless that folder has dots.
    if found and "." not in os.path.basename(found):
        target = found
    endpoint, reason = _reachable_endpoint(_PROBE_TIMEOUT)
    if endpoint is None:
        state = f"an incomplete copy is in {found} ({problem})" if found else "no local copy was found"
        raise DownloadError(
            f"Cannot download {label}: ModelScope is unreachable ({reason}), and {state}.\n"
            + _advice(model_id, revision, cache, target, network=True)
        )
    _check_disk_space(spec, target, label)

    size = f", ~{spec.download_gb:g} GB" if spec is not None and spec.download_gb else ""
    rev = revision or "master"
    print(f"Downloading {model_id} ({rev}{size}) from {endpoint} into {target} ...")
    start = time.monotonic()
    try:
        path = _fetch(model_id, revision, cache, target, _configured_endpoint())
    except KeyboardInterrupt:
        print(f"Download interrupted; run the cell again to resume (finished files in {target} are kept).")
        raise
    except Exception as exc:  # noqa: BLE001 - every failure is reported with what to do next
        with contextlib.suppress(OSError):
            os.rmdir(target)  # only if modelscope left it empty
        message = _failure_message(exc, label, endpoint, model_id, revision, cache, target)
        raise DownloadError(message) from exc
    problem = _incomplete(path)
    if problem:
        raise DownloadError(
            f"ModelScope returned {path} for {label}, but it is not a usable model ({problem}). "
            "Check the model id and revision on the model's ModelScope page."
        )
    path = _dot_free(os.path.abspath(path), target)
    print(f"Downloaded {model_id} in {time.monotonic() - start:.0f} s: {path}")
    return path


def seed_cache(
    model: str,
    src_dir: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    revision: str | None = None,
) -> str:
    """Copy a local model folder into ``cache_dir`` under ``model``'s ModelScope id.

    Afterwards ``snapshot_download(model_id, revision=..., cache_dir=cache_dir,
    local_files_only=True)`` and an unchanged ``download(model, cache_dir=cache_dir)`` find it
    without network (used to stand a tiny model in for the real one in tests and CI). Replaces an
    earlier seed. Returns the path ``snapshot_download`` returns for it.
    """
    _, model_id, revision = _resolve(os.fspath(model), revision, allow_folder=False)
    src = os.path.abspath(os.path.expanduser(os.fspath(src_dir)))
    if not os.path.isdir(src):
        raise FileNotFoundError(f"no such model folder: {src}")
    cache = _cache_dir(cache_dir)
    dest = _store_path(cache, model_id)
    if os.path.commonpath([src, dest]) in (src, dest):
        raise ValueError(f"source {src} and destination {dest} overlap")
    if os.path.islink(dest) or os.path.isfile(dest):
        os.unlink(dest)
    elif os.path.isdir(dest):
        shutil.rmtree(dest)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.copytree(src, dest)

    found = _find_local(model_id, revision, cache)
    if found is None or os.path.realpath(found) != os.path.realpath(dest):
        raise RuntimeError(
            f"seeded {dest}, but modelscope's snapshot_download(local_files_only=True) finds "
            f"{found!r} for {model_id}: the installed modelscope uses another cache layout"
        )
    return found


# ---------------------------------------------------------------------------------------------
# private helpers
# ---------------------------------------------------------------------------------------------


def _resolve(model: str, revision: str | None, allow_folder: bool = True):
    """-> (spec or None, model_id or None for a local folder, revision)."""
    key = model.strip()
    spec = None
    try:
        spec = get_spec(key)
    except KeyError:
        pass
    if spec is not None:
        return spec, spec.model_id, revision if revision is not None else spec.revision
    path = os.path.expanduser(key)
    explicit = os.path.isabs(path) or key.startswith(("./", "../", "~", ".\\", "..\\"))
    if allow_folder and (os.path.isdir(path) or explicit):
        return None, None, revision
    if _MODEL_ID.match(key):
        return None, key, revision
    raise ValueError(
        f"unknown model {model!r}: use one of {', '.join(MODELS)}, a ModelScope id 'org/name', "
        "or an existing local folder"
    )


def _local_folder(model: str) -> str:
    path = os.path.abspath(os.path.expanduser(model.strip()))
    if not os.path.isdir(path):
        raise DownloadError(
            f"no such folder: {path}. Pass an existing model folder, a registry name "
            f"({', '.join(MODELS)}) or a ModelScope id."
        )
    if "." in os.path.basename(path):
        print(f"Note: the folder name {os.path.basename(path)!r} has dots; models with remote code "
              "may fail to import from it. Rename it without dots if loading fails.")
    return path


def _cache_dir(cache_dir) -> str:
    if cache_dir is None or os.fspath(cache_dir) == "":
        cache_dir = _default_cache_dir()
    return os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))


def _default_cache_dir() -> str:
    for var in ("MODEL_CACHE_DIR", "MODELSCOPE_CACHE"):
        if os.environ.get(var, "").strip():
            return os.environ[var].strip()
    autodl = os.path.expanduser("~/autodl-tmp")
    if os.path.isdir(autodl):
        return autodl
    return os.path.expanduser("~/.cache/modelscope")


def _store_path(cache: str, model_id: str) -> str:
    """Where this module keeps a model: ``<cache>/models/<owner>/<name, '.' -> '___'>``."""
    owner, name = model_id.split("/", 1)
    return os.path.join(cache, "models", owner, name.replace(".", "___"))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def _quiet(logger_names=("modelscope_hub", "modelscope")) -> Iterator[None]:
    """Hide modelscope's INFO/WARNING lines ("Found legacy cache ...") during a local lookup."""
    loggers = [logging.getLogger(n) for n in logger_names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _find_local(model_id: str, revision: str | None, cache: str) -> str | None:
    """Ask modelscope where its cached copy is (no network); None if it has none."""
    from modelscope import snapshot_download

    with _quiet():
        try:
            path = snapshot_download(model_id, revision=revision, cache_dir=cache, local_files_only=True)
        except Exception:  # CacheNotFound and friends: no usable local copy
            return None
    return os.path.abspath(os.fspath(path)) if path and os.path.isdir(path) else None


def _incomplete(path: str) -> str:
    """Why the folder is not a complete model ('' if it looks complete)."""
    files = []
    for root, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files.extend(os.path.relpath(os.path.join(root, n), path) for n in names)
    partial = [f for f in files if f.endswith(_PARTIAL_SUFFIXES)]
    if partial:
        return f"unfinished download: {partial[0]}"
    if "config.json" not in files:
        return "no config.json"
    weights = [f for f in files if f.endswith(_WEIGHT_SUFFIXES)]
    if not weights:
        return "no weight files"
    present = set(files)
    for f in weights:
        m = _SHARD.search(f)
        if m:
            total, width = int(m.group(2)), len(m.group(1))
            for i in range(1, total + 1):
                shard = _SHARD.sub(f"-{i:0{width}d}-of-{m.group(2)}.{m.group(3)}", f)
                if shard not in present:
                    return f"missing weight shard {shard}"
    for index in (f for f in files if f.endswith(".index.json")):
        try:
            import json

            with open(os.path.join(path, index), encoding="utf-8") as fh:
                shards = set(json.load(fh).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            return f"unreadable {index}"
        missing = sorted(s for s in shards if s not in present)
        if missing:
            return f"missing weight file {missing[0]}"
    return ""


def _dot_free(path: str, store: str) -> str:
    """Return ``path``, or a dot-free symlink to it when its last component has dots.

    modelscope's own layout ends in the revision (``.../snapshots/v1.1.4``); the symlink goes
    where modelscope looks first (``<cache>/models/<owner>/<name___>``) so later lookups agree.
    """
    if "." not in os.path.basename(path):
        return path
    try:
        if os.path.isdir(store) and not os.path.islink(store) and not os.listdir(store):
            os.rmdir(store)
        if not os.path.lexists(store):
            os.makedirs(os.path.dirname(store), exist_ok=True)
            os.symlink(path, store, target_is_directory=True)
        if os.path.realpath(store) == os.path.realpath(path):
            return store
    except OSError as exc:
        print(f"Note: could not link {path} to a folder name without dots ({exc}).")
    print(f"Note: {os.path.basename(path)!r} has dots; models with remote code may fail to import "
          f"from {path}. Copy it to a folder without dots, e.g. {store}.")
    return path


def _configured_endpoint() -> str | None:
    """MODELSCOPE_ENDPOINT, else the deprecated MODELSCOPE_DOMAIN, read now (not cached).

    modelscope-hub reads these once per process (its default config is a singleton), so the
    download passes this value explicitly: the probe and the download then agree, and a change
    made in a running notebook counts.
    """
    configured = os.environ.get("MODELSCOPE_ENDPOINT", "").strip() or os.environ.get(
        "MODELSCOPE_DOMAIN", ""
    ).strip()
    if not configured:
        return None
    if not configured.lower().startswith(("http://", "https://")):
        configured = "https://" + configured
    return configured.rstrip("/")


def _endpoints() -> list[str]:
    """The endpoint(s) modelscope will use: the configured one, else .cn then .ai."""
    configured = _configured_endpoint()
    return [configured] if configured else list(_DEFAULT_ENDPOINTS)


def _reachable_endpoint(timeout: float) -> tuple[str | None, str]:
    """Probe the endpoints in parallel; -> (first one that answers at all, or None; why not).

    Any HTTP answer counts. Threads bound the wait, DNS look-ups included (requests' timeout
    does not cover those). Proxies from the environment (AutoDL's network_turbo) are used.
    """
    import requests

    urls = _endpoints()
    results: dict[str, str | None] = {}
    lock = threading.Lock()

    def probe(url: str) -> None:
        try:
            requests.head(url, timeout=(timeout, timeout), allow_redirects=False)
            outcome = None
        except Exception as exc:  # noqa: BLE001
            outcome = f"{type(exc).__name__}: {_short(exc)}"
        with lock:
            results[url] = outcome

    for url in urls:
        threading.Thread(target=probe, args=(url,), daemon=True, name=f"probe {url}").start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with lock:
            ok = [u for u in urls if u in results and results[u] is None]
            if ok:
                return ok[0], ""
            if len(results) == len(urls):
                break
        time.sleep(0.02)
    with lock:
        reasons = [f"{u}: {results.get(u) or f'no answer within {timeout:g} s'}" for u in urls]
    return None, "; ".join(reasons)


def _short(exc: BaseException) -> str:
    text = str(exc)
    for marker in ("Failed to resolve", "Connection refused", "timed out", "Network is unreachable",
                   "No route to host", "Name or service not known"):
        if marker in text:
            return marker
    return text if len(text) <= 160 else text[:157] + "..."


def _check_disk_space(spec: ModelSpec | None, target: str, label: str) -> None:
    if spec is None or not spec.download_gb:
        return
    probe = target
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    have = 0
    if os.path.isdir(target):
        for root, _, names in os.walk(target):
            for n in names:
                with contextlib.suppress(OSError):
                    have += os.path.getsize(os.path.join(root, n))
    need = spec.download_gb * 1e9 - have
    free = shutil.disk_usage(probe).free
    if free < need:
        raise DownloadError(
            f"Not enough disk space for {label}: about {need / 1e9:.1f} GB still to download, "
            f"{free / 1e9:.1f} GB free on the disk of {probe}. Free some space or pass another "
            "cache_dir (on AutoDL the data disk is /root/autodl-tmp; the system disk is small)."
        )


def _progress_enabled() -> bool:
    return not (_env_flag("HF_HUB_DISABLE_PROGRESS_BARS") or _env_flag("CI") or _env_flag("TQDM_DISABLE"))


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """modelscope-hub draws tqdm bars unconditionally (TQDM_DISABLE only counts at import time);
    turn them off by swapping its module-level ``tqdm`` for the duration of the download."""
    if enabled:
        yield
        return
    try:
        import modelscope_hub._download as hub_download

        original = hub_download.tqdm
    except (ImportError, AttributeError):
        yield
        return
    hub_download.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        hub_download.tqdm = original


def _fetch(model_id: str, revision: str | None, cache: str, target: str, endpoint: str | None) -> str:
    from modelscope import snapshot_download

    with _progress_bars(_progress_enabled()):
        return os.fspath(
            snapshot_download(model_id, revision=revision, cache_dir=cache, local_dir=target,
                              endpoint=endpoint)
        )


def _failure_message(exc: Exception, label: str, endpoint: str, model_id: str, revision: str | None,
                     cache: str, target: str) -> str:
    cause = exc.__cause__ or exc  # modelscope's compat layer re-raises NotExistError as HTTPError
    kinds = {type(cause).__name__, type(exc).__name__}
    status = getattr(getattr(exc, "response", None), "status_code", None)
    text = f"{type(exc).__name__}: {exc}"
    if "NotExistError" in kinds or status == 404 or "[404]" in str(exc):
        return (f"ModelScope ({endpoint}) has no {label}: {text}\n"
                "Check the model id and revision (ids are case-sensitive; the model's ModelScope "
                "page lists its revisions under 'Files and versions').")
    if kinds & {"AuthenticationError", "PermissionDeniedError"} or status in (401, 403):
        return (f"ModelScope ({endpoint}) refused {label}: {text}\n"
                "The model may need a login or an accepted license: accept it on the model's "
                "ModelScope page, then `modelscope login` or set MODELSCOPE_API_TOKEN.")
    kept = (f"Finished files are kept in {target}; running this again resumes.\n"
            if os.path.isdir(target) else "")
    return (f"Downloading {label} from {endpoint} failed: {text}\n{kept}"
            + _advice(model_id, revision, cache, target, network=True))


def _advice(model_id: str, revision: str | None, cache: str, target: str, *, network: bool) -> str:
    rev = f" --revision {revision}" if revision else ""
    lines = ["What to do next:"]
    if network:
        lines += [
            "  - check this machine's network and proxy settings: PyPI may work through a mirror "
            "while modelscope.cn does not (try: curl -I https://modelscope.cn);",
            "  - on AutoDL, turn on the academic acceleration: `source /etc/network_turbo` in a "
            "terminal (in a notebook, copy the proxy variables it sets into os.environ), then "
            "run this again;",
            "  - another ModelScope endpoint can be set with MODELSCOPE_ENDPOINT;",
        ]
    lines += [
        f"  - or download it elsewhere (`modelscope download {model_id}{rev} --local-dir "
        f"<folder>`) and pass that folder instead: download('/path/to/folder');",
        f"  - or copy the model files into {target} (where download() looks first, "
        f"with cache_dir={cache!r}).",
    ]
    return "\n".join(lines)
