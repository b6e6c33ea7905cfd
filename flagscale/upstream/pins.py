"""Upstream pins (`third_party/upstreams.toml`): parsed once into frozen, validated dataclasses."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from flagscale.errors import ConfigError
from flagscale.settings import convert, nearest, nonempty, setting

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
UNKNOWN_FIELD = "{where}: unknown field {key!r}; valid fields: {valid}{hint}"


# ---------------------------------------------------------------------------- checks of one field
# `convert` reports a check's ValueError with the file and the field: `<file>: [<backend>].<field>=<value>: ...`.
def _sha256(value: str) -> str:
    if not _SHA256.match(value.lower()):
        raise ValueError("is not a sha256 hex digest")
    return value.lower()


def _commit(value: str) -> str:
    if not _COMMIT.match(value):
        raise ValueError("is not a full 40-hex commit; use commit_hint for a short one")
    return value


def _paths(pairs: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """(repo prefix, sdist prefix) pairs: relative folders (or ''), longest repo prefix first."""
    if not pairs:
        raise ValueError("must map repository prefixes to sdist prefixes")
    for prefix in (p for pair in pairs for p in pair):
        if prefix and (not prefix.endswith("/") or prefix.startswith("/") or ".." in prefix.split("/")):
            raise ValueError(f"{prefix!r} must be '' or a relative folder ending in '/'")
    return tuple(sorted(pairs, key=lambda p: -len(p[0])))


@dataclass(frozen=True)
class Sdist:
    """A release sdist on the package index: the verified second source of an upstream."""

    name: str = setting(check=nonempty)
    version: str = setting(check=nonempty)
    sha256: str = setting(check=_sha256)
    # (repo prefix, sdist prefix) pairs, longest repo prefix first; by default the sdist is the repository.
    paths: tuple[tuple[str, str], ...] = setting((("", ""),), check=_paths)

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

    backend: str  # the table's name in upstreams.toml
    name: str = setting(check=nonempty)
    git: str = setting(check=nonempty)
    sdist: Sdist = setting()  # required, a table of its own
    aliases: tuple[str, ...] = ()
    tag: str | None = None
    tag_format: str | None = None
    commit: str | None = setting(None, check=_commit)
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
        raise ConfigError(
            f"unknown backend {name!r}; valid backends: {', '.join(self.names)}{nearest(name, self.names)}"
        )


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "-")


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
    if isinstance(table.get("sdist"), dict):  # a table of its own: its errors name it [backend.sdist]
        sdist = convert(Sdist, table["sdist"], f"{path}: [{backend}.sdist]", unknown=UNKNOWN_FIELD)
        table = {**table, "sdist": sdist}
    return convert(Pin, table, where, unknown=UNKNOWN_FIELD, given={"backend": backend})
