"""Is the Hugging Face hub reachable? Answered once per process, so that nothing waits on it twice.

Why: offline, every hub call of transformers / huggingface_hub / datasets retries for seconds to minutes before it
gives up (a dry run of ``experiment=general`` printed 366 retry lines over 27 minutes). One decision at the first
need: the HF offline variables (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``, ``HF_DATASETS_OFFLINE``) when set,
else one HTTP request to ``HF_ENDPOINT`` (default https://huggingface.co) with a hard deadline of
``PROBE_TIMEOUT_S`` (a thread bounds DNS too, which socket timeouts do not). When the hub is out of reach the
process (and every stage it starts) switches the libraries to their offline mode, so a model or dataset that is
not in the local HF cache fails at once instead of retrying.
"""

from __future__ import annotations

import os
import sys
import threading
import urllib.error
import urllib.request
from typing import Any

PROBE_TIMEOUT_S = 2.0
DEFAULT_ENDPOINT = "https://huggingface.co"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUE = {"1", "ON", "YES", "TRUE"}

#: None until asked; then the reason the hub is out of reach ("" when it answered)
_reason: str | None = None
_lock = threading.Lock()


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _variable_reason() -> str | None:
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().upper() in _TRUE:
            return f"{name}={os.environ[name]}"
    return None


def _probe(url: str, timeout: float) -> str:
    """"" when ``url`` answers anything HTTP within ``timeout`` seconds (an error status still means a live
    hub), else why not."""
    result: list[str] = []

    def attempt() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
                result.append("")
        except urllib.error.HTTPError:
            result.append("")
        except Exception as exc:  # noqa: BLE001 - DNS, refused, timeout, TLS: all mean "not reachable"
            result.append(f"{type(exc).__name__}: {getattr(exc, 'reason', None) or exc}")

    worker = threading.Thread(target=attempt, name="hub-probe", daemon=True)
    worker.start()
    worker.join(timeout)
    return result[0] if result else f"no answer within {timeout:g} s"


def go_offline() -> None:
    """Offline mode for this process and its children, including libraries imported already (they copy the
    variables into module constants at import)."""
    for name in OFFLINE_VARIABLES:
        os.environ[name] = "1"
    hub: Any = sys.modules.get("huggingface_hub.constants")
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    datasets_config: Any = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True
        datasets_config.HF_DATASETS_OFFLINE = True


def offline_reason() -> str | None:
    """Why the hub is out of reach (and offline mode is now on), or None when it answered. Probes at most once
    per process."""
    global _reason
    with _lock:
        if _reason is None:
            variable = _variable_reason()
            if variable is not None:
                _reason = f"{variable} is set"
            else:
                why = _probe(endpoint(), PROBE_TIMEOUT_S)
                _reason = f"{endpoint()} is unreachable ({why})" if why else ""
            if _reason:
                go_offline()
        return _reason or None


def hub_offline() -> bool:
    return offline_reason() is not None


def known_offline_reason() -> str | None:
    """The answer if the hub was asked about already, without asking (for messages)."""
    return _reason or None


def reset() -> None:
    """Forget the answer (tests)."""
    global _reason
    with _lock:
        _reason = None
