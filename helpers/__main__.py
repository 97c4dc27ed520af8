"""Command line.

    python -m helpers serve --model NAME_OR_PATH [--host 0.0.0.0] [--port 6006]
                            [--api-key-file keys.txt] [--max-tokens-limit 1024]
                            [--engine vllm [--vllm-arg=--tensor-parallel-size=2 ...] | --upstream URL]
    python -m helpers convert-qwen SRC DST   # Qwen v1 weights -> Qwen2 architecture (for vLLM)
    python -m helpers keys [N]          # N new API keys, one a line (for a workshop)
    python -m helpers tiny FAMILY DIR
    python -m helpers demo [--family qwen]

API keys (one per student group) come from --api-key (repeatable), --api-key-file (one a line) and
the environment variable API_KEYS (comma-separated); the server prints how many are active, never
the keys. Prefer the file or the variable: command-line arguments are visible to other users (ps).

NAME is a registry name (``qwen-7b-chat`` ...), a ModelScope id, a local folder, or ``tiny:FAMILY``
for an offline stand-in with random weights (for trying the API without a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .limits import DEFAULT_MAX_BODY_BYTES


def _tiny_dir(family: str) -> Path:
    base = os.environ.get("HELPERS_TINY_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "llm-api-helpers", "tiny")
    return Path(base) / family


def resolve_model(model: str, cache_dir: str | None = None) -> str:
    """A local folder for ``model`` (downloading it if needed)."""
    if model.startswith("tiny:"):
        from .tiny import build_tiny

        family = model.split(":", 1)[1]
        return str(build_tiny(family, _tiny_dir(family)))
    if os.path.isdir(os.path.expanduser(model)):
        return os.path.abspath(os.path.expanduser(model))
    from .download import download

    return download(model, cache_dir=cache_dir)


def _load(args):
    from .loading import load_model

    path = resolve_model(args.model, args.cache_dir)
    return load_model(path, device=args.device, dtype=args.dtype, family=args.family)


def cmd_serve(args) -> int:
    """Open the port at once (503 + Retry-After while loading), load, then serve."""
    import threading

    from .auth import APIKeys, keys_from
    from .background import port_is_free, uvicorn_server
    from .engine import Engine
    from .server import LoadingApp, create_app

    if not port_is_free(args.port, args.host):
        print(f"error: port {args.port} is already in use (another server? `lsof -i :{args.port}`)", file=sys.stderr)
        return 1
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logging.getLogger("helpers.requests").addHandler(handler)  # one line per finished request
    logging.getLogger("helpers.requests").setLevel(logging.INFO)
    keys = APIKeys(keys_from(args.api_key, args.api_key_file))
    path = resolve_model(args.model, args.cache_dir)  # a download error is reported before serving
    gate = LoadingApp(args.model)
    engines = []
    processes = []  # a vLLM server started here: stopped on the way out, whatever happened
    failed = []
    server = uvicorn_server(gate, args.host, args.port, log_level=args.log_level, access_log=True)

    def load():
        from .loading import load_model

        try:
            if args.engine == "vllm" or args.upstream:
                engine = _vllm_generator(args, path, processes)
            else:
                loaded = load_model(path, device=args.device, dtype=args.dtype, family=args.family)
                engine = Engine(loaded, max_queue=args.max_queue, max_batch=args.max_batch,
                                kv_budget_tokens=args.kv_budget, stream_interval=args.stream_interval)
            engines.append(engine)
            engine.start()
            loaded = engine.loaded
            gate.ready(create_app(engine, api_keys=keys, max_tokens_limit=args.max_tokens_limit,
                                  max_prompt_tokens=args.max_prompt_tokens, max_body_bytes=args.max_body_bytes))
            print(f"Serving {loaded.name} on http://{args.host}:{args.port}  (Ctrl-C to stop)", flush=True)
            if keys.enabled:
                print(f"API keys: {len(keys)} active (clients send 'Authorization: Bearer <key>')", flush=True)
            elif args.host not in ("127.0.0.1", "localhost", "::1"):
                print("No API key: anyone who can reach this port can use the model (--api-key-file to limit it)",
                      flush=True)
        except Exception as exc:
            gate.failed(f"{type(exc).__name__}: {exc}")
            failed.append(exc)
            print(f"error: loading failed: {exc}", file=sys.stderr, flush=True)
            server.should_exit = True

    threading.Thread(target=load, name="loader", daemon=True).start()
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on
        pass
    finally:
        for engine in engines:
            engine.stop()
        for process in processes:
            process.stop()
    print("Server stopped.", flush=True)
    return 1 if failed else 0


def _vllm_generator(args, path: str, processes: list):
    """An UpstreamGenerator for ``--upstream URL`` (a vLLM server running elsewhere) or ``--engine
    vllm`` (a vLLM server this command starts from its own venv, on a free local port)."""
    from .loading import load_tokenizer_side
    from .upstream import UpstreamGenerator
    from .vllm import VLLMServer

    loaded = load_tokenizer_side(path, family=args.family)
    process = None
    url = args.upstream
    if url is None:
        import torch

        dtype = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(args.dtype, args.dtype)
        if dtype == "auto" and not torch.cuda.is_available():
            dtype = "float32"  # vLLM's CPU attention in bf16 crashed on short first prompts here (AMX CPUs)
        process = VLLMServer(path, loaded.family, served_name=loaded.name, python=args.vllm_python,
                             max_model_len=loaded.context_length, dtype=dtype, extra=args.vllm_arg)
        print(f"Starting vLLM for {loaded.name}: {' '.join(process.command())}", flush=True)
        processes.append(process)
        process.start(timeout=args.vllm_timeout)
        url = process.url
    generator = UpstreamGenerator(loaded, url, max_queue=args.max_queue, process=process)
    if process is None:
        generator.start()
        status, reason = generator.status()
        if status != "ok":
            raise RuntimeError(f"the vLLM server at {url} is not ready ({status}): {reason}")
    return generator


def cmd_convert_qwen(args) -> int:
    from .convert import convert_qwen

    print(convert_qwen(args.src, args.dst, overwrite=args.overwrite))
    return 0


def cmd_keys(args) -> int:
    from .auth import new_keys

    for key in new_keys(args.n):
        print(key)
    return 0


def cmd_tiny(args) -> int:
    from .tiny import build_tiny

    path = build_tiny(args.family, args.dir, overwrite=args.overwrite)
    print(path)
    return 0


def cmd_demo(args) -> int:
    """Serve a stand-in in the background, call it the way the lessons do, print what happened."""
    from openai import OpenAI

    from .background import start_server
    from .client import ask

    args.model = f"tiny:{args.family}"
    args.cache_dir = None
    loaded = _load(args)
    server = start_server(loaded, host=args.host, port=args.port)
    try:
        print(f"\n$ curl -X POST {server.url} -H 'Content-Type: application/json' "
              "-d '{\"prompt\": \"你好\", \"history\": []}'")
        print(json.dumps(ask("你好", url=server.url, max_length=24), ensure_ascii=False, indent=1))
        client = OpenAI(base_url=server.url + "/v1", api_key="none")
        print("\n>>> OpenAI(base_url=...).chat.completions.create(model=..., messages=[...], stream=True)")
        stream = client.chat.completions.create(
            model=loaded.name, messages=[{"role": "user", "content": "Tell me a joke."}],
            max_tokens=24, temperature=0, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        print("\n\n(The stand-in has random weights: the words are noise, the API is real.)")
        if args.keep:
            print(f"\nStill serving on {server.url}; Ctrl-C to stop.", flush=True)
            import time

            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def model_options(p):
        p.add_argument("--host", default="0.0.0.0")
        p.add_argument("--port", type=int, default=6006)
        p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
        p.add_argument("--dtype", default="auto", help="auto (bf16 on compute capability >= 8.0, else fp16), bf16, fp16, fp32")
        p.add_argument("--family", default=None, help="chat format, if it cannot be told from the folder")
        p.add_argument("--max-queue", type=int, default=64, help="requests that may wait before 429")
        p.add_argument("--max-batch", type=int, default=16, help="requests generated together (1 = one at a time)")
        p.add_argument("--kv-budget", type=int, default=None,
                       help="KV-cache tokens the batch may hold (default: from free GPU memory; no limit on CPU)")
        p.add_argument("--stream-interval", type=float, default=0.02, metavar="SECONDS",
                       help="new text may wait this long to join the next streamed chunk (0: every token "
                            "on its own; default 0.02, below a 7B model's step on a GPU)")

    p = sub.add_parser("serve", help="serve a model on HTTP (seed API + OpenAI API)")
    p.add_argument("--model", required=True, help="registry name, ModelScope id, local folder or tiny:FAMILY")
    p.add_argument("--cache-dir", default=None, help="where models are downloaded (default: $MODEL_CACHE_DIR)")
    p.add_argument("--log-level", default="info")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="accept this API key (repeatable; see also --api-key-file and $API_KEYS)")
    p.add_argument("--api-key-file", action="append", default=[], metavar="FILE",
                   help="accept the keys in FILE, one a line (# starts a comment)")
    p.add_argument("--max-tokens-limit", type=int, default=None, metavar="N",
                   help="largest max_tokens / max_length a request may ask for (default: the context)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, metavar="N",
                   help="longest prompt, after dropping the oldest turns (default: what the context leaves)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, metavar="N",
                   help=f"largest request body (default: {DEFAULT_MAX_BODY_BYTES})")
    p.add_argument("--engine", choices=("builtin", "vllm"), default="builtin",
                   help="who generates: the built-in engine (default), or a vLLM server started from its own "
                        "venv (scripts/setup_vllm.sh; $VLLM_PYTHON)")
    p.add_argument("--upstream", default=None, metavar="URL",
                   help="generate with the vLLM OpenAI server already running at URL (another box, several GPUs)")
    p.add_argument("--vllm-python", default=None, metavar="PATH", help="python of the vLLM venv")
    p.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for vLLM (repeatable), e.g. --vllm-arg=--tensor-parallel-size=2")
    p.add_argument("--vllm-timeout", type=float, default=900, metavar="SECONDS",
                   help="how long vLLM may take to start (default 900)")
    model_options(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("convert-qwen", help="convert Qwen v1 (QWenLMHeadModel) weights to the Qwen2 architecture "
                                            "for vLLM")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert_qwen)

    p = sub.add_parser("keys", help="print new random API keys, one a line")
    p.add_argument("n", type=int, nargs="?", default=1)
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("tiny", help="build an offline stand-in model (random weights)")
    p.add_argument("family")
    p.add_argument("dir")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_tiny)

    p = sub.add_parser("demo", help="serve a stand-in, call it with the seed API and the openai client")
    p.add_argument("--keep", action="store_true", help="keep serving after the demo calls")
    model_options(p)
    p.set_defaults(family="qwen")
    p.set_defaults(func=cmd_demo)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (KeyError, RuntimeError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
