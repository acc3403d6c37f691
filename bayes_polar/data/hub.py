"""Reach the Hugging Face hub only when it is reachable, and fail fast and clearly when not.

``transformers`` and ``datasets`` retry an unreachable hub for tens of seconds and then raise
a stack trace about HEAD requests. We check the cache first, then probe the endpoint once
(DNS + TCP, a few seconds), and raise :class:`~bayes_polar.errors.OfflineError` naming the
fix (a local path or an embedded name) when the hub is out of reach.
"""
from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

from ..errors import OfflineError


@functools.lru_cache(maxsize=None)
def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face endpoint accepts a TCP connection and offline mode is off."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_hub(what: str, name: str, hint: str) -> None:
    """Raise :class:`OfflineError` unless the hub can be reached."""
    if not hub_reachable():
        raise OfflineError(
            f"{what} {name!r} is not available offline: it is not a local path, not in the "
            f"Hugging Face cache, and the hub cannot be reached. {hint}"
        )
