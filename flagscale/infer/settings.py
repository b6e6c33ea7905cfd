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
from flagscale.serve.settings import engine_name
from flagscale.settings import at_least, convert, plain, setting


def _stop_words(value: Any) -> tuple[str, ...]:
    """`stop:` is one string or a list of them."""
    if isinstance(value, (list, tuple)):
        return tuple(map(str, value))
    if isinstance(value, str):
        return (value,) if value else ()
    raise ValueError("expected a string or a list of strings")


@dataclass(frozen=True)
class Generate:
    """`generate:` of the task YAML."""

    prompts: str | None = None
    output: str | None = None  # None: <exp_dir>/completions.jsonl
    max_tokens: int = setting(32, check=at_least(1))
    temperature: float = setting(0.0, check=at_least(0.0))
    top_p: float = setting(1.0, check=at_least(0.0))
    seed: int = setting(0, check=at_least(0))
    stop: Any = setting(None, check=_stop_words)


@dataclass(frozen=True)
class InferTask:
    """The task YAML (the `infer:` section)."""

    engine: str | None = None  # None: experiment.task.backend
    model: str | None = None
    engine_args: dict | None = None
    generate: Generate | None = None


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
    def from_json(cls, data: dict) -> InferSettings:
        return cls(**{**data, "stop": tuple(data["stop"]), "envs": tuple(map(tuple, data["envs"]))})


def from_config(cfg: Any) -> InferSettings:
    exp = plain(cfg.get("experiment")) or {}
    task = plain(cfg.get("infer"))
    if not isinstance(task, dict):
        raise ConfigError("the config has no infer section: add `- infer: <task yaml>` to the defaults list")
    t = convert(InferTask, task, "infer", from_yaml=True)
    engine = engine_name(t.engine or (exp.get("task") or {}).get("backend") or "", "infer.engine")
    model = t.model or ""
    if not model:
        raise ConfigError("infer.model: the model to load is required")
    if engine == "llama.cpp" and not Path(model).is_file():
        raise ConfigError(
            f"infer.model={model}: no such GGUF file (convert a checkpoint with tools/convert_to_gguf.py)"
        )
    if Path(model).exists():
        model = str(Path(model).resolve())
    gen = t.generate or Generate()
    prompts = Path(gen.prompts or "")
    if not gen.prompts or not prompts.is_file():
        raise ConfigError(f"infer.generate.prompts={gen.prompts}: no such prompts file")
    exp_dir = Path(str(exp.get("exp_dir") or "outputs/infer"))
    output = Path(gen.output or exp_dir / "completions.jsonl")
    return InferSettings(
        engine=engine,
        model=model,
        engine_args=dict(t.engine_args or {}),
        prompts=str(prompts.resolve()),
        output=str(output.expanduser().resolve()),
        max_tokens=gen.max_tokens,
        temperature=gen.temperature,
        top_p=gen.top_p,
        seed=gen.seed,
        stop=gen.stop or (),
        run_dir=str(exp_dir.expanduser().resolve()),
        envs=tuple(sorted((str(k), str(v)) for k, v in (exp.get("envs") or {}).items())),
    )
