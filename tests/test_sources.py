"""Materializing sources: sdists from a real HTTP index on loopback, submodules, local paths, the cache."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import TOY_BASE, git, write_tree

from flagscale.errors import ConfigError, FetchError
from flagscale.upstream.index import configured_index_url, json_api_url
from flagscale.upstream.project import Project
from flagscale.upstream.sources import materialize
from flagscale.upstream.target import Target


def make_sdist(path: Path, files: dict[str, str], top: str = "toy-1.0") -> str:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for rel, content in sorted(files.items()):
            data = content.encode()
            info = tarfile.TarInfo(f"{top}/{rel}")
            info.size, info.mode = len(data), 0o755 if rel.endswith(".sh") else 0o644
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A PyPI-style index (JSON API with relative file URLs, like ours) served over HTTP on loopback."""
    root = tmp_path / "index"
    (root / "files").mkdir(parents=True)
    (root / "pypi" / "toy").mkdir(parents=True)
    sha = make_sdist(root / "files" / "toy-1.0.tar.gz", TOY_BASE)

    def publish(listed_sha: str) -> None:
        doc = {
            "releases": {
                "1.0": [
                    {
                        "packagetype": "sdist",
                        "filename": "toy-1.0.tar.gz",
                        "url": "../../files/toy-1.0.tar.gz",
                        "digests": {"sha256": listed_sha},
                    }
                ]
            }
        }
        (root / "pypi" / "toy" / "json").write_text(json.dumps(doc))

    publish(sha)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_port}/simple")
    yield {"root": root, "sha": sha, "publish": publish}
    server.shutdown()


def with_sha(project: Project, sha: str) -> Project:
    pins = project.pins
    pin = pins.by_backend["toy"]
    pins.by_backend["toy"] = dataclasses.replace(pin, sdist=dataclasses.replace(pin.sdist, sha256=sha))
    return project


def test_index_url_comes_from_pip_configuration(monkeypatch, tmp_path):
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nindex-url = https://mirror.example/simple/\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    assert configured_index_url() == "https://mirror.example/simple/"
    assert json_api_url("https://mirror.example/simple/", "vllm") == "https://mirror.example/pypi/vllm/json"


def test_sdist_is_downloaded_verified_extracted_and_read_only(toy_project, index, cache):
    project = with_sha(toy_project, index["sha"])
    src = materialize(Target.of(project, "toy", None, "sdist", cache))
    assert src.kind == "sdist" and src.layout == "sdist"
    assert (src.tree / "toy" / "device.py").read_text() == TOY_BASE["toy/device.py"]
    assert src.to_tree_path("python/toy/device.py") == "toy/device.py"
    assert src.to_tree_path("README.md") is None  # outside the mapped folder: not shipped
    assert not (src.tree / "toy" / "device.py").stat().st_mode & 0o222  # read-only cache entry
    assert (src.tree / "toy" / "bin" / "run.sh").stat().st_mode & 0o100
    again = materialize(Target.of(project, "toy", None, "auto", cache))
    assert again.tree == src.tree


def test_wrong_sha256_is_refused_and_nothing_is_cached(toy_project, index, cache):
    project = with_sha(toy_project, "f" * 64)
    with pytest.raises(FetchError, match="sha256"):
        materialize(Target.of(project, "toy", None, "sdist", cache))
    # The index lies about the digest too: the download itself is verified.
    index["publish"]("f" * 64)
    with pytest.raises(FetchError, match="sha256 is"):
        materialize(Target.of(project, "toy", None, "sdist", cache))
    assert not list((cache.root / "sources").glob("sdist-*")) if (cache.root / "sources").exists() else True
    assert not list((cache.root / "sdists").glob("f*/*.tar.gz"))


def test_corrupted_cached_sdist_is_downloaded_again(toy_project, index, cache):
    project = with_sha(toy_project, index["sha"])
    pin = project.pins.resolve("toy")
    from flagscale.upstream.sources import fetch_sdist

    archive = fetch_sdist(pin, cache)
    archive.chmod(0o644)
    archive.write_bytes(b"not a tarball")
    repaired = fetch_sdist(pin, cache)
    assert hashlib.sha256(repaired.read_bytes()).hexdigest() == index["sha"]


def test_concurrent_fetches_of_one_pin_build_it_once(toy_project, index, cache, tmp_path):
    project = with_sha(toy_project, index["sha"])
    script = (
        "import sys, dataclasses; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
        "from flagscale.upstream.project import Project\nfrom flagscale.upstream.sources import materialize\n"
        "from flagscale.upstream.target import Target\n"
        "p = Project(__import__('pathlib').Path(sys.argv[3]))\npin = p.pins.resolve('toy')\n"
        "pin = dataclasses.replace(pin, sdist=dataclasses.replace(pin.sdist, sha256=sys.argv[4]))\n"
        "print(materialize(Target(p, pin, None, 'sdist')).tree)\n"
    )
    repo = Path(__file__).resolve().parent.parent
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(repo), str(repo / "tests"), str(project.root), index["sha"]],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(outputs) == 1
    assert [p.name for p in (cache.root / "sources").iterdir() if not p.name.startswith(".")] == [
        f"sdist-{index['sha']}"
    ]
    assert not list((cache.root / "sources").glob(".*.tmp-*"))


def test_killed_builder_leaves_no_poisoned_entry(cache):
    def build(tmp: Path) -> None:
        (tmp / "half").write_text("written")
        raise KeyboardInterrupt  # stands in for an interruption half-way

    with pytest.raises(KeyboardInterrupt):
        cache.get_or_create("trees", "k", build)
    assert not cache.path("trees", "k").exists()
    # A builder killed with SIGKILL leaves its temporary folder: the next builder removes it.
    stale = cache.root / "trees" / ".k.tmp-dead"
    stale.mkdir(parents=True)
    entry, hit = cache.get_or_create("trees", "k", lambda tmp: (tmp / "ok").write_text("yes"))
    assert not hit and (entry / "ok").read_text() == "yes" and not stale.exists()


def test_local_path_source_is_copied_and_keyed_by_content(toy_project, toy_upstream, cache):
    pin = toy_project.pins.resolve("toy")
    first = materialize(Target(toy_project, pin, None, str(toy_upstream), cache))
    assert first.kind == "path" and first.layout == "sdist"
    (toy_upstream / "toy" / "device.py").write_text("changed\n")
    second = materialize(Target(toy_project, pin, None, str(toy_upstream), cache))
    assert second.key != first.key and (second.tree / "toy" / "device.py").read_text() == "changed\n"
    with pytest.raises(ConfigError, match="not a folder"):
        materialize(Target(toy_project, pin, None, str(toy_upstream / "missing"), cache))


def test_initialized_submodule_is_preferred_and_checked_against_the_pin(toy_project, cache, tmp_path):
    upstream = write_tree(tmp_path / "toy-git", {"python/toy/__init__.py": "x = 1\n", "README.md": "toy\n"})
    git(upstream, "init", "-q")
    git(upstream, "add", "-A")
    git(upstream, "commit", "-qm", "v1.0")
    head = git(upstream, "rev-parse", "HEAD").stdout.strip()
    root = toy_project.root
    git(root, "init", "-q")
    git(root, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(upstream), "third_party/toy")
    pins_file = root / "third_party" / "upstreams.toml"
    pins_file.write_text(
        pins_file.read_text().replace('tag = "v1.0"', f'tag = "v1.0"\ncommit = "{head}"\nsubmodule = "third_party/toy"')
    )
    project = Project(root)
    src = materialize(Target.of(project, "toy", None, "auto", cache))
    assert src.kind == "submodule" and src.layout == "repo" and src.key == f"git-{head}"
    assert (src.tree / "README.md").read_text() == "toy\n"  # whole repo, not just the sdist part
    (root / "third_party/toy/README.md").write_text("local edit\n")
    with pytest.raises(FetchError, match="local changes"):
        materialize(Target.of(project, "toy", None, "auto", cache))
    git(root / "third_party/toy", "checkout", "-q", "README.md")
    git(root / "third_party/toy", "commit", "-q", "--allow-empty", "-m", "moved on")
    with pytest.raises(FetchError, match="but the pin is"):
        materialize(Target.of(project, "toy", None, "submodule", cache))


def test_uninitialized_submodule_requested_explicitly_says_how_to_fix(toy_project, cache):
    pins_file = toy_project.root / "third_party" / "upstreams.toml"
    pins_file.write_text(pins_file.read_text().replace('tag = "v1.0"', 'tag = "v1.0"\nsubmodule = "third_party/toy"'))
    project = Project(toy_project.root)
    with pytest.raises(FetchError, match="git submodule update --init"):
        materialize(Target.of(project, "toy", None, "submodule", cache))
