"""The notebook's background server: start, stop (port freed), re-run, port taken."""

import socket

import pytest
import requests

from helpers.background import BackgroundServer, ServerError, port_is_free, start_server

from .conftest import free_port


def test_start_stop_frees_the_port(tiny_loaded):
    port = free_port()
    server = start_server(tiny_loaded("qwen"), host="127.0.0.1", port=port)
    assert server.running
    assert requests.get(server.url + "/health", timeout=5).json()["status"] == "ok"
    server.stop()
    assert not server.running
    assert port_is_free(port, "127.0.0.1")
    with pytest.raises(requests.ConnectionError):
        requests.get(server.url + "/health", timeout=2)


def test_rerunning_the_start_cell_replaces_the_old_server(tiny_loaded):
    port = free_port()
    first = start_server(tiny_loaded("qwen"), host="127.0.0.1", port=port)
    second = start_server(tiny_loaded("qwen"), host="127.0.0.1", port=port)  # same cell, run again
    try:
        assert not first.running and second.running
        assert requests.post(second.url, json={"prompt": "hi", "max_length": 4}, timeout=30).status_code == 200
    finally:
        second.stop()
    assert port_is_free(port, "127.0.0.1")


def test_start_stop_start_in_a_row(tiny_loaded):
    port = free_port()
    for _ in range(3):
        server = start_server(tiny_loaded("qwen"), host="127.0.0.1", port=port)
        assert requests.get(server.url + "/health", timeout=5).status_code == 200
        server.stop()


def test_port_taken_by_another_program_is_a_clear_error(tiny_loaded):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(ServerError, match=f"port {port} is already in use"):
            start_server(tiny_loaded("qwen"), host="127.0.0.1", port=port, timeout=5)


def test_wraps_any_app():
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/ping")
    def ping():
        return {"pong": True}

    with BackgroundServer(app, "127.0.0.1", free_port()) as server:
        assert requests.get(server.url + "/ping", timeout=5).json() == {"pong": True}
