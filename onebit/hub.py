"""Is the Hugging Face Hub reachable? Answered in at most a few seconds, once per process.

Offline, ``from_pretrained``/``load_dataset`` retry for a long time before failing with a message
about connection errors. We ask first (a TCP connect to the Hub's host with a short timeout), and
when the answer is no we set the libraries' offline flags so that nothing waits on the network
afterwards.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

_TRUE = {"1", "true", "yes", "on"}


def _offline_flag_set() -> bool:
    return any(
        os.environ.get(k, "").lower() in _TRUE
        for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hub (``HF_ENDPOINT`` or huggingface.co) accepts a TCP connection.

    False at once when an offline flag is set. When False, the offline flags are set for this
    process.
    """
    if _offline_flag_set():
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host or "huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            os.environ[key] = "1"
        return False
