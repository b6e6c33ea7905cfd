"""`flagscale compress` settings: the composed Hydra config, validated once into a frozen dataclass.

Experiment YAML (`examples/tiny_llama/conf/compress.yaml`): `experiment.task.type: compress`, `experiment.exp_dir`,
`experiment.envs`; task YAML (`conf/compress/w8a8.yaml`)::

    model: /path/hf_folder                 # a Hugging Face causal LM folder (config.json, safetensors, tokenizer)
    scheme: W8A8                           # W8A8 | W4A16 | FP8_DYNAMIC (llm-compressor) | Q8_0 | Q4_K_M | ... (GGUF)
    output: outputs/tiny-w8a8              # a folder (compressed-tensors) or a .gguf file; default under exp_dir
    report: outputs/report.json            # default <exp_dir>/report.json
    seed: 0                                # torch's seed: llm-compressor shuffles the calibration samples
    recipe: {ignore: [lm_head], smoothing_strength: 0.8, dampening_frac: 0.01}
    calibration:                           # one source: a JSONL or the pre-training data
      jsonl: data/calib.jsonl              # one document per line under text_key
      text_key: text
      data_path: null                      # an indexed dataset prefix (PREFIX.bin/.idx, tools/preprocess_data.py)
      tokenizer: byte                      # the tokenizer that made data_path: byte | hf
      tokenizer_path: null                 # its folder (hf)
      num_samples: 16                      # sequences of seq_len tokens, packed from consecutive documents
      seq_len: 64
    evaluation: {num_samples: 8, seq_len: 64}   # no source: the documents after the calibration ones (held out)
    gguf: {outtype: auto, threads: 1}      # the unquantized conversion, llama.cpp threads for the perplexity
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from flagscale.errors import ConfigError
from flagscale.settings import at_least, closest, convert, plain, setting

# scheme -> the tool that applies it. llm-compressor's are its preset scheme names; GGUF's are llama-quantize types.
LLMCOMPRESSOR_SCHEMES = ("W8A8", "W4A16", "FP8_DYNAMIC")
GGUF_SCHEMES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")
SCHEMES = LLMCOMPRESSOR_SCHEMES + GGUF_SCHEMES
DATA_FREE = ("FP8_DYNAMIC",)  # dynamic activation scales: the weights alone decide, no calibration pass
GGUF_OUTTYPES = ("auto", "f32", "f16", "bf16")


@dataclass(frozen=True)
class Data:
    """`calibration:` / `evaluation:`: text documents packed into num_samples sequences of seq_len tokens."""

    jsonl: str | None = None
    text_key: str = "text"
    data_path: str | None = None
    tokenizer: Literal["byte", "hf"] = "byte"
    tokenizer_path: str | None = None
    num_samples: int = setting(16, check=at_least(1))
    seq_len: int = setting(64, check=at_least(8))

    @property
    def source(self) -> str | None:
        return self.jsonl or self.data_path


@dataclass(frozen=True)
class Recipe:
    """`recipe:`: the llm-compressor modifiers' knobs."""

    ignore: tuple[str, ...] = ("lm_head",)
    smoothing_strength: float = setting(0.8, check=at_least(0.0))  # SmoothQuant (W8A8)
    dampening_frac: float = setting(0.01, check=at_least(0.0))  # GPTQ's Hessian dampening (W8A8, W4A16)


@dataclass(frozen=True)
class GgufOptions:
    outtype: Literal["auto", "f32", "f16", "bf16"] = "auto"  # convert_hf_to_gguf.py's, before llama-quantize
    threads: int = setting(1, check=at_least(1))


@dataclass(frozen=True)
class CompressTask:
    """The task YAML (the `compress:` section)."""

    model: str | None = None
    scheme: str | None = None
    output: str | None = None
    report: str | None = None
    seed: int = setting(0, check=at_least(0))
    recipe: Recipe | None = None
    calibration: Data | None = None
    evaluation: Data | None = None
    gguf: GgufOptions | None = None


@dataclass(frozen=True)
class CompressSettings:
    model: str
    scheme: str
    output: str
    report: str
    calibration: Data | None  # None: no source (GGUF, FP8_DYNAMIC without one)
    evaluation: Data
    held_out: bool = False  # evaluation reads calibration's source after the documents calibration packed
    seed: int = 0
    recipe: Recipe = Recipe()
    gguf: GgufOptions = GgufOptions()
    run_dir: str = "outputs/compress"
    envs: tuple[tuple[str, str], ...] = ()

    @property
    def tool(self) -> str:
        return "gguf" if self.scheme in GGUF_SCHEMES else "llmcompressor"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> CompressSettings:
        def data_of(d):
            return None if d is None else Data(**d)

        return cls(
            **{
                **data,
                "calibration": data_of(data["calibration"]),
                "evaluation": data_of(data["evaluation"]),
                "recipe": Recipe(**{**data["recipe"], "ignore": tuple(data["recipe"]["ignore"])}),
                "gguf": GgufOptions(**data["gguf"]),
                "envs": tuple(map(tuple, data["envs"])),
            }
        )


# ----------------------------------------------------------------------------------------- checks
def scheme_name(value: str | None) -> str:
    """The scheme as its canonical name (case does not matter), else an error naming the nearest one."""
    if not value:
        raise ConfigError(f"compress.scheme: name the scheme, one of {', '.join(SCHEMES)}")
    by_upper = {s.upper(): s for s in SCHEMES}
    key = str(value).upper().replace("-", "_")
    if key in by_upper:
        return by_upper[key]
    near = closest(key, list(by_upper), cutoff=0.5)
    hint = f" (did you mean {by_upper[near]}?)" if near else ""
    raise ConfigError(f"compress.scheme={value}: unknown scheme{hint}; schemes: {', '.join(SCHEMES)}")


def check_model(model: str | None) -> Path:
    """A Hugging Face causal LM folder: config.json naming a *ForCausalLM architecture, weights, a tokenizer."""
    if not model:
        raise ConfigError("compress.model: the Hugging Face model folder to compress is required")
    folder = Path(model).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"compress.model={model}: no such folder (a Hugging Face model folder with config.json)")
    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise ConfigError(f"compress.model={model}: no config.json; is this a Hugging Face model folder?") from None
    except ValueError as exc:
        raise ConfigError(f"compress.model={model}: config.json is not JSON ({exc})") from None
    archs = [str(a) for a in (config.get("architectures") or [])] if isinstance(config, dict) else []
    if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise ConfigError(
            f"compress.model={model}: not a causal LM (architectures: {', '.join(archs) or 'none'}); "
            "compress takes a *ForCausalLM checkpoint"
        )
    if not any(folder.glob("*.safetensors")):
        raise ConfigError(f"compress.model={model}: no *.safetensors weights")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise ConfigError(f"compress.model={model}: no tokenizer.json or tokenizer.model beside the weights")
    return folder.resolve()


def idx_documents(prefix: Path) -> int:
    """The number of documents of a Megatron indexed dataset, read from its .idx header (stdlib only)."""
    with open(f"{prefix}.idx", "rb") as handle:
        header = handle.read(34)
    if len(header) < 34 or header[:9] != b"MMIDIDX\x00\x00":
        raise ConfigError(f"{prefix}.idx is not a Megatron indexed dataset index (tools/preprocess_data.py makes one)")
    _sequences, documents = struct.unpack("<QQ", header[18:34])
    return max(int(documents) - 1, 0)  # the document index starts with a 0 sentinel


def jsonl_has_text(path: Path, key: str, where: str) -> None:
    """The first non-empty line is a JSON object with a non-empty `key` string (the file is not empty)."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[key]
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"{where}.jsonl={path}:{number}: not a JSON object with a {key!r} field") from None
            if isinstance(text, str) and text.strip():
                return
    raise ConfigError(f"{where}.jsonl={path}: the set is empty (no line with a non-empty {key!r} text)")


def check_data(data: Data, where: str) -> Data:
    """Exactly one source, existing and not empty; paths made absolute."""
    if data.jsonl and data.data_path:
        raise ConfigError(f"{where}: give jsonl or data_path, not both")
    if data.jsonl:
        path = Path(data.jsonl).expanduser()
        if not path.is_file():
            raise ConfigError(f"{where}.jsonl={data.jsonl}: no such file")
        jsonl_has_text(path, data.text_key, where)
        return replace(data, jsonl=str(path.resolve()))
    if data.data_path:
        prefix = Path(data.data_path).expanduser()
        for suffix in (".bin", ".idx"):
            if not Path(f"{prefix}{suffix}").is_file():
                raise ConfigError(
                    f"{where}.data_path={data.data_path}: {prefix}{suffix} does not exist "
                    "(an indexed dataset prefix, as tools/preprocess_data.py writes it)"
                )
        if idx_documents(prefix) == 0:
            raise ConfigError(f"{where}.data_path={data.data_path}: the set is empty (no documents)")
        if data.tokenizer == "hf" and not data.tokenizer_path:
            raise ConfigError(f"{where}.tokenizer_path: the folder of the hf tokenizer that made {prefix}")
        tok = str(Path(data.tokenizer_path).expanduser().resolve()) if data.tokenizer_path else None
        return replace(data, data_path=str(prefix.resolve()), tokenizer_path=tok)
    return data


# ----------------------------------------------------------------------------------------- the config
def default_output(exp_dir: Path, model: Path, scheme: str) -> Path:
    name = f"{model.name}-{scheme.lower()}"
    return exp_dir / (f"{name}.gguf" if scheme in GGUF_SCHEMES else name)


def from_config(cfg: Any) -> CompressSettings:
    exp = plain(cfg.get("experiment")) or {}
    task = plain(cfg.get("compress"))
    if not isinstance(task, dict):
        raise ConfigError("the config has no compress section: add `- compress: <task yaml>` to the defaults list")
    t = convert(CompressTask, task, "compress", from_yaml=True)
    scheme = scheme_name(t.scheme)
    model = check_model(t.model)
    exp_dir = Path(str(exp.get("exp_dir") or "outputs/compress")).expanduser().resolve()
    output = Path(t.output).expanduser().resolve() if t.output else default_output(exp_dir, model, scheme)
    if scheme in GGUF_SCHEMES and output.suffix != ".gguf":
        raise ConfigError(f"compress.output={t.output}: a GGUF scheme writes one file; name it *.gguf")
    if scheme not in GGUF_SCHEMES and output.suffix == ".gguf":
        raise ConfigError(f"compress.output={t.output}: {scheme} writes a checkpoint folder, not a .gguf file")
    if output == model:
        raise ConfigError(f"compress.output={output}: would overwrite the model being compressed")
    calibration = check_data(t.calibration, "compress.calibration") if t.calibration else None
    if calibration is not None and calibration.source is None:
        calibration = None
    if calibration is None and scheme in LLMCOMPRESSOR_SCHEMES and scheme not in DATA_FREE:
        raise ConfigError(
            f"compress.calibration: {scheme} calibrates on data; give calibration.jsonl or calibration.data_path"
        )
    evaluation = check_data(t.evaluation or Data(), "compress.evaluation")
    held_out = evaluation.source is None
    if held_out:
        if calibration is None:
            raise ConfigError(
                "compress.evaluation: no held-out set; give evaluation.jsonl or evaluation.data_path "
                "(or a calibration source, whose next documents are held out)"
            )
        evaluation = replace(
            evaluation,
            **{k: getattr(calibration, k) for k in ("jsonl", "text_key", "data_path", "tokenizer", "tokenizer_path")},
        )
    if scheme in GGUF_SCHEMES and evaluation.num_samples < 2:
        raise ConfigError("compress.evaluation.num_samples: llama-perplexity needs at least 2 sequences")
    return CompressSettings(
        model=str(model),
        scheme=scheme,
        output=str(output),
        report=str(Path(t.report).expanduser().resolve() if t.report else exp_dir / "report.json"),
        calibration=calibration,
        evaluation=evaluation,
        held_out=held_out,
        seed=t.seed,
        recipe=t.recipe or Recipe(),
        gguf=t.gguf or GgufOptions(),
        run_dir=str(exp_dir),
        envs=tuple(sorted((str(k), str(v)) for k, v in (exp.get("envs") or {}).items())),
    )
