"""Find and download release sdists from the package index pip is configured to use."""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from flagscale.errors import FetchError

DEFAULT_INDEX = "https://pypi.org/simple"


@dataclass(frozen=True)
class Release:
    name: str
    version: str
    url: str
    filename: str
    sha256: str
    size: int | None


def configured_index_url() -> str:
    """The index pip would use: $PIP_INDEX_URL, else pip's config files (last one wins), else PyPI."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"]
    files = [
        Path("/etc/xdg/pip/pip.conf"),
        Path("/etc/pip.conf"),
        Path.home() / ".pip" / "pip.conf",
        Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "pip" / "pip.conf",
    ]
    if sys.prefix != sys.base_prefix:
        files.append(Path(sys.prefix) / "pip.conf")
    if os.environ.get("PIP_CONFIG_FILE"):
        files.append(Path(os.environ["PIP_CONFIG_FILE"]))
    url = DEFAULT_INDEX
    for file in files:
        parser = configparser.ConfigParser()
        try:
            parser.read(file)
        except configparser.Error:
            continue
        for section in ("global", "download", "install"):
            if parser.has_option(section, "index-url"):
                url = parser.get(section, "index-url")
    return url


def json_api_url(index_url: str, project: str) -> str:
    """PyPI-style JSON API address for `project` next to a `/simple` index."""
    base = index_url.rstrip("/")
    if base.endswith("/simple"):
        base = base[: -len("/simple")]
    return f"{base}/pypi/{project}/json"


def find_sdist(project: str, version: str, index_url: str | None = None) -> Release:
    index_url = index_url or configured_index_url()
    api = json_api_url(index_url, project)
    try:
        with urllib.request.urlopen(api, timeout=60) as response:
            document = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise FetchError(
            f"cannot read {api} ({exc}); check your network or pip's index-url, "
            "or pass a local source with --source PATH"
        ) from None
    files = document.get("releases", {}).get(version)
    if files is None:
        known = ", ".join(_by_version(document.get("releases", {}))[-8:])
        raise FetchError(f"{project} {version} is not on {index_url} (recent versions: {known})")
    for entry in files:
        if entry.get("packagetype") == "sdist":
            return Release(
                project,
                version,
                urllib.parse.urljoin(api, entry["url"]),
                entry["filename"],
                entry["digests"]["sha256"],
                entry.get("size"),
            )
    raise FetchError(f"{project} {version} has no sdist on {index_url}; pass a local source with --source PATH")


def _by_version(versions) -> list[str]:
    """Oldest first in version order (as strings, 0.9.0 sorts after 0.16.1); unparsable ones first."""
    from packaging.version import InvalidVersion, Version

    parsed, other = [], []
    for v in versions:
        try:
            parsed.append((Version(v), v))
        except InvalidVersion:
            other.append(v)
    return sorted(other) + [v for _, v in sorted(parsed)]


def download(url: str, dest: Path, expected_sha256: str, progress=None) -> None:
    """Stream `url` to `dest`, verifying sha256; `dest` exists only if the digest matched."""
    digest = hashlib.sha256()
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=120) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
    except (urllib.error.URLError, OSError) as exc:
        part.unlink(missing_ok=True)
        raise FetchError(f"download of {url} failed ({exc}); run the command again") from None
    actual = digest.hexdigest()
    if actual != expected_sha256:
        part.unlink(missing_ok=True)
        raise FetchError(
            f"{url}: sha256 is {actual}, the pin says {expected_sha256}; the index served "
            "a different file: do not trust it, check third_party/upstreams.toml"
        )
    os.replace(part, dest)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
