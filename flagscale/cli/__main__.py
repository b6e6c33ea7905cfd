"""`python -m flagscale.cli`: the full command line (no fast path)."""

from flagscale.cli import run

run()
