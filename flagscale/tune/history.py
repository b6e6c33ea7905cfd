"""A tuner's record of every candidate: `history.json` (the resume point) and `history.csv` (for people).

Both are rewritten whole, atomically (a temporary file renamed over the old one), after every change, so a
tuner killed at any moment leaves a readable history: a restart takes the finished trials from it and reruns
only the one that was running.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

# A trial's end states: taken as they are on a restart.
FINISHED = ("ok", "oom", "failed", "timeout")
# Never launched: decided from the space, the memory model, other trials' results or the limits.
NOT_RUN = ("invalid", "pruned", "dominated", "skipped")
RUNNING = "running"
TRAIN_COLUMNS = ("key", "status", "metric", "predicted_gib", "peak_memory_gib", "seconds", "launches", "reason")


class History:
    """Records by candidate key, in the order they were first seen; `save` writes both files."""

    def __init__(self, folder: Path, meta: dict[str, Any], columns: tuple[str, ...] = TRAIN_COLUMNS) -> None:
        self.folder = folder
        self.meta = meta
        self.columns = columns  # of history.csv, before the candidate's settings
        self.records: dict[str, dict[str, Any]] = {}

    @property
    def json_path(self) -> Path:
        return self.folder / "history.json"

    @property
    def csv_path(self) -> Path:
        return self.folder / "history.csv"

    def load(self) -> dict[str, dict[str, Any]]:
        """The records of an earlier run of this tuner (same folder), or none."""
        try:
            data = json.loads(self.json_path.read_text())
        except (OSError, ValueError):
            return {}
        return {r["key"]: r for r in data.get("candidates", []) if isinstance(r, dict) and "key" in r}

    def set(self, key: str, /, **fields: Any) -> dict[str, Any]:
        record = self.records.setdefault(key, {"key": key})
        record.update(fields)
        return record

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        rows = list(self.records.values())
        _write(self.json_path, json.dumps({**self.meta, "candidates": rows}, indent=2, sort_keys=True) + "\n")
        _write(self.csv_path, to_csv(rows, self.columns))


def to_csv(rows: list[dict[str, Any]], columns: tuple[str, ...] = TRAIN_COLUMNS) -> str:
    setting_keys: list[str] = []
    for row in rows:
        setting_keys += [k for k in row.get("settings", {}) if k not in setting_keys]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([*columns, *setting_keys])
    for row in rows:
        settings = row.get("settings", {})
        writer.writerow([_cell(row.get(c)) for c in columns] + [_cell(settings.get(k)) for k in setting_keys])
    return out.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
