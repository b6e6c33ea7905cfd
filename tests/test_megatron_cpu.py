"""Megatron on the CPU, for real: the patched megatron-core wheel trains a tiny GPT.

`pip install . -C device=cpu -C backend=megatron` builds megatron_core-0.16.1+fs.cpu.<hash> from the pinned
release plus patches/megatron and hardware/cpu/patches/megatron, into a fresh virtual environment. The
driver (tests/megatron_cpu/train_tiny_gpt.py: Megatron's GPTModel, DDP, optimizer and pipeline schedule)
then runs with that environment's python from a scratch folder, so megatron comes from the installed
wheel, never from a source tree: world size 1, and under torchrun with 2 processes as TP=2, PP=2 and DP=2
over gloo. The loss must fall in every layout; TP=2 and DP=2 start from the same weights and see the same
global batch as world size 1, so their losses must match it. The same driver on the unpatched
megatron-core 0.16.1 must fail. Nothing is monkeypatched while training.

MoE (allgather and alltoall dispatchers, EP=2, TP=2 with sequence parallelism, shared experts and a
sigmoid router with expert bias as DeepSeek-V3) and multi-latent attention train the same way, 2 processes.

The backend wheel and sdist are cached in $FLAGSCALE_TEST_CACHE/build-cache between runs.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from megatron_env import install_cpu_megatron

pytestmark = pytest.mark.integration

DRIVER = REPO_ROOT / "tests" / "megatron_cpu" / "train_tiny_gpt.py"
STEPS = 10
VOCAB = 128
LAYOUTS = {"tp2": ["--tp", "2"], "pp2": ["--pp", "2"], "dp2": []}  # 2 processes each
# fp32 on one machine: TP/DP reorder a few reductions, nothing more. Measured differences are ~1e-6.
RTOL, ATOL = 1e-3, 1e-3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "MEGATRON_DEVICE_TYPE", "MEGATRON_COLLECTIVE_BACKEND", "VIRTUAL_ENV")
        and not k.startswith(("MASTER_", "TORCHELASTIC_"))
        and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", PYTHONWARNINGS="ignore")
    env.update(extra or {})
    return env


class Venv:
    def __init__(self, root: Path, workdir: Path) -> None:
        self.root = root
        self.workdir = workdir
        self.python = root / "bin" / "python"
        self.torchrun = root / "bin" / "torchrun"
        self.timings: dict[str, float] = {}

    def run(
        self, args: list[str], *, env: dict[str, str] | None = None, timeout: float = 300, label: str | None = None
    ) -> subprocess.CompletedProcess:
        start = time.perf_counter()
        result = subprocess.run(
            args, cwd=self.workdir, env=env or _run_env(), capture_output=True, text=True, timeout=timeout
        )
        if label:
            self.timings[label] = round(time.perf_counter() - start, 1)
        return result

    def train(
        self, layout_args: list[str], nproc: int = 1, env: dict[str, str] | None = None, label: str | None = None
    ) -> subprocess.CompletedProcess:
        driver = [str(DRIVER), "--steps", str(STEPS), "--vocab", str(VOCAB), *layout_args]
        if nproc == 1:
            cmd = [str(self.python), *driver]
        else:
            cmd = [
                str(self.torchrun),
                "--nnodes=1",
                f"--nproc_per_node={nproc}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
                "--rdzv-id=flagscale-megatron-cpu",
                "--max-restarts=0",
                *driver,
            ]
        return self.run(cmd, env=env, label=label)


def records(result: subprocess.CompletedProcess) -> list[dict]:
    out = []
    for line in result.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def losses_of(result: subprocess.CompletedProcess) -> list[float]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    recs = records(result)
    steps = [r for r in recs if r["event"] == "step"]
    assert [r["step"] for r in steps] == list(range(STEPS)), "exactly one rank reports each step"
    assert all(math.isfinite(r["loss"]) for r in steps)
    return [r["loss"] for r in steps]


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Venv:
    """A fresh environment with the cpu/megatron build of this checkout installed by plain pip."""
    base = tmp_path_factory.mktemp("megatron-cpu")
    root = base / "venv"
    seconds = install_cpu_megatron(root, ".")
    workdir = base / "work"
    workdir.mkdir()
    v = Venv(root, workdir)
    v.timings["install"] = seconds
    return v


@pytest.fixture(scope="module")
def world1(venv) -> subprocess.CompletedProcess:
    return venv.train([], label="world1")


def test_wheel_is_the_patched_cpu_build(venv):
    code = (
        "import json, megatron.core, importlib.metadata as m; d = m.distribution('megatron-core');"
        "print(json.dumps({'file': megatron.core.__file__, 'version': d.version,"
        " 'prov': json.loads(d.read_text('flagscale_build.json'))}))"
    )
    result = venv.run([str(venv.python), "-c", code])
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    site = venv.root / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    assert Path(info["file"]).is_relative_to(site), info["file"]
    assert info["version"].startswith("0.16.1+fs.cpu."), info["version"]
    applied = [(p["series"], p["name"]) for p in info["prov"]["patches"]]
    common = [n for n in (REPO_ROOT / "patches/megatron/series").read_text().split() if n.endswith(".patch")]
    cpu = [n for n in (REPO_ROOT / "hardware/cpu/patches/megatron/series").read_text().split() if n.endswith(".patch")]
    assert [n for _, n in applied] == common + cpu, applied


def test_cpu_build_picks_the_cpu_even_where_cuda_is_available(venv):
    """The cpu series: CPU + gloo by default whatever torch.cuda says, and a seeded tracker on the CPU
    even when asked for the CUDA-only RNG trackers (a scripted probe, not a training run)."""
    code = """
import torch, torch.distributed as dist
torch.cuda.is_available = lambda: True  # pretend a GPU is present: the cpu build must not care
from megatron.core import device_utils, parallel_state, tensor_parallel
assert device_utils.get_device_type() == "cpu", device_utils.get_device_type()
assert device_utils.default_collective_backend() == "gloo"
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
parallel_state.initialize_model_parallel()
tensor_parallel.model_parallel_cuda_manual_seed(7, te_rng_tracker=True, use_cudagraphable_rng=True)
tracker = tensor_parallel.get_cuda_rng_tracker()
with tracker.fork():
    a = torch.rand(4)
with tracker.fork():
    b = torch.rand(4)
assert not torch.equal(a, b)
print("OK")
"""
    result = venv.run([str(venv.python), "-c", code])
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-3000:]


def test_world_size_1_trains_from_the_installed_wheel(venv, world1):
    losses = losses_of(world1)
    start = next(r for r in records(world1) if r["event"] == "start")
    assert Path(start["megatron_core"]).is_relative_to(venv.root), start
    assert start["device_type"] == "cpu" and start["backend"] == "gloo" and start["world_size"] == 1, start
    print(f"\nworld1 losses: {[round(x, 4) for x in losses]}")
    assert abs(losses[0] - math.log(VOCAB)) < 0.3, losses  # a fresh model guesses uniformly
    assert losses[-1] < 0.85 * losses[0], losses


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_process_layouts_train_and_match(venv, world1, layout):
    result = venv.train(LAYOUTS[layout], nproc=2, label=layout)
    losses = losses_of(result)
    start = next(r for r in records(result) if r["event"] == "start")
    assert Path(start["megatron_core"]).is_relative_to(venv.root), start
    assert start["world_size"] == 2 and start["backend"] == "gloo" and start["device_type"] == "cpu", start
    print(f"\n{layout} losses: {[round(x, 4) for x in losses]}  ({venv.timings[layout]} s)")
    assert losses[-1] < 0.85 * losses[0], losses
    if layout in ("tp2", "dp2"):  # same initial weights and global batch as world size 1
        reference = losses_of(world1)
        assert all(math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL) for a, b in zip(losses, reference, strict=False)), (
            f"{layout} {losses} != world1 {reference}"
        )


# MoE and multi-latent attention, made to run on the CPU by patches 0006-0009 (2 processes each). Pairs
# whose layouts differ only in how the same math is spread (dispatcher, EP vs TP) must give the same losses.
MOE_LAYOUTS = {
    "moe-ep2-allgather": ["--experts", "4", "--ep", "2", "--dispatcher", "allgather"],
    "moe-ep2-alltoall": ["--experts", "4", "--ep", "2", "--dispatcher", "alltoall"],
    "moe-tp2-alltoall": ["--experts", "4", "--tp", "2", "--dispatcher", "alltoall"],
    "mla-dp2": ["--mla"],
    "mla-tp2": ["--mla", "--tp", "2"],
    "deepseek-ep2": [
        "--mla",
        "--experts",
        "4",
        "--ep",
        "2",
        "--shared-expert",
        "64",
        "--router",
        "sigmoid",
        "--dispatcher",
        "alltoall",
    ],
}
SAME_MATH = [("moe-ep2-alltoall", "moe-ep2-allgather"), ("mla-tp2", "mla-dp2")]


@pytest.fixture(scope="module")
def moe_runs(venv) -> dict[str, list[float]]:
    return {name: losses_of(venv.train(args, nproc=2, label=name)) for name, args in MOE_LAYOUTS.items()}


@pytest.mark.parametrize("layout", list(MOE_LAYOUTS))
def test_moe_and_mla_train_on_the_cpu(venv, moe_runs, layout):
    losses = moe_runs[layout]
    print(f"\n{layout} losses: {[round(x, 4) for x in losses]}  ({venv.timings[layout]} s)")
    assert losses[-1] < 0.85 * losses[0], losses


@pytest.mark.parametrize("layout, reference", SAME_MATH)
def test_moe_and_mla_layouts_of_the_same_math_match(moe_runs, layout, reference):
    assert all(
        math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL)
        for a, b in zip(moe_runs[layout], moe_runs[reference], strict=True)
    ), f"{layout} {moe_runs[layout]} != {reference} {moe_runs[reference]}"


def test_the_same_driver_fails_on_unpatched_megatron_core(venv, real_project, real_cache):
    """Upstream 0.16.1 (the verified release sdist, first on PYTHONPATH) cannot train on the CPU."""
    from flagscale.upstream.sources import materialize
    from flagscale.upstream.target import Target

    src = materialize(Target.of(real_project, "megatron", None, "sdist", real_cache))
    assert (src.tree / "megatron" / "core" / "__init__.py").is_file()
    assert not (src.tree / "megatron" / "core" / "device_utils.py").exists()
    result = venv.train([], env=_run_env({"PYTHONPATH": str(src.tree)}), label="unpatched")
    start = [r for r in records(result) if r["event"] == "start"]
    assert start and Path(start[0]["megatron_core"]).is_relative_to(src.tree), result.stdout[-2000:]
    assert result.returncode != 0, result.stdout[-2000:]
    assert not [r for r in records(result) if r["event"] == "step"]
    assert "CUDA" in result.stderr, result.stderr[-3000:]


def test_report_timings(venv):
    print(f"\ntimings (s): {venv.timings}")
