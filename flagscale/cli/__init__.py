"""`flagscale` command line: a thin face over the core, one module per area.

app.py       the typer apps, shared options, error reporting and progress
upstream.py  upstream status | fetch
patch.py     patch checkout | export | rebase | check | lint | apply  (= tools/patch.py)
wheels.py    install | build | doctor
hardware.py  devices | ci matrix
tasks.py     train | serve | infer | compress
render.py    the tables they print
"""

from __future__ import annotations

from flagscale.cli import checkpoint, hardware, patch, tasks, upstream, wheels  # noqa: F401  (each registers its commands)
from flagscale.cli.app import app, patch_app, setup_logging

__all__ = ["app", "patch_app", "run", "setup_logging"]


def run() -> None:
    app()
