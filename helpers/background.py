"""Run the server in a background thread of a notebook kernel.

``uvicorn.run()`` in a cell fails (the kernel already runs an event loop), so uvicorn gets its own
thread and loop. Starting checks the port first and waits with a deadline; stopping waits for the
thread and checks that the port is free again; starting on a port that this kernel already serves
stops the old server first, so re-running the cell works.
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

    @property
    def url(self) -> str:
        """The address to call from this machine (0.0.0.0 listens everywhere; call 127.0.0.1)."""
        return f"http://{_local_host(self.host)}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and bool(self._server and self._server.started)

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        import uvicorn

        with _registry_lock:
            old = _servers.get(self.port)
        if old is not None and old is not self:
            print(f"Stopping the server already running on port {self.port} in this kernel ...", flush=True)
            old.stop()
        if not port_is_free(self.port, self.host):
            raise ServerError(
                f"port {self.port} is already in use by another program: stop it (another notebook's kernel, "
                f"or `python api.py` in a terminal; find it with `lsof -i :{self.port}`) or choose another port")
        config = uvicorn.Config(self.app, host=self.host, port=self.port, log_level=self.log_level,
                                access_log=False, timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
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

    def stop(self, timeout: float = 15.0, *, stop_engine: bool = True) -> None:
        """Stop serving, wait for the thread, and check that the port is free."""
        if self._server is not None:
            self._server.should_exit = True
        if self.engine is not None and stop_engine:
            self.engine.stop()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(5)
        with _registry_lock:
            if _servers.get(self.port) is self:
                del _servers[self.port]
        deadline = time.monotonic() + 5
        while not port_is_free(self.port, self.host):
            if time.monotonic() > deadline:
                raise ServerError(f"port {self.port} is still in use after stopping")
            time.sleep(0.05)

    def __enter__(self):
        return self if self.running else self.start()

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self) -> str:
        return f"<BackgroundServer {self.url} {'running' if self.running else 'stopped'}>"


def start_server(model, host: str = "0.0.0.0", port: int = 6006, *, timeout: float = 30.0,
                 max_queue: int = 64, max_batch: int = 16, log_level: str = "warning") -> BackgroundServer:
    """Serve a loaded model (``helpers.load_model(...)``), a running ``Engine``, or a ready FastAPI
    app in the background.

    Returns the running ``BackgroundServer``; ``server.url`` is where to call it from this machine,
    ``server.stop()`` shuts it down (and the engine too when it was made here)."""
    from .engine import Engine
    from .server import create_app

    owned = None
    app = model
    if hasattr(model, "chat_format"):  # a LoadedModel: the server gets its own engine
        owned = Engine(model, max_queue=max_queue, max_batch=max_batch).start()
        app = create_app(owned)
    elif isinstance(model, Engine):
        app = create_app(model.start())
    server = BackgroundServer(app, host, port, engine=owned, log_level=log_level)
    try:
        server.start(timeout)
    except BaseException:
        if owned is not None:
            owned.stop()
        raise
    name = getattr(model, "name", None) or getattr(getattr(model, "loaded", None), "name", "the app")
    print(f"Serving {name} on http://{host}:{port} (from this machine: {server.url})", flush=True)
    return server


def stop_all() -> None:
    """Stop every server this kernel started."""
    with _registry_lock:
        servers = list(_servers.values())
    for server in servers:
        server.stop()
