"""API keys: who may use the server.

Off by default (a server on 127.0.0.1 in your own notebook needs none). For a workshop, where port
6006 is reachable from the internet, give the server one key per student group::

    keys = new_keys(5)                      # hand one to each group
    server = start_server(loaded, api_keys=keys)

    python -m helpers serve --model qwen-7b-chat --api-key-file keys.txt   # or API_KEYS=k1,k2

Clients send ``Authorization: Bearer <key>`` (the ``openai`` client does so with ``api_key=...``).
Only SHA-256 digests of the keys are kept, every digest is compared in constant time, and no key is
ever printed or logged: the server says how many keys are active, never which.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Iterable


class InvalidAPIKey(ValueError):
    """A key that cannot be used (empty, or with spaces)."""


def new_key() -> str:
    """A fresh random key (``sk-`` and 32 random bytes, URL-safe)."""
    return "sk-" + secrets.token_urlsafe(32)


def new_keys(n: int) -> list[str]:
    return [new_key() for _ in range(n)]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class APIKeys:
    """A set of accepted keys. ``APIKeys(None)`` or ``APIKeys([])`` accepts every request."""

    def __init__(self, keys: str | Iterable[str] | None = None):
        if isinstance(keys, str):
            keys = [keys]
        digests = []
        for key in keys or ():
            if not isinstance(key, str) or not key.strip():
                raise InvalidAPIKey("an API key must be a non-empty string")
            key = key.strip()
            if any(ch.isspace() for ch in key):
                raise InvalidAPIKey("an API key must not contain spaces")
            d = _digest(key)
            if d not in digests:
                digests.append(d)
        self._digests = tuple(digests)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:  # never the keys themselves
        return f"<APIKeys: {len(self)} active>" if self.enabled else "<APIKeys: off>"

    def check(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header value carries one of the keys."""
        if not self.enabled:
            return True
        token = bearer_token(authorization)
        if token is None:
            return False
        given = _digest(token)
        ok = False
        for d in self._digests:  # no early exit: the time does not depend on which key matched
            ok |= hmac.compare_digest(given, d)
        return ok


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def keys_from(keys: Iterable[str] | None = None, files: Iterable[str | os.PathLike] | None = None,
              env: str | None = "API_KEYS") -> list[str]:
    """Keys from arguments, files (one key per line; ``#`` starts a comment) and the environment
    variable ``env`` (comma-separated)."""
    out = [k for k in (keys or []) if k and k.strip()]
    for f in files or []:
        for line in Path(f).read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                out.append(line)
    if env and os.environ.get(env):
        out += [k.strip() for k in os.environ[env].split(",") if k.strip()]
    return out
