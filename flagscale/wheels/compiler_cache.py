"""Compiled backends (llama.cpp; vLLM/SGLang kernels where a device compiles them) build through ccache.

Every backend wheel builds in a fresh folder, so without a compiler cache a one-line patch change
recompiles everything. With Debian's `ccache` on the PATH, CMake gets it as the C/C++/CUDA compiler
launcher (the CMAKE_<LANG>_COMPILER_LAUNCHER environment variables, CMake >= 3.17, and -D in CMAKE_ARGS
for scikit-build-core and vLLM's setup.py), with

* one cache folder per (backend, device, build flags) inside the FlagScale cache
  (`<cache>/ccache/<backend>-<device>-<flags hash>`), so devices and flag sets never share objects;
* CCACHE_BASEDIR = the build's source folder and the build folder inside it (scikit-build-core's
  SKBUILD_BUILD_DIR), so the absolute paths of a fresh temporary folder become the same relative paths
  every time, and CCACHE_NOHASHDIR so the working directory is not hashed either.

Then only the objects whose sources a patch changed are compiled again. FLAGSCALE_CCACHE=0 turns it off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

DISABLE_ENV = "FLAGSCALE_CCACHE"  # "0": build without the compiler cache
LAUNCHERS = ("CMAKE_C_COMPILER_LAUNCHER", "CMAKE_CXX_COMPILER_LAUNCHER", "CMAKE_CUDA_COMPILER_LAUNCHER")
_said: set[str] = set()


def ccache_dir(cache_root: Path, backend: str, device: str | None, flags: dict) -> Path:
    """The cache folder of one (backend, device, build flags) combination."""
    digest = hashlib.sha256(json.dumps(flags, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root / "ccache" / f"{backend}-{device or 'none'}-{digest}"


def compiler_cache_env(
    env: dict[str, str], cache_root: Path, backend: str, device: str | None, flags: dict, work: Path
) -> dict[str, str]:
    """`env` (a build's environment) with ccache as CMake's compiler launcher; unchanged without ccache."""
    if os.environ.get(DISABLE_ENV) == "0":
        return env
    exe = shutil.which("ccache")
    if exe is None:
        _say_once(
            "no-ccache",
            "ccache is not installed: compiled backends rebuild from scratch after every change "
            "(apt-get install ccache makes a one-patch rebuild recompile only what it touches)",
        )
        return env
    out = dict(env)
    out.update({name: exe for name in LAUNCHERS})
    defines = " ".join(f"-D{name}={exe}" for name in LAUNCHERS[:2])
    out["CMAKE_ARGS"] = f"{env['CMAKE_ARGS']} {defines}" if env.get("CMAKE_ARGS") else defines
    out.update(
        CCACHE_DIR=str(ccache_dir(cache_root, backend, device, flags)),
        CCACHE_BASEDIR=str(work),
        CCACHE_NOHASHDIR="1",
        SKBUILD_BUILD_DIR=str(work / "_flagscale_build"),  # inside the base dir: the same relative paths
    )
    return out


def _say_once(key: str, message: str) -> None:
    if key not in _said:
        _said.add(key)
        log.warning("%s", message)
