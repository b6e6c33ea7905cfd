"""vLLM and SGLang launch paths up to the process boundary: they cannot run a model on our CPUs.

What runs for real: the patched backend wheels (built by flagscale, cached) installed into a folder, the
generated `vllm serve` / `sglang.launch_server` commands and environments checked flag by flag, engine
arguments validated against the flags those installed packages define, `flagscale infer` dry runs, and
the patched vLLM package importing. Serving needs a GPU: those tests skip without one.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, install_wheel, real_cache_dir
from llama_cpp_support import flagscale

pytestmark = pytest.mark.integration
CONF = REPO_ROOT / "examples" / "tiny_llama" / "conf"


@functools.cache
def _installed(backend: str):
    from flagscale.upstream.cache import Cache
    from flagscale.upstream.project import Project
    from flagscale.upstream.target import Target
    from flagscale.wheels.install import build_in_isolation

    target = Target.of(Project(REPO_ROOT), backend, "cpu", cache=Cache(real_cache_dir() / "build-cache"))
    wheel = build_in_isolation(target).path
    site = real_cache_dir() / "engine-tests" / wheel.stem
    if not site.is_dir():
        install_wheel(wheel, site)
    return site, wheel


@pytest.fixture(scope="module", params=["vllm", "sglang"])
def engine(request, tmp_path_factory):
    site, wheel = _installed(request.param)
    model = tmp_path_factory.mktemp("hf")
    (model / "config.json").write_text("{}")
    env = {
        "PYTHONPATH": str(site),
        "TINY_LLAMA_HF": str(model),
        "TINY_LLAMA_PROMPTS": str(REPO_ROOT / "examples" / "tiny_llama" / "prompts.txt"),
    }
    return {"name": request.param, "site": site, "wheel": wheel, "env": env, "model": str(model)}


def _dryrun(engine, tmp_path, *extra, command="serve"):
    task = f"{command}=tiny_{engine['name']}"
    result = flagscale(
        command,
        str(CONF),
        task,
        f"experiment.exp_dir={tmp_path}",
        "action=dryrun",
        *extra,
        env=engine["env"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_serve_command_and_environment(engine, tmp_path):
    plan = _dryrun(
        engine, tmp_path, "experiment.runner.port=9010", "experiment.runner.host=0.0.0.0", "+serve.0.port=9011"
    )
    proc, front = plan["processes"]  # the engine on loopback, the front door on host:port in front of it
    if engine["name"] == "vllm":
        assert proc["cmd"][1:] == [
            "serve",
            engine["model"],
            "--served-model-name",
            "tiny",
            "--host",
            "127.0.0.1",
            "--port",
            "9011",
            "--enforce-eager",
            "--gpu-memory-utilization",
            "0.5",
            "--max-model-len",
            "512",
            "--tensor-parallel-size",
            "1",
        ]
        assert proc["cmd"][0].endswith("vllm")
    else:
        assert proc["cmd"] == [
            sys.executable,
            "-m",
            "sglang.launch_server",
            "--model-path",
            engine["model"],
            "--served-model-name",
            "tiny",
            "--host",
            "127.0.0.1",
            "--port",
            "9011",
            "--context-length",
            "512",
            "--mem-fraction-static",
            "0.5",
            "--tp-size",
            "1",
        ]
    assert proc["env"] == {} and proc["url"] == "http://127.0.0.1:9011"
    assert front["name"] == "frontdoor" and front["url"] == "http://127.0.0.1:9010"
    assert front["cmd"][1:3] == ["-m", "flagscale.serve.frontdoor"]


def test_visible_devices_follow_the_device_manifest(engine, tmp_path):
    plan = _dryrun(
        engine,
        tmp_path,
        "+experiment.runner.device=cuda",
        "+experiment.runner.visible_devices='0,1'",
        "+experiment.envs.NCCL_DEBUG=WARN",
    )
    assert plan["processes"][0]["env"] == {"CUDA_VISIBLE_DEVICES": "0,1", "NCCL_DEBUG": "WARN"}
    plan = _dryrun(engine, tmp_path, "+experiment.runner.device=ascend", "+experiment.runner.visible_devices=3")
    assert plan["processes"][0]["env"] == {"ASCEND_RT_VISIBLE_DEVICES": "3"}


def test_unknown_engine_argument_is_refused_with_the_nearest_flag(engine, tmp_path):
    typo, meant = {"vllm": ("max_model_lenn", "max_model_len"), "sglang": ("context_lenght", "context_length")}[
        engine["name"]
    ]
    result = flagscale(
        "serve",
        str(CONF),
        f"serve=tiny_{engine['name']}",
        f"experiment.exp_dir={tmp_path}",
        f"+serve.0.engine_args.{typo}=1",
        env=engine["env"],
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert (
        f"serve[0].engine_args.{typo}: the engine has no --{typo.replace('_', '-')} argument (did you mean "
        f"{meant}?)" in result.stderr
    )
    assert not (tmp_path / "pids").exists()


def test_boolean_flags_follow_the_engine(engine, tmp_path):
    if engine["name"] == "vllm":  # BooleanOptionalAction: false is --no-flag
        plan = _dryrun(engine, tmp_path, "serve.0.engine_args.enforce_eager=false")
        assert "--no-enforce-eager" in plan["processes"][0]["cmd"]
    else:  # store_true: false is the default, nothing to pass
        plan = _dryrun(engine, tmp_path, "+serve.0.engine_args.trust_remote_code=false")
        assert "--trust-remote-code" not in plan["processes"][0]["cmd"]
        plan = _dryrun(engine, tmp_path, "+serve.0.engine_args.trust_remote_code=true")
        assert "--trust-remote-code" in plan["processes"][0]["cmd"]


def test_infer_dryrun_and_argument_check(engine, tmp_path):
    plan = _dryrun(engine, tmp_path, command="infer")
    assert plan["cmd"] == [sys.executable, "-m", "flagscale.infer.batch", str(tmp_path / "infer.json")]
    assert plan["settings"]["engine"] == engine["name"] and plan["settings"]["model"] == engine["model"]
    result = flagscale(
        "infer",
        str(CONF),
        f"infer=tiny_{engine['name']}",
        f"experiment.exp_dir={tmp_path}",
        "+infer.engine_args.no_such_arg=1",
        env=engine["env"],
        cwd=tmp_path,
    )
    assert result.returncode == 2 and f"{engine['name']} takes no such argument" in result.stderr


def test_the_patched_vllm_package_imports(engine):
    if engine["name"] != "vllm":
        pytest.skip("SGLang's package import needs its runtime dependencies (pybase64, ...), not installable here")
    code = "import vllm, vllm.entrypoints.cli.main; print(vllm.__version__, vllm.__file__)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(engine["site"]), "PATH": "/usr/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    version, path = result.stdout.split()
    assert version == "0.33.0" and path.startswith(str(engine["site"]))
    assert "+empty.fs.cpu." in engine["wheel"].name


def _gpu() -> bool:
    return (
        shutil.which("nvidia-smi") is not None
        and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
    )


@pytest.mark.skipif(not _gpu(), reason="needs a GPU: vLLM/SGLang cannot run a model on these CPUs")
def test_serves_for_real_on_a_gpu(engine, tmp_path):  # pragma: no cover - GPU runners only
    result = flagscale(
        "serve",
        str(CONF),
        f"serve=tiny_{engine['name']}",
        f"experiment.exp_dir={tmp_path}",
        env=engine["env"],
        cwd=tmp_path,
        timeout=900,
    )
    try:
        assert result.returncode == 0, result.stderr
    finally:
        flagscale(
            "serve",
            str(CONF),
            f"serve=tiny_{engine['name']}",
            f"experiment.exp_dir={tmp_path}",
            "action=stop",
            env=engine["env"],
            cwd=tmp_path,
        )
