"""One exception hierarchy. Every message says what went wrong *and* what to do about it."""

from __future__ import annotations


class FlagScaleError(Exception):
    """Base of every error FlagScale reports to a user (the CLI prints it without a traceback)."""


class ConfigError(FlagScaleError):
    """A configuration file or setting is invalid (upstreams.toml, device.toml, a CLI option)."""


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

    def __init__(self, message: str, report: list | None = None) -> None:
        super().__init__(message)
        self.report = report or []


class LaunchError(FlagScaleError):
    """A train/infer/serve job could not be launched, stopped or queried."""
