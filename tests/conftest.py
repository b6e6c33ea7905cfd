"""Shared fixtures: synthetic FlagScale projects and upstream trees made by the tests, the real
release sdists (downloaded once from the package index and cached between runs), and a private sshd
standing in for other nodes (multi-node train and serve tests)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from flagscale.upstream.cache import Cache
from flagscale.upstream.project import Project

REPO_ROOT = Path(__file__).resolve().parent.parent
TOY_SHA = "0" * 64


def write_tree(root: Path, files: dict[str, str | bytes]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return root


def git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "Test",
        "GIT_AUTHOR_EMAIL": "test@example.org",
        "GIT_COMMITTER_NAME": "Test",
        "GIT_COMMITTER_EMAIL": "test@example.org",
        "GIT_AUTHOR_DATE": "@1700000000 +0000",
        "GIT_COMMITTER_DATE": "@1700000000 +0000",
    }
    return subprocess.run(["git", "-C", str(repo), *args], check=check, capture_output=True, text=True, env=env)


def make_patch(
    base: dict[str, str | bytes],
    changed: dict[str, str | bytes | None],
    tmp: Path,
    subject: str = "toy: change",
    body: str = "Because the toy needs it.",
    status: str = "Pending",
    drop: str = "never",
    chmod: dict[str, int] | None = None,
) -> bytes:
    """A real `git format-patch` of `base` -> `changed` (None deletes a file; `chmod` sets modes),
    with a proper header."""
    tmp.mkdir(parents=True, exist_ok=True)
    repo = tmp / f"mkpatch-{len(list(tmp.glob('mkpatch-*')))}"
    repo.mkdir()
    write_tree(repo, base)
    git(repo, "init", "-q")
    git(repo, "config", "core.quotepath", "true")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "base")
    for rel, content in changed.items():
        if content is None:
            (repo / rel).unlink()
        else:
            write_tree(repo, {rel: content})
    for rel, mode in (chmod or {}).items():
        os.chmod(repo / rel, mode)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", f"{subject}\n\n{body}\n\nUpstream-Status: {status}\nDrop-When: {drop}")
    out = subprocess.run(
        [
            "git",
            "-C",
            str(repo),
            "format-patch",
            "--stdout",
            "--zero-commit",
            "--full-index",
            "--no-stat",
            "--no-signature",
            "--no-renames",
            "-N",
            "-1",
        ],
        check=True,
        capture_output=True,
    )
    return out.stdout


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Cache:
    monkeypatch.setenv("FLAGSCALE_CACHE_DIR", str(tmp_path / "cache"))
    return Cache(tmp_path / "cache")


@pytest.fixture
def toy_project(tmp_path) -> Project:
    """A FlagScale project with one backend, `toy`, whose upstream is a local tree (see `toy_upstream`)."""
    root = tmp_path / "project"
    write_tree(
        root,
        {
            "third_party/upstreams.toml": textwrap.dedent(f"""\
            [toy]
            name = "Toy"
            aliases = ["toy-upstream"]
            git = "https://example.invalid/toy.git"
            tag = "v1.0"
            tag_format = "v{{version}}"

            [toy.sdist]
            name = "toy"
            version = "1.0"
            sha256 = "{TOY_SHA}"
            paths = {{ "python/" = "" }}
            """),
            "hardware/cpu/device.toml": '[device]\nname = "cpu"\nbackends = ["toy"]\n',
            "hardware/npu/device.toml": '[device]\nname = "npu"\naliases = ["ascend"]\nbackends = ["toy"]\n',
        },
    )
    return Project(root)


TOY_BASE = {
    "PKG-INFO": "Metadata-Version: 2.1\nName: toy\nVersion: 1.0\n",
    "toy/__init__.py": "".join(f"line {i}\n" for i in range(1, 41)),
    "toy/device.py": "def device():\n    return 'cuda'\n",
    "toy/bin/run.sh": "#!/bin/sh\necho run\n",
}


@pytest.fixture
def toy_upstream(tmp_path) -> Path:
    """The toy backend's release sdist layout (PKG-INFO at the top); repo paths live under python/."""
    return write_tree(tmp_path / "toy-1.0", TOY_BASE)


def real_cache_dir() -> Path:
    """Where integration tests keep real sdists and trees between runs (CI caches this folder)."""
    configured = os.environ.get("FLAGSCALE_TEST_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "flagscale-tests"


@pytest.fixture(scope="session")
def real_cache() -> Cache:
    return Cache(real_cache_dir())


@pytest.fixture(scope="session")
def real_project() -> Project:
    return Project(REPO_ROOT)


def install_wheel(wheel: Path, site: Path) -> Path:
    """`pip install --target site wheel` (no dependencies): a wheel's files laid out as a real install has them."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-compile",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
    )
    return site


def copy_project(dest: Path) -> Project:
    """A scratch copy of this checkout's pins, patches and devices that a test may rewrite."""
    for part in ("third_party/upstreams.toml", "patches", "hardware"):
        src = REPO_ROOT / part
        if src.is_dir():
            shutil.copytree(src, dest / part)
        else:
            (dest / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / part)
    return Project(dest)


# ------------------------------------------------------------------------------------------ ssh nodes
@dataclass(frozen=True)
class Sshd:
    """A running private sshd: `port, options = sshd` (what `ssh -p PORT -o OPTION...` needs), plus its
    pid (the parent of every session it serves) and folder (keys, config, sshd.log)."""

    port: int
    options: list[str] = field(hash=False)
    pid: int
    folder: Path

    def __iter__(self):
        return iter((self.port, self.options))


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.1) -> bool:
    """Poll `predicate` until it is true (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def pid_alive(pid: int) -> bool:
    """The process exists and has not exited (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """An sshd of our own on 127.0.0.1 and 127.0.0.2 (two "nodes"), accepting one generated key.

    Skipped, with the reason, where no sshd can run (CI: apt-get install openssh-server openssh-client)."""
    sshd_bin = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
    if not sshd_bin or not shutil.which("ssh") or not shutil.which("ssh-keygen"):
        pytest.skip("no OpenSSH server/client here (apt-get install openssh-server openssh-client)")
    if os.geteuid() == 0 and not Path("/run/sshd").is_dir():
        Path("/run/sshd").mkdir(mode=0o755)  # sshd's privilege-separation folder (the package ships it empty)
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    (d / "authorized_keys").write_text((d / "user_key.pub").read_text())
    (d / "authorized_keys").chmod(0o600)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nListenAddress 127.0.0.2\nHostKey {d / 'host_key'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\nUsePAM no\nStrictModes no\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
    )
    check = subprocess.run([sshd_bin, "-t", "-f", str(d / "sshd_config")], capture_output=True, text=True)
    if check.returncode != 0:
        pytest.skip(f"sshd cannot run here: {check.stderr.strip()[:300]}")
    log = open(d / "sshd.log", "w")
    proc = subprocess.Popen([sshd_bin, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=log)
    options = [
        f"IdentityFile={d / 'user_key'}",
        "IdentitiesOnly=yes",
        "StrictHostKeyChecking=no",
        "UserKnownHostsFile=/dev/null",
        "LogLevel=ERROR",
    ]
    probe = ["ssh", "-o", "BatchMode=yes", "-p", str(port), *sum((["-o", o] for o in options), []), "127.0.0.2", "true"]
    ok = wait_until(lambda: subprocess.run(probe, capture_output=True).returncode == 0, 15)
    if not ok:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
        pytest.skip(f"could not log in to a local sshd: {(d / 'sshd.log').read_text()[-300:]}")
    yield Sshd(port, options, proc.pid, d)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    log.close()


def flagscale_cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m flagscale.cli ARGS` as a user runs it (this interpreter; no PYTHONPATH of the test's)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, "-m", "flagscale.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def mm_env():
    """Issue 14's Hugging Face 5.x venv (tests/multimodal_env.py): installed once, cached between runs."""
    from multimodal_env import multimodal_env

    return multimodal_env()
