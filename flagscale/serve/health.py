"""Readiness: a server counts as up once its health URL answers 200, never merely because it was started."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from flagscale.errors import LaunchError
from flagscale.runner.wait import wait_until


def probe(url: str, timeout: float = 2.0) -> int | None:
    """The HTTP status of GET url, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code  # llama-server answers 503 while it loads the model
    except (OSError, ValueError):
        return None


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def log_tail(log: str | Path | None, lines: int = 8) -> str:
    if not log:
        return ""
    try:
        text = Path(log).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def wait_ready(
    url: str, timeout: float, alive: Callable[[], bool], what: str, log: str | Path | None = None, interval: float = 0.2
) -> float:
    """Poll `url` until it answers 200; LaunchError when the process dies or `timeout` passes. Returns seconds."""

    def ready() -> bool:
        if probe(url) == 200:
            return True
        if not alive():
            tail = log_tail(log)
            raise LaunchError(
                f"{what} exited before it was ready" + (f"; last lines of {log}:\n{tail}" if tail else "")
            )
        return False

    def too_slow() -> LaunchError:
        return LaunchError(
            f"{what} did not answer {url} within {timeout:.0f} s (see {log or 'its log'}); "
            "raise experiment.runner.ready_timeout for big models"
        )

    start = time.monotonic()
    wait_until(ready, timeout, interval, too_slow)
    return time.monotonic() - start
