"""Hugging Face model folder -> GGUF for llama.cpp, converted once and cached by content.

`flagscale serve` with the llama.cpp engine takes either a GGUF file or an HF folder (config.json, safetensors,
tokenizer) as `engine_args.model`. A folder is converted by the patched llama.cpp pin's own
`convert_hf_to_gguf.py` (third_party/upstreams.toml; the sdist's vendor/llama.cpp on machines without GitHub),
run with that tree's gguf-py, so the GGUF matches the llama.cpp that serves it; `quantize` then runs
`llama-quantize` of the installed backend wheel. Nothing is downloaded from the hub (HF_HUB_OFFLINE=1).

The result lives in the flagscale cache (`$FLAGSCALE_CACHE_DIR`, else `~/.cache/flagscale`) under
`gguf/<key>/model.gguf`, where the key hashes the folder's content (flagscale.checkpoint.fingerprint), the
output type, the quantization and the converter tree. flagscale.upstream.cache builds each entry in a
temporary folder under a file lock and renames it when complete: two servers of the same folder convert it
once, and a killed conversion leaves nothing that is ever served. Only the standard library loads here;
the converter runs in its own process (torch, numpy, sentencepiece: the `models` extra).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from flagscale.errors import ConfigError, ConversionError
from flagscale.serve.settings import ModelSpec, ServeSettings

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
AUTO = "auto"  # the source weights' type (f32, bf16 or f16), so the conversion loses nothing
KIND = "gguf"
FILE = "model.gguf"
_SOURCE_TYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


@dataclass(frozen=True)
class Options:
    """How a folder becomes a GGUF (`gguf:` of a served model)."""

    outtype: str = AUTO  # auto | f32 | f16 | bf16 | q8_0
    quantize: str | None = None  # a llama-quantize type (Q4_K_M, Q8_0, ...) applied after the conversion
    device: str | None = None  # whose patched llama.cpp tree converts; None: the installed build's
    source: str = "auto"  # auto | submodule | sdist | PATH (as `flagscale patch`)


@dataclass(frozen=True)
class Converted:
    path: Path
    cached: bool
    seconds: float


def options_of(spec: ModelSpec, settings: ServeSettings) -> Options:
    """The conversion of a served model (flagscale.serve.settings.ModelSpec) on the run's device."""
    return Options(spec.gguf.outtype, spec.gguf.quantize, settings.device)


def folders(settings: ServeSettings) -> list[tuple[ModelSpec, Path, str]]:
    """(spec, folder, where) of every llama.cpp model given as an HF folder."""
    out: list[tuple[ModelSpec, Path, str]] = []
    for index, spec in enumerate(settings.models):
        model = Path(str(spec.model_path)).expanduser()
        if spec.engine == "llama.cpp" and model.is_dir():
            out.append((spec, model.resolve(), f"serve[{index}].engine_args.model"))
    return out


def prepare(settings: ServeSettings, say=None) -> ServeSettings:
    """`settings` whose llama.cpp models given as HF folders point at their GGUF files, converted (or found cached)
    before any server starts. Ray replicas re-read the config: theirs names the GGUF files too, so a worker node
    needs only the file (on a shared filesystem), not the converter."""
    models = list(settings.models)
    config = copy.deepcopy(settings.extra.get("config"))
    for spec, folder, where in folders(settings):
        check_folder(folder, where)
        path = str(ensure(folder, options_of(spec, settings), say).path)
        index = settings.models.index(spec)
        models[index] = replace(spec, engine_args=tuple(sorted({**spec.args, "model": path}.items())))
        if config and isinstance(config.get("serve"), list):
            config["serve"][index]["engine_args"]["model"] = path
    extra = {**settings.extra, "config": config} if config is not None else settings.extra
    return replace(settings, models=tuple(models), extra=extra)


# ----------------------------------------------------------------------------------------- checks
def check_folder(folder: Path, where: str) -> None:
    """A clear one-line error when `folder` is not an HF model llama.cpp's converter can read."""
    from flagscale.checkpoint.fingerprint import weight_files

    wanted = "a GGUF file or a Hugging Face model folder (config.json, safetensors weights, tokenizer)"
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{where}={folder}: a folder without config.json; llama.cpp serves {wanted}")
    try:
        config = json.loads((folder / "config.json").read_text())
    except ValueError as exc:
        raise ConfigError(f"{where}={folder}: config.json is not JSON ({exc}); llama.cpp serves {wanted}") from None
    if not isinstance(config, dict) or not config.get("architectures"):
        raise ConfigError(f"{where}={folder}: config.json names no architectures; llama.cpp serves {wanted}")
    if not weight_files(folder):
        raise ConfigError(f"{where}={folder}: no weight files (*.safetensors); llama.cpp serves {wanted}")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise ConfigError(f"{where}={folder}: no tokenizer.json or tokenizer.model; llama.cpp serves {wanted}")


def outtype_of(folder: Path, options: Options) -> str:
    """The converter's --outtype: the configured one, else the source dtype's (f32 when unknown)."""
    if options.outtype != AUTO:
        return options.outtype
    from flagscale.checkpoint import hf

    try:
        return _SOURCE_TYPES.get(hf.torch_dtype_name(hf.read_tensors(folder)), "f32")
    except ConfigError:
        return "f32"  # .bin weights or odd headers: the converter reads them; f32 loses nothing


# ----------------------------------------------------------------------------------------- converter
def converter_root(device: str | None = None, source: str = "auto") -> tuple[Path, str]:
    """The patched llama.cpp repository root (convert_hf_to_gguf.py and gguf-py/) and its tree key."""
    from flagscale.patches.tree import patched_tree
    from flagscale.runner.environment import device_name
    from flagscale.upstream.project import Project
    from flagscale.upstream.target import Target

    tree = patched_tree(Target.of(Project.find(), "llama.cpp", device_name(device), source))
    root = tree.path / (tree.source.to_tree_path("") or "")
    if not (root / "convert_hf_to_gguf.py").is_file():
        raise ConversionError(f"{root} has no convert_hf_to_gguf.py: is the llama.cpp pin complete?")
    return root, tree.key


def convert(model: Path, out: Path, outtype: str, root: Path, log: Path | None = None) -> Path:
    """Run the pin's convert_hf_to_gguf.py: `model` (an HF folder) -> `out`; its output goes to `log`."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root / "gguf-py"), os.environ.get("PYTHONPATH")])),
        "PYTHONDONTWRITEBYTECODE": "1",  # the cached tree is read-only
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    cmd = [sys.executable, str(root / "convert_hf_to_gguf.py"), str(model), "--outfile", str(out), "--outtype", outtype]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(output)
    if result.returncode != 0 or not out.is_file():
        raise ConversionError(f"convert_hf_to_gguf.py could not convert {model}: {_reason(output, result.returncode)}")
    return out


def quantize(gguf: Path, out: Path, qtype: str) -> Path:
    from flagscale.serve.binaries import llama_tool

    result = subprocess.run(
        [str(llama_tool("llama-quantize")), str(gguf), str(out), qtype, "1"], capture_output=True, text=True
    )
    if result.returncode != 0 or not out.is_file():
        raise ConversionError(
            f"llama-quantize {qtype} failed: {_reason(result.stdout + result.stderr, result.returncode)}"
        )
    return out


def _reason(output: str, code: int) -> str:
    """The line of a converter's output that says what went wrong (its last error, else its last line)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() or "not supported" in line.lower()]
    return (errors or lines or [f"exit status {code}"])[-1]


# ----------------------------------------------------------------------------------------- the cache
def key_of(folder: Path, outtype: str, qtype: str | None, tree_key: str) -> str:
    from flagscale.checkpoint.fingerprint import content_hash

    blob = json.dumps({"content": content_hash(folder), "outtype": outtype, "quantize": qtype, "converter": tree_key})
    return hashlib.sha256(blob.encode()).hexdigest()


def cached_path(folder: Path, options: Options) -> Path:
    """Where the GGUF of `folder` is (or will be, once `ensure` converted it)."""
    from flagscale.upstream.cache import Cache

    _, tree_key = converter_root(options.device, options.source)
    return Cache().path(KIND, key_of(folder, outtype_of(folder, options), options.quantize, tree_key)) / FILE


def ensure(folder: Path, options: Options, say=None) -> Converted:
    """The cached GGUF of `folder`, converting it first when no entry matches its content (under the lock)."""
    from flagscale.upstream.cache import Cache

    say = say or (lambda message: print(message, file=sys.stderr, flush=True))
    folder = folder.resolve()
    outtype = outtype_of(folder, options)
    root, tree_key = converter_root(options.device, options.source)
    cache = Cache()
    key = key_of(folder, outtype, options.quantize, tree_key)
    final = cache.path(KIND, key)
    if final.exists():
        say(f"using the cached GGUF of {folder}: {final / FILE}")
        return Converted(final / FILE, True, 0.0)
    _needs_packages()
    what = outtype + (f", then {options.quantize}" if options.quantize else "")
    if _locked_elsewhere(final):
        say(f"another process is converting {folder} to GGUF; waiting for it")
    else:
        say(f"converting {folder} to GGUF ({what}) with llama.cpp's convert_hf_to_gguf.py; this may take a while")
    start = time.perf_counter()

    def build(tmp: Path) -> None:
        log = cache.root / "logs" / f"gguf-{key[:12]}.log"
        if options.quantize:
            plain = convert(folder, tmp / f"model.{outtype}.gguf", outtype, root, log)
            quantize(plain, tmp / FILE, options.quantize)
            plain.unlink()
        else:
            convert(folder, tmp / FILE, outtype, root, log)
        (tmp / "source.json").write_text(
            json.dumps({"source": str(folder), "outtype": outtype, "quantize": options.quantize}, indent=2) + "\n"
        )

    entry, hit = cache.get_or_create(KIND, key, build)
    seconds = time.perf_counter() - start
    say(f"{'another process converted' if hit else 'converted'} {folder} in {seconds:.1f} s: {entry / FILE}")
    return Converted(entry / FILE, hit, seconds)


def _needs_packages() -> None:
    """What convert_hf_to_gguf.py imports, checked here: one line instead of its traceback."""
    import importlib.util

    missing = [m for m in ("torch", "numpy", "transformers", "sentencepiece") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConversionError(
            f"converting a Hugging Face folder to GGUF needs {', '.join(missing)} for {sys.executable}: "
            "pip install -c constraints.txt 'flagscale[models]' (or give engine_args.model a GGUF file)"
        )


def _locked_elsewhere(final: Path) -> bool:
    """Whether another process holds the entry's build lock now (only to say why we wait)."""
    from filelock import FileLock, Timeout

    if not final.parent.is_dir():
        return False
    lock = FileLock(str(final.parent / f".{final.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False
