"""One virtual environment per test session with this checkout's cpu/megatron build and the Hugging Face
libraries: `pip install -c constraints.txt ".[train,models,wandb]" -C device=cpu -C backend=megatron`, by plain pip
into a fresh venv, as on CI's fresh machines (the backend wheel is cached in $FLAGSCALE_TEST_CACHE/build-cache,
as for tests/test_train.py). The model-family and checkpoint-bridge tests share it.

FLAGSCALE_TEST_MEGATRON_VENV=/path/to/venv uses an existing environment instead (one with this checkout
installed editable, `flagscale install --backend megatron --device cpu` and the `models` extra): a developer's
shortcut that skips the install, never used by CI.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import REPO_ROOT, real_cache_dir

_DROP = (
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "FLAGSCALE_ROOT",
    "MEGATRON_DEVICE_TYPE",
    "MEGATRON_COLLECTIVE_BACKEND",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
)
_BUILT: dict[str, MegatronEnv] = {}


def run_env() -> dict[str, str]:
    """The environment of every command run in the venv: nothing inherited that could pick another
    megatron, rank or device; one thread per process (tests share 2 cores); never the HF hub."""
    env = {k: v for k, v in os.environ.items() if k not in _DROP and not k.startswith(("MASTER_", "TORCHELASTIC_"))}
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONWARNINGS="ignore",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MegatronEnv:
    root: Path
    work: Path
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def flagscale(self) -> Path:
        return self.root / "bin" / "flagscale"

    def run(
        self, args: list[str], *, timeout: float = 600, label: str | None = None, cwd: Path | None = None
    ) -> subprocess.CompletedProcess:
        start = time.perf_counter()
        result = subprocess.run(
            [str(a) for a in args], cwd=cwd or self.work, env=run_env(), capture_output=True, text=True, timeout=timeout
        )
        if label:
            self.timings[label] = round(time.perf_counter() - start, 1)
        return result

    def corpus(self) -> Path:
        """The tiny_gpt example's corpus (byte tokenizer), made once per session: its .bin/.idx prefix."""
        data = self.work / "data"
        if not (data / "corpus_text_document.idx").exists():
            script = REPO_ROOT / "examples/tiny_gpt/make_corpus.py"
            made = self.run([self.python, script, "--out", data, "--docs", "200"])
            assert made.returncode == 0, made.stderr[-3000:]
        return data / "corpus_text_document"

    def torchrun(self, nproc: int, script: Path, *args: object, timeout: float = 600) -> subprocess.CompletedProcess:
        return self.run(
            [
                self.python,
                "-m",
                "torch.distributed.run",
                "--nnodes=1",
                f"--nproc-per-node={nproc}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{free_port()}",
                "--max-restarts=0",
                script,
                *args,
            ],
            timeout=timeout,
        )


def install_cpu_megatron(root: Path, requirement: str = ".", timeout: float = 900) -> float:
    """A fresh venv at `root` with `pip install -c constraints.txt REQUIREMENT -C device=cpu -C backend=megatron`
    of this checkout, by plain pip as on CI's fresh machines; returns the seconds it took."""
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "FLAGSCALE_ROOT")}
    env["FLAGSCALE_CACHE_DIR"] = str(real_cache_dir() / "build-cache")
    start = time.perf_counter()
    install = subprocess.run(
        [
            str(root / "bin" / "pip"),
            "install",
            "-c",
            "constraints.txt",
            requirement,
            "-C",
            "device=cpu",
            "-C",
            "backend=megatron",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-5000:]
    return round(time.perf_counter() - start, 1)


def megatron_env(tmp_path_factory) -> MegatronEnv:
    """The session's environment (built on first use)."""
    if "env" not in _BUILT:
        _BUILT["env"] = _build(tmp_path_factory)
    return _BUILT["env"]


def _build(tmp_path_factory) -> MegatronEnv:
    base = tmp_path_factory.mktemp("megatron-models")
    work = base / "work"
    work.mkdir()
    existing = os.environ.get("FLAGSCALE_TEST_MEGATRON_VENV")
    if existing:
        return MegatronEnv(Path(existing), work)
    root = base / "venv"
    seconds = install_cpu_megatron(root, ".[train,models,wandb]", timeout=1200)  # wandb: its offline-mode test
    built = MegatronEnv(root, work)
    built.timings["install"] = seconds
    return built
