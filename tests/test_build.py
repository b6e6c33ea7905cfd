"""The PEP 517 build backend: strict config settings, and real builds with real pip, `python -m build`,
real venvs and the real release sdists (integration tests).

Real builds use one build cache that lives beside the sdists the integration tests keep
(`real_cache_dir()/build-cache`), so a re-run reuses patched trees and backend wheels. Tests that must
start cold (a killed build, two builds at once, a broken patch) use a fresh cache seeded with the
verified megatron sdist, so they download nothing.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from conftest import REPO_ROOT, real_cache_dir

from build_backend import get_requires_for_build_sdist, get_requires_for_build_wheel
from build_backend.settings import KNOWN_KEYS, SettingsError, parse_settings
from flagscale.errors import FlagScaleError
from flagscale.patches.series import series_for
from flagscale.patches.tree import patched_tree
from flagscale.upstream.cache import Cache
from flagscale.upstream.index import sha256_file
from flagscale.upstream.project import Project
from flagscale.upstream.sources import fetch_sdist, tree_digest
from flagscale.upstream.target import Target
from flagscale.wheels.backend_wheel import PROVENANCE_FILE, device_settings
from flagscale.wheels.device_wheel import BuildSettings
from flagscale.wheels.wheelfile import read_dist_info_file

SETTINGS_ENV = ("FLAGSCALE_DEVICE", "FLAGSCALE_BACKEND", "FLAGSCALE_UPSTREAM_SOURCE")
MEGATRON_CPU = ["-C", "device=cpu", "-C", "backend=megatron"]
BUILD_TIMEOUT = 900


def build_cache_dir() -> Path:
    return real_cache_dir() / "build-cache"


# ------------------------------------------------------------------------------------- helpers


def clean_env(cache: Path, **extra: str) -> dict[str, str]:
    """The environment of a real build: our cache, and none of the caller's FlagScale settings."""
    drop = {*SETTINGS_ENV, "FLAGSCALE_ROOT", "SOURCE_DATE_EPOCH", "PIP_CONSTRAINT", "PYTHONPATH", "VIRTUAL_ENV"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("_PYPROJECT_HOOKS_", "PEP517_"))}
    env["FLAGSCALE_CACHE_DIR"] = str(cache)
    env.update(extra)
    return env


def run(
    cmd: list, env: dict, cwd: Path = REPO_ROOT, ok: bool = True, timeout: int = BUILD_TIMEOUT
) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if ok and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} exited {result.returncode}\n{(result.stdout + result.stderr)[-6000:]}"
        )
    return result


def seeded_cache(path: Path, real_project: Project, backend: str = "megatron") -> Cache:
    """A fresh cache holding only the backend's verified sdist (copied from the build cache)."""
    pin = real_project.pins.resolve(backend)
    archive = fetch_sdist(pin, Cache(build_cache_dir()))
    entry = path / "sdists" / pin.sdist.sha256
    entry.mkdir(parents=True)
    shutil.copy2(archive, entry / archive.name)
    return Cache(path)


def working_tree_copy(dest: Path) -> Path:
    """Every file of this checkout that git would see (tracked, or untracked and not ignored)."""
    listed = (
        subprocess.run(
            ["git", "-C", str(REPO_ROOT), "ls-files", "-z", "-co", "--exclude-standard"],
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, listed):
        src = REPO_ROOT / rel
        if src.is_file():  # not the submodule gitlinks
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def only(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, (pattern, found)
    return found[0]


def record_ok(wheel: Path) -> None:
    """Every entry of the wheel is in its RECORD with the right sha256 and size."""
    with zipfile.ZipFile(wheel) as zin:
        assert zin.testzip() is None
        names = zin.namelist()
        (record,) = [n for n in names if n.endswith(".dist-info/RECORD")]
        rows = {r[0]: r for r in csv.reader(io.StringIO(zin.read(record).decode())) if r}
        assert set(rows) == set(names)
        for name in names:
            if name == record:
                continue
            data = zin.read(name)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert rows[name][1:] == [f"sha256={digest}", str(len(data))], name


def portable_contents(wheel: Path) -> dict[str, bytes]:
    """A wheel's entries less compiled objects (those embed the build's temporary paths) and RECORD."""
    with zipfile.ZipFile(wheel) as zin:
        return {n: zin.read(n) for n in zin.namelist() if not n.endswith((".so", "/RECORD"))}


def provenance_of(wheel: Path) -> dict:
    data = read_dist_info_file(wheel, PROVENANCE_FILE)
    assert data is not None, f"{wheel.name} carries no {PROVENANCE_FILE}"
    return json.loads(data)


def requires_dist(wheel: Path) -> list[str]:
    data = read_dist_info_file(wheel, "METADATA").decode()
    return [
        line[len("Requires-Dist: ") :]
        for line in data.split("\n\n")[0].splitlines()
        if line.startswith("Requires-Dist: ")
    ]


def expected_patches(project: Project, backend: str, device: str) -> list[tuple[str, str]]:
    return [(s.label, name) for s in series_for(project, backend, device) for name in s.names]


def wheel_entries(cache: Path) -> dict[str, tuple[int, tuple[tuple[str, str], ...]]]:
    """wheels/<key> -> (mtime, (file, sha256)...): what a no-change rebuild must leave alone."""
    out = {}
    for entry in sorted((cache / "wheels").iterdir()) if (cache / "wheels").is_dir() else ():
        if entry.is_dir() and not entry.name.startswith("."):
            out[entry.name] = (
                entry.stat().st_mtime_ns,
                tuple((f.name, sha256_file(f)) for f in sorted(entry.iterdir())),
            )
    return out


def leftovers(cache: Path) -> list[Path]:
    """Half-built entries a killed builder could have left in the cache."""
    return [
        p
        for kind in ("sdists", "sources", "trees", "wheels")
        if (cache / kind).is_dir()
        for p in (cache / kind).iterdir()
        if ".tmp-" in p.name
    ]


# ------------------------------------------------------------------------ 1. settings (fast)


@pytest.fixture
def no_settings_env(monkeypatch):
    for var in (*SETTINGS_ENV, "FLAGSCALE_ROOT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(REPO_ROOT)


def settings(config: dict | None) -> BuildSettings:
    return parse_settings(config, root=REPO_ROOT)


def test_unknown_key_names_valid_keys_and_nearest(no_settings_env):
    with pytest.raises(SettingsError) as info:
        settings({"devise": "cpu"})
    message = str(info.value)
    assert "unknown config setting 'devise'" in message
    assert "did you mean 'device'" in message
    assert "valid settings: device, backend, upstream-source" in message
    assert KNOWN_KEYS == ("device", "backend", "upstream-source")
    with pytest.raises(SettingsError, match="did you mean 'backend'"):
        settings({"device": "cpu", "backends": "megatron"})


def test_key_spelling_and_pip_pass_through_options(no_settings_env):
    assert settings({"DEVICE": "cpu", "upstream_source": "sdist", "--build-option": ["--x"]}) == BuildSettings(
        "cpu", (), "sdist"
    )


def test_unknown_values_name_the_nearest(no_settings_env):
    with pytest.raises(SettingsError) as info:
        settings({"device": "cpx", "backend": "megatron"})
    message = str(info.value)
    assert "unknown device 'cpx'" in message and "did you mean 'cpu'" in message
    for name in Project(REPO_ROOT).devices:
        assert name in message  # the valid devices are listed
    with pytest.raises(SettingsError) as info:
        settings({"device": "cpu", "backend": "megatorn"})
    message = str(info.value)
    assert "unknown backend 'megatorn'" in message and "did you mean 'megatron'" in message
    assert "valid backends: megatron, vllm, sglang, llama.cpp" in message
    with pytest.raises(SettingsError, match="upstream-source='gitt'.*auto, submodule, sdist"):
        settings({"upstream-source": "gitt"})


def test_aliases_are_accepted(no_settings_env, tmp_path):
    assert settings({"device": "cpu", "backend": "Megatron-LM"}) == BuildSettings("cpu", ("megatron",))
    assert settings({"device": "gpu", "backend": "megatron"}).device == "cuda"
    assert settings({"device": "NPU", "backend": "vllm"}) == BuildSettings("ascend", ("vllm",))
    assert settings({"device": "npu", "backend": "mcore,vllm-project, Megatron-LM"}).backends == ("megatron", "vllm")
    assert settings({"device": "cpu", "backend": ["megatron", "llama_cpp"]}).backends == ("megatron", "llama.cpp")
    assert settings({"upstream-source": str(tmp_path)}).upstream_source == str(tmp_path)


def test_no_device_is_the_plain_wheel_but_a_backend_needs_one(no_settings_env):
    assert settings(None) == BuildSettings(None, (), "auto")
    assert settings({"device": "none"}) == BuildSettings(None, (), "auto")
    with pytest.raises(SettingsError, match=r"backend=\.\.\. needs a device: add -C device=cpu"):
        settings({"backend": "megatron"})


def test_environment_is_used_without_config_settings(no_settings_env, monkeypatch):
    monkeypatch.setenv("FLAGSCALE_DEVICE", "gpu")
    monkeypatch.setenv("FLAGSCALE_BACKEND", "vllm,megatron")
    monkeypatch.setenv("FLAGSCALE_UPSTREAM_SOURCE", "sdist")
    assert settings(None) == BuildSettings("cuda", ("vllm", "megatron"), "sdist")
    assert settings({}) == BuildSettings("cuda", ("vllm", "megatron"), "sdist")
    monkeypatch.setenv("FLAGSCALE_DEVICE", "tpu")
    with pytest.raises(SettingsError, match="unknown device 'tpu'"):
        settings(None)  # a bad environment value fails as loudly as a bad -C


def test_config_settings_win_over_environment(no_settings_env, monkeypatch):
    monkeypatch.setenv("FLAGSCALE_DEVICE", "cuda")
    monkeypatch.setenv("FLAGSCALE_BACKEND", "vllm")
    assert settings({"device": "cpu"}) == BuildSettings("cpu", ("vllm",))
    assert settings({"backend": "sglang", "device": "ascend"}) == BuildSettings("ascend", ("sglang",))


def hook_error(capsys, hook, *args) -> str:
    """A PEP 517 hook's refusal as pip sees it: exit status 2 and one `error:` line on stderr, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        hook(*args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_hooks_validate_settings_first(no_settings_env, capsys):
    assert "did you mean 'device'" in hook_error(capsys, get_requires_for_build_wheel, {"devise": "cpu"})
    assert "unknown backend" in hook_error(capsys, get_requires_for_build_sdist, {"device": "cpu", "backend": "nope"})
    # the plain toolchain wheel needs only flit's requirements
    assert get_requires_for_build_wheel(None) == []


@pytest.fixture
def tpu_project(tmp_path, monkeypatch):
    """A project copy with one more device, `tpu`, that supports only megatron."""
    project = Project(working_tree_copy(tmp_path / "project"))  # pyproject.toml too: the hooks run in it
    (project.root / "hardware" / "tpu").mkdir()
    (project.root / "hardware" / "tpu" / "device.toml").write_text(
        '[device]\nname = "tpu"\naliases = ["xla"]\nbackends = ["megatron"]\n'
    )
    for var in (*SETTINGS_ENV, "FLAGSCALE_ROOT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FLAGSCALE_CACHE_DIR", str(tmp_path / "cache"))
    return Project(project.root)


def test_backend_the_device_does_not_support(tpu_project, monkeypatch, capsys):
    dev, build = device_settings(Target.of(tpu_project, "megatron", "xla"))
    assert dev.name == "tpu" and build.environ() == {}
    with pytest.raises(FlagScaleError) as info:
        device_settings(Target.of(tpu_project, "vllm", "tpu"))
    message = str(info.value)
    assert "device tpu does not support backend vllm; it supports megatron" in message
    assert str(tpu_project.root / "hardware" / "tpu" / "device.toml") in message
    # through the PEP 517 hook pip calls first, before anything is fetched or built
    monkeypatch.chdir(tpu_project.root)
    assert parse_settings({"device": "tpu", "backend": "vllm"}) == BuildSettings("tpu", ("vllm",))
    refused = hook_error(capsys, get_requires_for_build_wheel, {"device": "tpu", "backend": "vllm"})
    assert "device tpu does not support backend vllm" in refused
    assert not (tpu_project.root.parent / "cache").exists()


def test_settings_follow_flagscale_root(tpu_project, monkeypatch, tmp_path):
    """The settings are checked against the checkout the build uses ($FLAGSCALE_ROOT), not the cwd's."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("FLAGSCALE_ROOT", str(tpu_project.root))
    assert parse_settings({"device": "xla", "backend": "megatron"}).device == "tpu"


def test_device_name_with_a_dash_gives_a_valid_wheel_name(tmp_path, monkeypatch):
    """Device names may hold `-`/`_`; in a version's local label they must become `.` (else the wheel
    file name has one `-` too many and pip refuses it)."""
    from packaging.utils import parse_wheel_filename
    from packaging.version import Version

    from build_backend import build_wheel

    root = working_tree_copy(tmp_path / "project")
    (root / "hardware" / "my-chip").mkdir()
    (root / "hardware" / "my-chip" / "device.toml").write_text('[device]\nname = "my-chip"\nbackends = ["megatron"]\n')
    for var in (*SETTINGS_ENV, "FLAGSCALE_ROOT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FLAGSCALE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(root)
    name = build_wheel(str(tmp_path / "out"), {"device": "my-chip"})
    assert name == "flagscale-0.1.0+my.chip-py3-none-any.whl"
    assert parse_wheel_filename(name)[1] == Version("0.1.0+my-chip")
    wheel = tmp_path / "out" / name
    assert provenance_of(wheel)["device"] == "my-chip" and provenance_of(wheel)["backends"] == []
    record_ok(wheel)
    with zipfile.ZipFile(wheel) as zin:  # the project data `flagscale install` needs once installed
        assert "flagscale/_project/third_party/upstreams.toml" in zin.namelist()
        assert "flagscale/_project/hardware/my-chip/device.toml" in zin.namelist()
    plain = build_wheel(str(tmp_path / "plain"), None)
    assert plain == "flagscale-0.1.0-py3-none-any.whl"


# ------------------------------------------------------------- 2. pip install into a fresh venv


@pytest.fixture(scope="module")
def megatron_venv(tmp_path_factory) -> Path:
    """One venv: `pip install -c constraints.txt . -C device=cpu -C backend=megatron` from the repo root."""
    venv = tmp_path_factory.mktemp("venv") / "v"
    env = clean_env(build_cache_dir())
    run([sys.executable, "-m", "venv", venv], env)
    run([venv / "bin" / "pip", "install", "-c", "constraints.txt", ".", *MEGATRON_CPU], env)
    return venv


def venv_python(venv: Path, code: str) -> str:
    return run([venv / "bin" / "python", "-c", code], clean_env(build_cache_dir()), cwd=venv).stdout


def doctor(venv: Path) -> subprocess.CompletedProcess:
    return run([venv / "bin" / "flagscale", "doctor"], clean_env(build_cache_dir()), cwd=venv, ok=False)


def site_packages(venv: Path) -> Path:
    return Path(venv_python(venv, "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())


@pytest.mark.integration
def test_pip_install_builds_and_installs_the_cell(megatron_venv, real_project):
    versions = json.loads(
        venv_python(
            megatron_venv,
            "import importlib.metadata as m, json; print(json.dumps("
            "[m.version(d) for d in ('flagscale', 'megatron-core', 'torch')]))",
        )
    )
    flagscale, megatron, torch = versions
    assert flagscale == "0.1.0+cpu"
    assert re.fullmatch(r"0\.16\.1\+fs\.cpu\.[0-9a-f]{8}", megatron), megatron
    assert torch == "2.13.0+cpu"  # the constraints kept the pre-cached CPU torch

    device_utils = site_packages(megatron_venv) / "megatron" / "core" / "device_utils.py"
    assert device_utils.is_file() and "MEGATRON_DEVICE_TYPE" in device_utils.read_text()
    out = venv_python(
        megatron_venv, "import megatron.core, megatron.core.device_utils as d; print(megatron.core.__file__)"
    )
    assert out.startswith(str(site_packages(megatron_venv)))

    prov = json.loads(
        venv_python(
            megatron_venv,
            "import importlib.metadata as m; print(m.distribution('flagscale').read_text('flagscale_build.json'))",
        )
    )
    assert prov["device"] == "cpu" and prov["settings"]["backend"] == ["megatron"]
    (backend,) = prov["backends"]
    assert backend["version"] == megatron and backend["device"] == "cpu"
    assert [(p["series"], p["name"]) for p in backend["patches"]] == expected_patches(real_project, "megatron", "cpu")
    cached = build_cache_dir() / "wheels" / backend["key"] / backend["wheel"]
    assert sha256_file(cached) == backend["wheel_sha256"]

    result = doctor(megatron_venv)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "megatron" in result.stdout and megatron in result.stdout and " ok " in result.stdout


@pytest.mark.integration
def test_doctor_names_an_overwritten_patched_file(megatron_venv):
    target = site_packages(megatron_venv) / "megatron" / "core" / "device_utils.py"
    original = target.read_bytes()
    try:
        target.write_bytes(original.replace(b"MEGATRON_DEVICE_TYPE", b"MEGATRON_DEVICE_KIND"))
        result = doctor(megatron_venv)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "changed: megatron/core/device_utils.py" in result.stdout
    finally:
        target.write_bytes(original)
    assert doctor(megatron_venv).returncode == 0


@pytest.mark.integration
def test_doctor_notices_a_plain_reinstall(megatron_venv):
    pip = [megatron_venv / "bin" / "pip", "install", "--no-deps", "-c", "constraints.txt", "megatron-core==0.16.1"]
    env = clean_env(build_cache_dir())
    # PEP 440: 0.16.1+fs.cpu.… satisfies ==0.16.1, so a plain install keeps FlagScale's build ...
    result = run(pip, env)
    assert "Requirement already satisfied" in result.stdout
    assert doctor(megatron_venv).returncode == 0
    # ... and one that forces the index's wheel replaces it, which doctor reports
    run([*pip, "--force-reinstall"], env)
    assert (
        venv_python(megatron_venv, "import importlib.metadata as m; print(m.version('megatron-core'))").strip()
        == "0.16.1"
    )
    result = doctor(megatron_venv)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "replaced by 0.16.1 without FlagScale's patches" in result.stdout


# ----------------------------------------------------------- 3. a no-change rebuild is a cache hit


@pytest.mark.integration
def test_pip_wheel_twice_is_byte_identical_and_cached(tmp_path):
    cache = build_cache_dir()
    env = clean_env(cache)
    wheels = []
    snapshots = []
    for n in (1, 2):
        out = tmp_path / f"out{n}"
        run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-w", out, *MEGATRON_CPU], env)
        wheels.append(only(out, "flagscale-0.1.0+cpu-py3-none-any.whl"))
        prov = provenance_of(wheels[-1])
        (backend,) = prov["backends"]
        log = only(cache / "logs", f"megatron-cpu-{backend['key'][:12]}.log")
        snapshots.append((wheel_entries(cache)[backend["key"]], log.stat().st_size, log.stat().st_mtime_ns))
    first, second = wheels
    assert sha256_file(first) == sha256_file(second)
    assert first.read_bytes() == second.read_bytes()
    # the second build reused the cached backend wheel: same entry (mtime), same file, nothing built (log
    # untouched). The build cache may be shared with other test runs, so only this cell's entry is compared.
    assert snapshots[0] == snapshots[1]
    (backend,) = provenance_of(second)["backends"]
    backend_wheel = cache / "wheels" / backend["key"] / backend["wheel"]
    assert sha256_file(backend_wheel) == backend["wheel_sha256"]
    # pinned to the Python the backend wheel was built for (a universal lock, uv sync, needs it nowhere else)
    assert f'megatron_core @ {backend_wheel.as_uri()} ; python_version == "3.11"' in requires_dist(second)
    assert "torch==2.13.0" in requires_dist(second)  # the cpu device's runtime requirement
    record_ok(second)
    record_ok(backend_wheel)
    assert read_dist_info_file(backend_wheel, PROVENANCE_FILE) is not None


# ------------------------------------- 4. python -m build for the ascend device, and the other cpu cells

BACKEND_WHEELS = {
    "megatron": r"megatron_core-0\.16\.1\+fs\.{device}\.[0-9a-f]{{8}}-cp311-cp311-linux_x86_64\.whl",
    # vLLM's own local label (+empty, the Python-only target) is kept in front of ours
    "vllm": r"vllm-0\.33\.0\+empty\.fs\.{device}\.[0-9a-f]{{8}}-cp311-cp311-linux_x86_64\.whl",
    "sglang": r"sglang-0\.5\.10\.post1\+fs\.{device}\.[0-9a-f]{{8}}-py3-none-any\.whl",
}
# The ascend cells build here (the chip is only needed to run them). The cpu cells of vLLM and SGLang
# build here too but cannot run a model on this CPU (see DESIGN.md); megatron's and llama.cpp's cpu
# cells run end to end in test_megatron_cpu.py and the serve tests.
BUILT_CELLS = [("ascend", b) for b in BACKEND_WHEELS] + [("cpu", "vllm"), ("cpu", "sglang")]


@pytest.mark.integration
@pytest.mark.parametrize("device, backend", BUILT_CELLS)
def test_python_build_of_a_cell(device, backend, tmp_path, real_project):
    cache = build_cache_dir()
    out = tmp_path / "dist"
    run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--outdir",
            out,
            "-C",
            f"device={device}",
            "-C",
            f"backend={backend}",
        ],
        clean_env(cache),
    )
    wheel = only(out, "*.whl")
    assert wheel.name == f"flagscale-0.1.0+{device}-py3-none-any.whl"
    prov = provenance_of(wheel)
    assert prov["device"] == device and prov["settings"]["device"] == device
    (built,) = prov["backends"]
    assert built["backend"] == backend and built["device"] == device
    patches = [(p["series"], p["name"]) for p in built["patches"]]
    assert patches == expected_patches(real_project, backend, device)
    assert all(len(p["sha256"]) == 64 for p in built["patches"])
    if (real_project.device_series_dir(device, backend) / "series").is_file():
        assert any(series == f"device:{device}" for series, _ in patches), patches
    assert built["upstream"]["sdist"]["sha256"] == real_project.pins.resolve(backend).sdist.sha256
    assert re.fullmatch(BACKEND_WHEELS[backend].format(device=device), built["wheel"]), built["wheel"]
    backend_wheel = cache / "wheels" / built["key"] / built["wheel"]
    assert sha256_file(backend_wheel) == built["wheel_sha256"]
    assert provenance_of(backend_wheel)["device"] == device
    record_ok(backend_wheel)
    requires = requires_dist(wheel)
    marker = ' ; python_version == "3.11"' if "-cp311-" in backend_wheel.name else ""
    assert f"{built['distribution']} @ {backend_wheel.as_uri()}{marker}" in requires
    assert all(r in requires for r in prov["runtime_requires"])
    if backend == "vllm":
        assert built["build"]["env"]["VLLM_TARGET_DEVICE"] == "empty"


# --------------------------------------------------------------------------------- 5. bad input


@pytest.mark.integration
def test_corrupted_cached_sdist_is_downloaded_again(tmp_path, real_project, caplog):
    cache = seeded_cache(tmp_path / "cache", real_project)
    pin = real_project.pins.resolve("megatron")
    archive = only(cache.root / "sdists" / pin.sdist.sha256, "*.tar.gz")
    good = sha256_file(archive)
    archive.write_bytes(archive.read_bytes()[:4096] + b"\0" * 1024)  # truncated and damaged
    os.chmod(archive, 0o444)
    os.chmod(archive.parent, 0o555)  # as the cache leaves entries: read-only
    tree = patched_tree(Target.of(real_project, "megatron", "cpu", "sdist", cache))
    assert sha256_file(only(cache.root / "sdists" / pin.sdist.sha256, "*.tar.gz")) == good
    assert "corrupted" in caplog.text
    reference = patched_tree(Target.of(real_project, "megatron", "cpu", "sdist", Cache(build_cache_dir())))
    assert tree.key == reference.key
    assert tree_digest(tree.path) == tree_digest(reference.path)
    assert leftovers(cache.root) == []


@pytest.mark.integration
def test_patch_that_no_longer_applies(tmp_path, real_project):
    project = working_tree_copy(tmp_path / "project")
    patch = project / "patches" / "megatron" / "0002-tensor-parallel-rng.patch"
    lines = patch.read_text().split("\n")
    hunks = [i for i, line in enumerate(lines) if line.startswith("@@")]
    i = next(i for i in range(hunks[1] + 1, hunks[2]) if lines[i].startswith(" ") and lines[i].strip())
    lines[i] += "  # drifted upstream"  # hunk 2's context no longer matches the pinned source
    patch.write_text("\n".join(lines))
    cache = seeded_cache(tmp_path / "cache", real_project)
    out = tmp_path / "out"
    result = run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-w", out, *MEGATRON_CPU],
        clean_env(cache.root),
        cwd=project,
        ok=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "0002-tensor-parallel-rng.patch: megatron/core/tensor_parallel/random.py: hunk 2" in output
    assert "does not apply to Megatron-LM core_v0.16.1" in output and "no fuzz" in output
    assert not out.exists() or not list(out.iterdir())
    for kind in ("trees", "wheels"):
        assert not (cache.root / kind).exists() or not [
            p for p in (cache.root / kind).iterdir() if not p.name.endswith(".lock")
        ], kind
    assert leftovers(cache.root) == []


def _start_build(out: Path, cache: Path, log: Path) -> subprocess.Popen:
    with open(log, "wb") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-w", str(out), *MEGATRON_CPU],
            cwd=REPO_ROOT,
            env=clean_env(cache),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _finish(proc: subprocess.Popen, log: Path) -> None:
    try:
        code = proc.wait(timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert code == 0, log.read_text(errors="replace")[-6000:]


@pytest.mark.integration
def test_build_killed_midway_leaves_no_poisoned_cache(tmp_path, real_project):
    cache = seeded_cache(tmp_path / "cache", real_project).root
    proc = _start_build(tmp_path / "killed", cache, tmp_path / "killed.log")
    try:
        deadline = time.monotonic() + BUILD_TIMEOUT
        while not any(p.stat().st_size for p in cache.glob("logs/megatron-cpu-*.log")):
            assert proc.poll() is None, (tmp_path / "killed.log").read_text(errors="replace")[-4000:]
            assert time.monotonic() < deadline, "the upstream build never started"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # pip, our backend and the upstream's setuptools, all at once
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert wheel_entries(cache) == {}, "a killed build published a wheel"
    assert [p for p in leftovers(cache) if p.parent.name == "wheels"], "the build was not killed mid-way"
    assert not (tmp_path / "killed").exists() or not list((tmp_path / "killed").glob("*.whl"))

    out = tmp_path / "out"
    log = tmp_path / "rerun.log"
    _finish(_start_build(out, cache, log), log)
    (backend,) = provenance_of(only(out, "flagscale-*.whl"))["backends"]
    (key,) = wheel_entries(cache)
    assert key == backend["key"]
    rebuilt = cache / "wheels" / key / backend["wheel"]
    record_ok(rebuilt)
    assert leftovers(cache) == []  # the stale half entry was removed by the next builder
    reference = build_cache_dir() / "wheels" / key / backend["wheel"]
    if reference.is_file():  # same inputs as the shared build cache's entry: the same files
        assert portable_contents(rebuilt) == portable_contents(reference)


@pytest.mark.integration
def test_two_builds_of_the_same_cell_at_once(tmp_path, real_project):
    cache = seeded_cache(tmp_path / "cache", real_project).root
    procs = [
        (_start_build(tmp_path / f"out{n}", cache, tmp_path / f"b{n}.log"), tmp_path / f"b{n}.log") for n in (1, 2)
    ]
    for proc, log in procs:
        _finish(proc, log)
    first, second = (only(tmp_path / f"out{n}", "flagscale-0.1.0+cpu-py3-none-any.whl") for n in (1, 2))
    assert first.read_bytes() == second.read_bytes()
    (backend,) = provenance_of(first)["backends"]
    assert list(wheel_entries(cache)) == [backend["key"]]
    assert leftovers(cache) == []
    built = cache / "wheels" / backend["key"] / backend["wheel"]
    record_ok(built)
    # one builder built, the other waited on the entry's lock and reused it
    build_log = only(cache / "logs", "megatron-cpu-*.log").read_text(errors="replace")
    assert build_log.count("running bdist_wheel") == 1


# ---------------------------------------------------- 6. flagscale build (wheelhouse) and install


@pytest.mark.integration
def test_wheelhouse_serves_an_install_and_flagscale_install_reuses_the_build(tmp_path):
    env = clean_env(build_cache_dir())
    house = tmp_path / "wheelhouse"
    result = run(
        [
            Path(sys.executable).parent / "flagscale",
            "build",
            "--device",
            "cpu",
            "--backend",
            "Megatron-LM",
            "-o",
            house,
        ],
        env,
    )
    flagscale_wheel = only(house, "flagscale-0.1.0+cpu-py3-none-any.whl")
    backend_wheel = only(house, "megatron_core-0.16.1+fs.cpu.*.whl")
    assert str(backend_wheel) in result.stdout and "megatron: fetching megatron-core 0.16.1" in result.stderr
    version = backend_wheel.name.split("-")[1]
    requires = requires_dist(flagscale_wheel)
    assert f"megatron-core=={version}" in requires or f"megatron_core=={version}" in requires, requires
    assert not any(" @ " in r for r in requires)  # plain pins: the folder can be served as an index
    record_ok(flagscale_wheel)

    venv = tmp_path / "v"
    run([sys.executable, "-m", "venv", venv], env)
    run([venv / "bin" / "pip", "install", "-c", "constraints.txt", "--find-links", house, "flagscale==0.1.0+cpu"], env)
    assert venv_python(venv, "import importlib.metadata as m; print(m.version('megatron-core'))").strip() == version
    assert doctor(venv).returncode == 0

    # `flagscale install` from inside that environment (its project data comes from the installed wheel)
    installed = run([venv / "bin" / "flagscale", "install", "--backend", "megatron"], env, cwd=venv)
    assert f"installed megatron_core {version} (cached build)" in installed.stdout, installed.stdout
    assert "megatron: building its wheel" not in installed.stderr
    assert venv_python(venv, "import importlib.metadata as m; print(m.version('torch'))").strip() == "2.13.0+cpu"
    assert doctor(venv).returncode == 0

    bad = run([venv / "bin" / "flagscale", "install", "--backend", "megatorn"], env, cwd=venv, ok=False)
    assert bad.returncode == 2 and "did you mean 'megatron'" in bad.stderr


# --------------------------------------------------------------- 7. progress of a long compile


def test_a_long_compile_reports_its_progress(tmp_path):
    from flagscale.wheels.backend_wheel import _wait_reporting, compile_progress

    log = tmp_path / "build.log"
    assert compile_progress(log) is None  # no log yet
    log.write_bytes(b"-- configuring\n")
    assert compile_progress(log) is None
    # a real child that writes ninja-style steps into the log while we wait for it
    code = (
        "import sys, time\nfor i in range(1, 21):\n"
        "    print(f'[{i}/20] /usr/bin/g++ -c file{i}.cpp', flush=True); time.sleep(0.25)\n"
    )
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT)
    heard: list[str] = []
    assert _wait_reporting(proc, log, "llama.cpp", heard.append) == 0
    assert compile_progress(log) == (20, 20)
    assert heard, "nothing was reported during a 5 s compile"
    assert all(re.fullmatch(r"llama\.cpp: compiled \d+/20 \(\d+%\)", m) for m in heard), heard
    done = [int(m.split()[2].split("/")[0]) for m in heard]
    assert done == sorted(done) and len(heard) <= 11  # at most once per tenth


@pytest.mark.parametrize(
    "setting, expected",
    [
        ("devic=cpu", "unknown config setting 'devic' (did you mean 'device'?); valid settings: device, backend"),
        ("device=nochip", "unknown device 'nochip'; valid devices: "),
    ],
)
def test_pip_wheel_reports_a_bad_setting_in_one_line(tmp_path, setting, expected):
    """Tried as a new user would: plain `pip wheel . -C ...` prints our error as one line, no traceback."""
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS_ENV}
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO_ROOT), "--no-deps", "-C", setting, "-w", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    ours = [
        line.strip()
        for line in result.stdout.splitlines() + result.stderr.splitlines()
        if line.strip().startswith("error: ") and "subprocess-exited-with-error" not in line
    ]
    assert len(ours) == 1 and expected in ours[0], result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not list(tmp_path.glob("*.whl"))
