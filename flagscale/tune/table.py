"""The tuners' live table: trial i of N and the best so far, redrawn in place on a terminal (rich), one line per
trial otherwise (logs, CI, a tuner run under nohup)."""

from __future__ import annotations

import sys
from typing import Any


class LiveTable:
    def __init__(self, title: str, columns: list[str], out=None) -> None:
        from rich.console import Console

        self.title, self.columns = title, columns
        self.console = Console(file=out or sys.stdout, width=200)
        self.live: Any = None
        self.rows: list[list[str]] = []

    def __enter__(self) -> LiveTable:
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(self._table("starting"), console=self.console, auto_refresh=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def _table(self, caption: str):
        from rich.table import Table

        table = Table(title=self.title, caption=caption)
        for column in self.columns:
            table.add_column(column)
        for row in self.rows:
            table.add_row(*row)
        return table

    def update(self, row: list[str], caption: str, line: str) -> None:
        """Add a row; `line` is what a non-terminal gets instead of the redrawn table."""
        self.rows.append(row)
        if self.live is not None:
            self.live.update(self._table(caption), refresh=True)
        else:
            self.console.print(line, highlight=False, soft_wrap=True)
