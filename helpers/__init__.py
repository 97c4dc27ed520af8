"""Deploy open chat LLMs behind an HTTP API from JupyterLab.

The flow, one module each::

    registry (ModelSpec) -> download -> loading -> formats -> engine -> server -> background / __main__ -> client

Heavy imports (torch, transformers, fastapi) happen inside the functions, so ``import helpers`` is quick.
"""

from __future__ import annotations

from .download import download  # the function (light: modelscope is imported when it runs)
from .formats import ChatFormatError, get_chat_format, history_to_messages, messages_to_history
from .registry import FAMILIES, MODELS, ModelSpec, get_spec

__version__ = "0.1.0"

__all__ = [
    "FAMILIES", "MODELS", "ModelSpec", "get_spec", "get_chat_format", "ChatFormatError",
    "history_to_messages", "messages_to_history", "download", "load_model", "Engine", "SamplingParams",
    "create_app", "start_server", "BackgroundServer", "build_tiny", "get_completion", "stream_chat",
]


def __getattr__(name):  # lazy access to the heavier parts
    if name in ("load_model", "LoadedModel"):
        from . import loading
        return getattr(loading, name)
    if name in ("Engine", "SamplingParams"):
        from . import engine
        return getattr(engine, name)
    if name == "create_app":
        from .server import create_app
        return create_app
    if name in ("start_server", "BackgroundServer", "stop_all"):
        from . import background
        return getattr(background, name)
    if name in ("build_tiny",):
        from .tiny import build_tiny
        return build_tiny
    if name in ("get_completion", "stream_chat", "ask", "wait_until_ready"):
        from . import client
        return getattr(client, name)
    raise AttributeError(f"module 'helpers' has no attribute {name!r}")
