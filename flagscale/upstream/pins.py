"""Upstream pins (`third_party/upstreams.toml`): parsed once into frozen, validated dataclasses."""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from flagscale.errors import ConfigError

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_PIN_KEYS = {"name", "aliases", "git", "tag", "tag_format", "commit", "commit_hint", "submodule", "sdist"}
_SDIST_KEYS = {"name", "version", "sha256", "paths"}


@dataclass(frozen=True)
class Sdist:
    """A release sdist on the package index: the verified second source of an upstream."""

    name: str
    version: str
    sha256: str
    # (repo prefix, sdist prefix) pairs, longest repo prefix first.
    paths: tuple[tuple[str, str], ...]

    def repo_to_sdist(self, repo_path: str) -> str | None:
        """Where a repository path lives inside this sdist, or None if the sdist does not ship it."""
        for repo_prefix, sdist_prefix in self.paths:
            if repo_path.startswith(repo_prefix):
                return sdist_prefix + repo_path[len(repo_prefix) :]
        return None

    def sdist_to_repo(self, sdist_path: str) -> str | None:
        """The repository path of a file inside the sdist, or None if it has no repository counterpart."""
        for repo_prefix, sdist_prefix in sorted(self.paths, key=lambda p: -len(p[1])):
            if sdist_path.startswith(sdist_prefix):
                return repo_prefix + sdist_path[len(sdist_prefix) :]
        return None


@dataclass(frozen=True)
class Pin:
    """One backend's pinned upstream."""

    backend: str
    name: str
    git: str
    sdist: Sdist
    aliases: tuple[str, ...] = ()
    tag: str | None = None
    tag_format: str | None = None
    commit: str | None = None
    commit_hint: str | None = None
    submodule: str | None = None

    @property
    def label(self) -> str:
        """How error messages name the pin: enough to find it again."""
        ref = self.tag or (self.commit[:12] if self.commit else None)
        ref_part = f" {ref}" if ref else ""
        return f"{self.name}{ref_part} ({self.sdist.name} {self.sdist.version})"


@dataclass(frozen=True)
class Pins:
    path: Path
    by_backend: dict[str, Pin]

    def __iter__(self):
        return iter(self.by_backend.values())

    @property
    def names(self) -> list[str]:
        return list(self.by_backend)

    def resolve(self, name: str) -> Pin:
        """Find a backend by its name or one of its aliases (case-insensitive)."""
        wanted = _norm(name)
        for pin in self.by_backend.values():
            if wanted == _norm(pin.backend) or wanted == _norm(pin.name) or wanted in map(_norm, pin.aliases):
                return pin
        raise ConfigError(f"unknown backend {name!r}; valid backends: {', '.join(self.names)}{nearest(name, self.names)}")


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def nearest(word: str, choices: list[str]) -> str:
    """' (did you mean X?)' for the closest valid choice, or ''."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_pins(path: Path) -> Pins:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no upstream pins file; run from a FlagScale checkout or pass --root") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    pins = {backend: _parse_pin(path, backend, table) for backend, table in raw.items()}
    return Pins(path=path, by_backend=pins)


def _parse_pin(path: Path, backend: str, table: object) -> Pin:
    where = f"{path}: [{backend}]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    _reject_unknown(where, table, _PIN_KEYS)
    for key in ("name", "git", "sdist"):
        if key not in table:
            raise ConfigError(f"{where}: missing required field {key!r}")
    commit = table.get("commit")
    if commit is not None and not _COMMIT.match(commit):
        raise ConfigError(f"{where}.commit: {commit!r} is not a full 40-hex commit; use commit_hint for a short one")
    return Pin(
        backend=backend,
        name=_str(where, table, "name"),
        git=_str(where, table, "git"),
        sdist=_parse_sdist(f"{path}: [{backend}.sdist]", table["sdist"]),
        aliases=tuple(table.get("aliases", ())),
        tag=table.get("tag"),
        tag_format=table.get("tag_format"),
        commit=commit,
        commit_hint=table.get("commit_hint"),
        submodule=table.get("submodule"),
    )


def _parse_sdist(where: str, table: object) -> Sdist:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    _reject_unknown(where, table, _SDIST_KEYS)
    sha = _str(where, table, "sha256").lower()
    if not _SHA256.match(sha):
        raise ConfigError(f"{where}.sha256: {sha!r} is not a sha256 hex digest")
    raw_paths = table.get("paths", {"": ""})
    if not isinstance(raw_paths, dict) or not raw_paths:
        raise ConfigError(f"{where}.paths: must map repository prefixes to sdist prefixes")
    for repo_prefix, sdist_prefix in raw_paths.items():
        for prefix in (repo_prefix, sdist_prefix):
            if prefix and (not prefix.endswith("/") or prefix.startswith("/") or ".." in prefix.split("/")):
                raise ConfigError(f"{where}.paths: {prefix!r} must be '' or a relative folder ending in '/'")
    paths = tuple(sorted(raw_paths.items(), key=lambda p: -len(p[0])))
    return Sdist(name=_str(where, table, "name"), version=_str(where, table, "version"), sha256=sha, paths=paths)


def _str(where: str, table: dict, key: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}.{key}: must be a non-empty string")
    return value


def _reject_unknown(where: str, table: dict, known: set[str]) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(f"{where}: unknown field {key!r}; valid fields: {', '.join(sorted(known))}{nearest(key, sorted(known))}")
