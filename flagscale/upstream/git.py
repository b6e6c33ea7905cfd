"""The few git plumbing calls the patch tool needs, with errors that say which command failed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from flagscale.errors import GitError

# Identity and dates for commits FlagScale makes itself, so their hashes are reproducible.
BOT_IDENTITY = {
    "GIT_AUTHOR_NAME": "FlagScale",
    "GIT_AUTHOR_EMAIL": "flagscale@localhost",
    "GIT_COMMITTER_NAME": "FlagScale",
    "GIT_COMMITTER_EMAIL": "flagscale@localhost",
    "GIT_AUTHOR_DATE": "@0 +0000",
    "GIT_COMMITTER_DATE": "@0 +0000",
}

# Byte-stable patch output: no commit hashes, full blob ids, no diffstat, no tool version.
FORMAT_PATCH_ARGS = (
    "format-patch",
    "--stdout",
    "--zero-commit",
    "--full-index",
    "--no-stat",
    "--no-signature",
    "--no-renames",
    "-N",
    "--no-binary",
    "--encode-email-headers",
)


def git(
    repo: Path, *args: str, env: dict[str, str] | None = None, input: bytes | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0", **(env or {})}
    result = subprocess.run(
        [
            "git",
            "-C",
            str(repo),
            "-c",
            "core.autocrlf=false",
            "-c",
            "diff.noprefix=false",
            "-c",
            "diff.mnemonicPrefix=false",
            "-c",
            "core.quotePath=true",
            *args,
        ],
        env=full_env,
        input=input,
        capture_output=True,
    )
    if check and result.returncode != 0:
        message = result.stderr.decode("utf-8", "replace").strip().splitlines()
        raise GitError(f"`git {' '.join(args[:3])}` failed in {repo}: {message[-1] if message else 'no output'}")
    return result


def out(repo: Path, *args: str, **kwargs) -> str:
    return git(repo, *args, **kwargs).stdout.decode("utf-8", "replace")


def init_repo(path: Path) -> None:
    git(path, "init", "-q", "-b", "main")
    for key, value in (("core.autocrlf", "false"), ("commit.gpgsign", "false")):
        git(path, "config", key, value)


def commit_all(repo: Path, message: str, env: dict[str, str] | None = None) -> str:
    git(repo, "add", "-A", "--force")
    git(repo, "commit", "-q", "--allow-empty", "--no-verify", "-F", "-", env=env, input=message.encode())
    return out(repo, "rev-parse", "HEAD").strip()


def format_patch(repo: Path, commit: str) -> bytes:
    return git(repo, *FORMAT_PATCH_ARGS, "-1", commit).stdout
