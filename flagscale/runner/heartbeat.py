"""Heartbeats: one small JSON file per rank, `<exp_dir>/run/heartbeats/node<N>-rank<R>.json`.

The training driver writes its rank's file (atomically: a temporary file, then `os.replace`) when it starts
and after iterations, at most once per `heartbeat_interval` seconds; the job monitor reads them all to see
progress, find a hung rank and fill the status record. A heartbeat holds what the monitor needs and no more:
rank, node, host, pid, iteration, phase, wall time, and on the rank that logs it the last loss and tokens/s.
Nothing here imports anything heavy: the driver calls it once per iteration.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

FOLDER = Path("run") / "heartbeats"


def folder(exp_dir: Path | str) -> Path:
    return Path(exp_dir) / FOLDER


class Heartbeat:
    """The writer for one rank."""

    def __init__(self, exp_dir: Path | str, rank: int, node: int, interval: float = 1.0) -> None:
        self.path = folder(exp_dir) / f"node{node}-rank{rank}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.interval = interval
        self.base = {"rank": rank, "node": node, "host": socket.gethostname(), "pid": os.getpid()}
        self.last_write = float("-inf")
        self.extra: dict = {}

    def beat(self, iteration: int, phase: str = "train", force: bool = False, **extra) -> None:
        """Record progress; skipped when the last write is younger than `interval` unless `force`."""
        self.extra.update(extra)  # the last loss stays in the record between logged iterations
        now = time.time()
        if not force and now - self.last_write < self.interval:
            return
        data = {**self.base, **self.extra, "iteration": iteration, "phase": phase, "time": now}
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)
        self.last_write = now


def read_all(exp_dir: Path | str) -> list[dict]:
    """Every rank's last heartbeat, by rank (a file being replaced right now is skipped this time)."""
    found = []
    for path in sorted(folder(exp_dir).glob("node*-rank*.json")):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(found, key=lambda h: h.get("rank", 0))


def clear(exp_dir: Path | str) -> None:
    """Before a (re)start: an old attempt's heartbeats must not count as progress of the new one."""
    for path in folder(exp_dir).glob("*.json"):
        path.unlink(missing_ok=True)
