"""Run the server in a background thread of a notebook kernel.

``uvicorn.run()`` in a cell fails (the kernel already runs an event loop), so uvicorn gets its own
thread and loop. Starting checks the port first and waits with a deadline; stopping ends the
running requests with an error (503), waits for the thread and checks that the port is free again;
starting on a port that this kernel already serves stops the old server first, so re-running the
cell works. ``server.stop(unload=True)`` also stops the engine and frees the model's memory.
"""

from __future__ import annotations

import socket
import threading
import time

_servers: dict[int, "BackgroundServer"] = {}
_registry_lock = threading.Lock()


class ServerError(RuntimeError):
    pass


def port_is_free(port: int, host: str = "0.0.0.0") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def uvicorn_server(app, host: str, port: int, *, log_level: str = "warning", access_log: bool = False,
                   timeout_graceful_shutdown: int = 5):
    """A ``uvicorn.Server`` for ``app`` that, when it shuts down, first tells the app to end its
    running requests with an error (``app.state.drain()``), so that every client gets an answer and
    nothing waits for the graceful-shutdown timeout. Used in the notebook and the terminal alike."""
    import uvicorn

    class _Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            drain = getattr(getattr(app, "state", None), "drain", None)
            if callable(drain):
                drain()
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=timeout_graceful_shutdown)
    return _Server(config)


def _local_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


class BackgroundServer:
    """A uvicorn server for ``app`` in a daemon thread. ``engine`` (optional) is stopped with it."""

    def __init__(self, app, host: str = "0.0.0.0", port: int = 6006, *, engine=None,
                 log_level: str = "warning"):
        self.app, self.host, self.port, self.engine = app, host, int(port), engine
        self.log_level = log_level
        self._server = None
        self._thread: threading.Thread | None = None
        self.stop_seconds: float | None = None  # how long the last stop() took

    @property
    def url(self) -> str:
        """The address to call from this machine (0.0.0.0 listens everywhere; call 127.0.0.1)."""
        return f"http://{_local_host(self.host)}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and bool(self._server and self._server.started)

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        with _registry_lock:
            old = _servers.get(self.port)
        if old is not None and old is not self:
            print(f"Stopping the server already running on port {self.port} in this kernel ...", flush=True)
            old.stop()
        if not port_is_free(self.port, self.host):
            raise ServerError(
                f"port {self.port} is already in use by another program: stop it (another notebook's kernel, "
                f"or `python api.py` in a terminal; find it with `lsof -i :{self.port}`) or choose another port")
        self._server = uvicorn_server(self.app, self.host, self.port, log_level=self.log_level)
        errors: list[BaseException] = []

        def run():
            try:
                self._server.run()
            except BaseException as exc:  # uvicorn calls sys.exit(1) when it cannot bind
                errors.append(exc)

        self._thread = threading.Thread(target=run, name=f"uvicorn-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise ServerError(f"the server on port {self.port} stopped while starting "
                                  f"({errors[0]!r} )" if errors else f"the server on port {self.port} "
                                  "stopped while starting: is the port taken?")
            if time.monotonic() > deadline:
                self._server.should_exit = True
                raise ServerError(f"the server did not start within {timeout:.0f} s")
            time.sleep(0.02)
        with _registry_lock:
            _servers[self.port] = self
        return self

    def stop(self, timeout: float = 15.0, *, stop_engine: bool = True, unload: bool = False) -> None:
        """Stop serving: running requests end with an error (503), the thread is joined, and the port
        is checked to be free. The engine made by ``start_server`` is stopped too (``stop_engine``).

        ``unload=True`` also stops the engine the app serves (even one you passed in) and frees the
        model's memory (``loaded.unload()``): load the model again to serve it again."""
        started = time.monotonic()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(5)
        engine = self.engine
        if unload and engine is None:
            engine = getattr(getattr(self.app, "state", None), "engine", None)
        if engine is not None and (stop_engine or unload):
            engine.stop()
        if unload and engine is not None:
            engine.loaded.unload()
        with _registry_lock:
            if _servers.get(self.port) is self:
                del _servers[self.port]
        deadline = time.monotonic() + 5
        while not port_is_free(self.port, self.host):
            if time.monotonic() > deadline:
                raise ServerError(f"port {self.port} is still in use after stopping")
            time.sleep(0.05)
        self.stop_seconds = time.monotonic() - started

    def __enter__(self):
        return self if self.running else self.start()

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self) -> str:
        return f"<BackgroundServer {self.url} {'running' if self.running else 'stopped'}>"


def start_server(model, host: str = "0.0.0.0", port: int = 6006, *, timeout: float = 30.0,
                 max_queue: int = 64, max_batch: int = 16, log_level: str = "warning", api_keys=None,
                 max_tokens_limit: int | None = None, max_prompt_tokens: int | None = None,
                 max_body_bytes: int | None = None, stream_interval: float = 0.02) -> BackgroundServer:
    """Serve a loaded model (``helpers.load_model(...)``), a running ``Engine``, or a ready FastAPI
    app in the background.

    ``api_keys`` (a key or a list, one per student group) makes every route but ``/health`` need
    ``Authorization: Bearer <key>``; ``max_tokens_limit``, ``max_prompt_tokens`` and
    ``max_body_bytes`` limit what a request may ask for (see ``helpers.server.create_app``).
    ``stream_interval``: seconds new text may wait to join the next streamed chunk (see ``Engine``).

    Returns the running ``BackgroundServer``; ``server.url`` is where to call it from this machine,
    ``server.stop()`` shuts it down (and the engine too when it was made here);
    ``server.stop(unload=True)`` also frees the model's memory."""
    from .auth import APIKeys
    from .engine import Engine, Generator
    from .limits import DEFAULT_MAX_BODY_BYTES
    from .server import create_app

    keys = APIKeys(api_keys)
    options = dict(api_keys=keys, max_tokens_limit=max_tokens_limit, max_prompt_tokens=max_prompt_tokens,
                   max_body_bytes=max_body_bytes or DEFAULT_MAX_BODY_BYTES)
    loaded = model if hasattr(model, "chat_format") else getattr(model, "loaded", None)
    if (hasattr(model, "chat_format") or isinstance(model, Engine)) and loaded.model is None:
        raise ServerError("this model was unloaded (loaded.unload() or server.stop(unload=True)): "
                          "load it again with load_model(...) first")
    owned = None
    app = model
    if hasattr(model, "chat_format"):  # a LoadedModel: the server gets its own engine
        owned = Engine(model, max_queue=max_queue, max_batch=max_batch, stream_interval=stream_interval).start()
        app = create_app(owned, **options)
    elif isinstance(model, Generator):  # an Engine, or a vLLM server behind an UpstreamGenerator
        app = create_app(model.start(), **options)
    elif keys.enabled or max_tokens_limit or max_prompt_tokens or max_body_bytes:
        raise ValueError("api_keys and limits apply to a model or an Engine; for a ready app, pass them "
                         "to create_app(...)")
    server = BackgroundServer(app, host, port, engine=owned, log_level=log_level)
    try:
        server.start(timeout)
    except BaseException:
        if owned is not None:
            owned.stop()
        raise
    name = getattr(model, "name", None) or getattr(getattr(model, "loaded", None), "name", "the app")
    print(f"Serving {name} on http://{host}:{port} (from this machine: {server.url})", flush=True)
    if keys.enabled:
        print(f"API keys: {len(keys)} active (clients send 'Authorization: Bearer <key>')", flush=True)
    return server


def stop_all() -> None:
    """Stop every server this kernel started."""
    with _registry_lock:
        servers = list(_servers.values())
    for server in servers:
        server.stop()
