"""Polling with a deadline: the one loop behind "wait until the server answers / the node joined / the
processes are gone".

The caller keeps its own words: `condition` raises the caller's error when waiting is pointless (the
process died), and `timeout_error` builds the error for a deadline that passed (built only then, so it
can quote the log as it is at that moment). Without `timeout_error` a passed deadline returns False.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T],
    timeout: float | None,
    interval: float,
    timeout_error: Callable[[], BaseException] | None = None,
) -> T | bool:
    """Call `condition` every `interval` seconds until it returns something true, and return that.

    `condition` runs at least once, and once more for each `interval` before `timeout` seconds have
    passed (None: no deadline). When the deadline passes: raise `timeout_error()`, or return False.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if deadline is not None and time.monotonic() >= deadline:
            if timeout_error is not None:
                raise timeout_error()
            return False
        time.sleep(interval)
