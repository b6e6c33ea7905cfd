"""One exception hierarchy, and one way to report it. Every message says what went wrong *and* what to do.

Every face (the `flagscale` CLI, `tools/patch.py`, the PEP 517 hooks, `run.py`, the node agent) reports a
`FlagScaleError` the same way: one `error: <message>` line on stderr, no traceback, a non-zero exit.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

# Exit statuses: a failed check (a cell that does not apply, a doctor finding, a rebase conflict) is 1,
# a usage or configuration error is 2, as for argparse and typer.
EXIT_FAILED = 1
EXIT_ERROR = 2


class FlagScaleError(Exception):
    """Base of every error FlagScale reports to a user (printed as one line, without a traceback)."""

    exit_code = EXIT_ERROR


class ConfigError(FlagScaleError):
    """A configuration file or setting is invalid (upstreams.toml, device.toml, a YAML config, a CLI option)."""


class SettingsError(ConfigError):
    """A PEP 517 config setting (`-C key=value`) or its environment variable is not one FlagScale can use."""


class FetchError(FlagScaleError):
    """An upstream source could not be materialized (download, checksum, submodule, local path)."""


class PatchError(FlagScaleError):
    """A patch file is malformed or hostile; refused before anything was written."""


class ApplyError(PatchError):
    """A well-formed patch does not apply to the pinned upstream (no fuzz is allowed)."""


class SeriesError(FlagScaleError):
    """A series file disagrees with its folder or names a missing patch."""


class GitError(FlagScaleError):
    """A git command run on the user's behalf failed."""


class RebaseConflict(FlagScaleError):
    """Rebasing a series onto a new pin hit conflicts; nothing was written."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, report: list | None = None) -> None:
        super().__init__(message)
        self.report = report or []


class BuildError(FlagScaleError):
    """A wheel could not be built or installed: the upstream's own build, pip, or a malformed wheel."""


class LaunchError(FlagScaleError):
    """A train/infer/serve job could not be launched, stopped or queried."""


class ConversionError(FlagScaleError):
    """A checkpoint import or export (`flagscale checkpoint`) failed while converting; nothing was written."""


def error_line(exc: BaseException) -> str:
    """How every face prints an error: `error: ` and the message (a message may add lines, e.g. a log tail)."""
    return f"error: {exc}"


@contextmanager
def reported(stream: TextIO | None = None) -> Iterator[None]:
    """Turn a FlagScaleError into its one `error:` line and `SystemExit(exit_code)`: for the faces that are
    not the typer CLI (PEP 517 hooks, run.py, the node agent, tools)."""
    try:
        yield
    except FlagScaleError as exc:
        print(error_line(exc), file=stream or sys.stderr, flush=True)
        raise SystemExit(exc.exit_code) from None
