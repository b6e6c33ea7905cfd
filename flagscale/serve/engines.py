"""The command and environment that start one engine's OpenAI-compatible server.

`engine_args` keys are snake_case as in FlagScale task YAMLs and map onto the engine's own flags
(`ctx_size: 512` -> `--ctx-size 512`; `true` -> `--flag`; `false` -> `--no-flag` where the engine has
one, else nothing; a list repeats its values after one flag). Unknown keys are refused before anything
starts, checked against the flags the installed engine itself defines: llama-server's `--help`, the
argument dataclasses in the installed vLLM / SGLang sources (read, not imported: importing them pulls
torch and a GPU runtime), and the engine args of FlagScale's own transformers / diffusers server
(flagscale.serve.hf_engine, run with this Python).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flagscale.errors import ConfigError, LaunchError
from flagscale.runner.environment import visible_devices_environment
from flagscale.serve.settings import MEDIA_ENGINES, ModelSpec, ServeSettings
from flagscale.settings import closest

FLAG = re.compile(r"--[a-z0-9][a-z0-9-]*")
STRICT_MODEL_FLAG = "--strict-model-name"


@dataclass(frozen=True)
class EngineCommand:
    name: str  # process name in the run folder
    cmd: tuple[str, ...]
    env: tuple[tuple[str, str], ...]  # what we set on top of the inherited environment
    health_url: str
    base_url: str


# ------------------------------------------------------------------------------------------- flags
@functools.cache
def llama_server_flags(binary: str) -> frozenset[str]:
    result = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise LaunchError(
            f"{binary} --help failed (exit {result.returncode}): "
            f"{(result.stderr or result.stdout).strip().splitlines()[-1:]}"
        )
    return frozenset(FLAG.findall(result.stdout + result.stderr))


def _package_file(package: str, relative: str) -> Path | None:
    """A file of an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    return path if path.is_file() else None


def _dataclass_fields(path: Path, classes: set[str], negatable: bool = False) -> set[str]:
    """Field names of `classes` in the source file (plus `no_<field>` for bool fields when `negatable`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name in classes:
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    if not item.target.id.startswith("_"):
                        names.add(item.target.id)
                        if negatable and ast.unparse(item.annotation) == "bool":
                            names.add("no_" + item.target.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and FLAG.fullmatch(node.value):
            names.add(node.value[2:].replace("-", "_"))  # explicit parser.add_argument("--x") flags
    return names


# (package, file inside it, argument classes) whose fields are the server's flags. vLLM turns bool fields
# into BooleanOptionalAction (--x / --no-x); SGLang into store_true (--x only).
SOURCE_FLAGS = {
    "vllm": [
        ("vllm", "engine/arg_utils.py", {"EngineArgs", "AsyncEngineArgs"}),
        ("vllm", "entrypoints/common/cli_args.py", {"BaseFrontendArgs", "FrontendArgs"}),
    ],
    "sglang": [("sglang", "srt/server_args.py", {"ServerArgs"})],
}
NEGATABLE = {"vllm"}


@functools.cache
def python_engine_flags(engine: str) -> frozenset[str]:
    flags: set[str] = set()
    for package, relative, classes in SOURCE_FLAGS[engine]:
        path = _package_file(package, relative)
        if path is None:
            raise LaunchError(
                f"{engine} is not installed here ({package}/{relative} not found): flagscale install --backend={engine}"
            )
        flags |= _dataclass_fields(path, classes, engine in NEGATABLE)
    return frozenset("--" + f.replace("_", "-") for f in flags)


def to_flags(args: dict[str, Any], known: frozenset[str] | None, where: str) -> list[str]:
    """snake_case engine_args -> argv, refusing a key the engine does not define."""
    out: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if known is not None and flag not in known and not (value is False and f"--no-{flag[2:]}" in known):
            near = closest(flag, sorted(known), cutoff=0.75)
            hint = f" (did you mean {near[2:].replace('-', '_')}?)" if near else ""
            raise ConfigError(f"{where}.{key}: the engine has no {flag} argument{hint}")
        if value is None:
            continue
        if value is True:
            out.append(flag)
        elif value is False:
            if known is not None and f"--no-{flag[2:]}" in known:
                out.append(f"--no-{flag[2:]}")
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        elif isinstance(value, dict):
            out += [flag, json.dumps(value, sort_keys=True)]  # vLLM/SGLang take JSON for nested settings
        else:
            out += [flag, str(value)]
    return out


# ------------------------------------------------------------------------------------------ commands
def command_for(
    spec: ModelSpec, settings: ServeSettings, host: str, port: int, check: bool = True, name: str | None = None
) -> EngineCommand:
    """The server command of one model (one replica) bound to host:port."""
    where = f"serve[{settings.models.index(spec)}].engine_args" if spec in settings.models else "engine_args"
    args = spec.args
    model = str(args.pop("model"))
    if Path(model).exists():  # absolute: replicas and engines may run from another folder
        model = str(Path(model).resolve())
    if spec.engine == "llama.cpp":
        from flagscale.serve.binaries import llama_tool

        if Path(model).is_dir():  # an HF folder: its cached GGUF (flagscale.serve.gguf), converted at start
            from flagscale.serve import gguf

            gguf.check_folder(Path(model), f"{where}.model")
            model = str(gguf.cached_path(Path(model), gguf.options_of(spec, settings)))
        elif not Path(model).is_file():
            raise ConfigError(
                f"{where}.model={model}: no such GGUF file or Hugging Face model folder "
                "(a folder is converted to GGUF when the server starts)"
            )
        binary = str(llama_tool("llama-server"))
        flags = llama_server_flags(binary)
        known = flags if check else None
        # our patch 0003: a request naming another model gets 404, not this model's answer (a plain
        # llama.cpp build given with FLAGSCALE_LLAMA_CPP_BIN lacks the flag and answers any name)
        strict = [STRICT_MODEL_FLAG] if STRICT_MODEL_FLAG in flags else []
        cmd = [
            binary,
            "--model",
            model,
            "--alias",
            spec.name,
            *strict,
            "--host",
            host,
            "--port",
            str(port),
            *to_flags(args, known, where),
        ]
    elif spec.engine in MEDIA_ENGINES:
        cmd = _hf_engine(spec, settings, model, host, port, args, check, where)
    elif spec.engine == "vllm":
        known = python_engine_flags("vllm") if check else None
        cmd = [
            _console_script("vllm"),
            "serve",
            model,
            "--served-model-name",
            spec.name,
            "--host",
            host,
            "--port",
            str(port),
            *to_flags(args, known, where),
        ]
    else:
        known = python_engine_flags("sglang") if check else None
        cmd = [
            sys.executable,
            "-m",
            "sglang.launch_server",
            "--model-path",
            model,
            "--served-model-name",
            spec.name,
            "--host",
            host,
            "--port",
            str(port),
            *to_flags(args, known, where),
        ]
    env = {**dict(settings.envs), **visible_devices_environment(settings.device, settings.visible_devices)}
    connect = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"http://{connect}:{port}"
    return EngineCommand(name or spec.name, tuple(cmd), tuple(sorted(env.items())), f"{base}/health", base)


def _hf_engine(
    spec: ModelSpec, settings: ServeSettings, model: str, host: str, port: int, args: dict, check: bool, where: str
) -> list[str]:
    """flagscale.serve.hf_engine on this Python (the environment with the `multimodal` extra)."""
    from flagscale.infer import hf_models
    from flagscale.serve import hf_engine

    if check:  # the folder is the kind the engine loads: one line now, not a traceback in the engine's log
        if not Path(model).is_dir():
            raise ConfigError(f"{where}.model={model}: no such model folder ({spec.engine} serves a local folder)")
        if spec.engine == "diffusers":
            hf_models.check_pipeline_folder(model, args.get("pipeline"))
            if args.get("transformations"):
                from flagscale.transforms import parse

                parse(list(args["transformations"]), f"{where}.transformations")
        elif not (Path(model) / "config.json").is_file():
            raise ConfigError(f"{where}.model={model}: no config.json, not a transformers model folder")
    known = hf_engine.engine_flags(spec.engine) if check else None
    if "transformations" in args:  # a list of objects: one JSON argument (none when empty), not one per item
        args = dict(args)
        value = args.pop("transformations")
        if value:
            args["transformations"] = json.dumps(value)
    dirs = ["--media-dirs", *settings.media_dirs] if settings.media_dirs else []
    return [
        sys.executable,
        "-m",
        "flagscale.serve.hf_engine",
        "--engine",
        spec.engine,
        "--model",
        model,
        "--served-model-name",
        spec.name,
        "--host",
        host,
        "--port",
        str(port),
        "--media-dir",
        str(settings.media_dir),
        "--media-url",
        settings.media_url,
        "--max-image-bytes",
        str(settings.max_image_bytes),
        "--max-image-pixels",
        str(settings.max_image_pixels),
        *dirs,
        *to_flags(args, known, where),
    ]


def _console_script(name: str) -> str:
    """The engine's console script beside this Python (a venv's bin), else from PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


def full_env(command: EngineCommand) -> dict[str, str]:
    return {**os.environ, **dict(command.env)}
