"""`flagscale infer` settings: the composed Hydra config, validated once into a frozen dataclass.

Experiment YAML (`examples/tiny_llama/conf/infer.yaml`): `experiment.task: {type: infer, backend: llama.cpp}`,
`experiment.exp_dir`, `experiment.envs`; task YAML (`conf/infer/tiny.yaml`)::

    engine: llama.cpp                      # llama.cpp | vllm | sglang (default: experiment.task.backend)
    model: /path/tiny.gguf                 # GGUF for llama.cpp; checkpoint folder or hub id for vLLM/SGLang
    engine_args: {n_ctx: 512, n_threads: 1}   # llama_cpp.Llama(...) | vllm.LLM(...) | sglang.Engine(...)
    generate:
      prompts: prompts.txt                 # one prompt per line, or JSONL with a "prompt" field
      output: outputs/completions.jsonl    # prompt, completion, tokens, timing per line
      max_tokens: 32
      temperature: 0.0
      top_p: 1.0
      seed: 0
      stop: []
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flagscale.errors import ConfigError
from flagscale.serve.settings import _plain, _unknown, engine_name

TASK_KEYS = {"engine", "model", "engine_args", "generate"}
GENERATE_KEYS = {"prompts", "output", "max_tokens", "temperature", "top_p", "seed", "stop"}


@dataclass(frozen=True)
class InferSettings:
    engine: str
    model: str
    engine_args: dict
    prompts: str
    output: str
    max_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    run_dir: str = "outputs/infer"
    envs: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "InferSettings":
        return cls(**{**data, "stop": tuple(data["stop"]), "envs": tuple(map(tuple, data["envs"]))})


def _number(value: Any, where: str, kind=float, low: float = 0.0):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
        raise ConfigError(f"{where}={value!r}: expected a number >= {low}")
    if kind is int and not isinstance(value, int):
        raise ConfigError(f"{where}={value!r}: expected an integer")
    return kind(value)


def from_config(cfg: Any) -> InferSettings:
    exp = _plain(cfg.get("experiment")) or {}
    task = _plain(cfg.get("infer"))
    if not isinstance(task, dict):
        raise ConfigError("the config has no infer section: add `- infer: <task yaml>` to the defaults list")
    _unknown(task, TASK_KEYS, "infer")
    engine = engine_name(task.get("engine") or (exp.get("task") or {}).get("backend") or "", "infer.engine")
    model = str(task.get("model") or "")
    if not model:
        raise ConfigError("infer.model: the model to load is required")
    if engine == "llama.cpp" and not Path(model).is_file():
        raise ConfigError(f"infer.model={model}: no such GGUF file (convert a checkpoint with tools/convert_to_gguf.py)")
    if Path(model).exists():
        model = str(Path(model).resolve())
    args = task.get("engine_args") or {}
    if not isinstance(args, dict):
        raise ConfigError(f"infer.engine_args: expected a mapping, got {args!r}")
    gen = task.get("generate") or {}
    _unknown(gen, GENERATE_KEYS, "infer.generate")
    prompts = Path(str(gen.get("prompts") or ""))
    if not gen.get("prompts") or not prompts.is_file():
        raise ConfigError(f"infer.generate.prompts={gen.get('prompts')}: no such prompts file")
    output = Path(str(gen.get("output") or Path(str(exp.get("exp_dir") or "outputs/infer")) / "completions.jsonl"))
    stop = gen.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    run_dir = Path(str(exp.get("exp_dir") or "outputs/infer")).expanduser().resolve()
    return InferSettings(
        engine=engine, model=model, engine_args=dict(args), prompts=str(prompts.resolve()),
        output=str(output.expanduser().resolve()),
        max_tokens=_number(gen.get("max_tokens", 32), "infer.generate.max_tokens", int, 1),
        temperature=_number(gen.get("temperature", 0.0), "infer.generate.temperature"),
        top_p=_number(gen.get("top_p", 1.0), "infer.generate.top_p"),
        seed=_number(gen.get("seed", 0), "infer.generate.seed", int),
        stop=tuple(map(str, stop)), run_dir=str(run_dir),
        envs=tuple(sorted((str(k), str(v)) for k, v in (exp.get("envs") or {}).items())))
