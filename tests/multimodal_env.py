"""The Hugging Face 5.x environment of issue 14's tests (transformers + diffusers engines, `flagscale compress`).

The `multimodal` extra cannot live beside the `models` extra the rest of the suite uses (transformers 4.57 for the
megatron bridge), so its tests run their code as subprocesses in a venv of its own: the extra's requirements and
FlagScale's base dependencies, installed by plain pip with constraints.txt (CPU torch), this checkout on PYTHONPATH
(`python -m flagscale ...`). The venv is kept in $FLAGSCALE_TEST_CACHE/venvs, keyed by the requirements, so a
warm run skips the install; a cold one pays it once.

FLAGSCALE_TEST_MULTIMODAL_VENV=/path/to/venv uses an existing environment instead (one with this checkout installed
editable with `.[multimodal]`): a developer's shortcut, never used by CI.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import filelock
from conftest import REPO_ROOT, real_cache_dir

EXTRA = "multimodal"
_DROP = ("PYTHONPATH", "VIRTUAL_ENV", "FLAGSCALE_ROOT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
_BUILT: dict[str, MultimodalEnv] = {}


def requirements() -> list[str]:
    """The extra's requirements with FlagScale's own extras it names expanded, plus the base dependencies."""
    meta = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    extras = meta["project"]["optional-dependencies"]
    reqs = list(meta["tool"]["flagscale"]["dependencies"])
    pending = [EXTRA]
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        for req in extras[name]:
            if req.startswith("flagscale["):
                pending.extend(x.strip() for x in req[len("flagscale[") : req.index("]")].split(","))
            else:
                reqs.append(req)
    return sorted(set(reqs))


def run_env(root: Path) -> dict[str, str]:
    """Every command in the venv: this checkout importable, one thread per process, never the HF hub."""
    env = {k: v for k, v in os.environ.items() if k not in _DROP and not k.startswith(("MASTER_", "TORCHELASTIC_"))}
    env.update(
        PYTHONPATH=str(REPO_ROOT),
        VIRTUAL_ENV=str(root),
        PATH=f"{root / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        OMP_NUM_THREADS="1",
        PYTHONDONTWRITEBYTECODE="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


@dataclass
class MultimodalEnv:
    root: Path
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    def env(self, **extra: str) -> dict[str, str]:
        return {**run_env(self.root), **extra}

    def run(
        self, args: list, *, timeout: float = 600, cwd: Path | None = None, label: str | None = None, **extra_env: str
    ) -> subprocess.CompletedProcess:
        """`args` in the venv (a leading "python" means its interpreter); output captured as text."""
        argv = [str(self.python) if a == "python" and i == 0 else str(a) for i, a in enumerate(args)]
        start = time.perf_counter()
        result = subprocess.run(
            argv, cwd=cwd or REPO_ROOT, env=self.env(**extra_env), capture_output=True, text=True, timeout=timeout
        )
        if label:
            self.timings[label] = round(time.perf_counter() - start, 1)
        return result

    def flagscale(self, *args: object, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return self.run(["python", "-m", "flagscale", *args], timeout=timeout, cwd=cwd)


def _install(root: Path, reqs: list[str]) -> float:
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in _DROP}
    start = time.perf_counter()
    install = subprocess.run(
        [str(root / "bin" / "pip"), "install", "-q", "-c", str(REPO_ROOT / "constraints.txt"), *reqs],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-5000:]
    return round(time.perf_counter() - start, 1)


def multimodal_env() -> MultimodalEnv:
    """The session's environment: the developer's venv, or the cached one (installed on first use)."""
    if "env" in _BUILT:
        return _BUILT["env"]
    existing = os.environ.get("FLAGSCALE_TEST_MULTIMODAL_VENV")
    if existing:
        _BUILT["env"] = MultimodalEnv(Path(existing))
        return _BUILT["env"]
    reqs = requirements()
    key = hashlib.sha256(
        "\n".join([*reqs, (REPO_ROOT / "constraints.txt").read_text(), sys.version]).encode()
    ).hexdigest()[:16]
    venvs = real_cache_dir() / "venvs"
    venvs.mkdir(parents=True, exist_ok=True)
    root = venvs / f"{EXTRA}-{key}"
    with filelock.FileLock(str(root) + ".lock"):
        built = MultimodalEnv(root)
        if not (root / ".complete").exists():
            shutil.rmtree(root, ignore_errors=True)
            # the venv's scripts hard-code its path: install where it will live, mark it complete at the end
            built.timings["install"] = _install(root, reqs)
            (root / ".complete").write_text("\n".join(reqs) + "\n")
    _BUILT["env"] = built
    return built
