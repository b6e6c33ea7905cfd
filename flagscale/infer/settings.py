"""`flagscale infer` settings: the composed Hydra config, validated once into a frozen dataclass.

Experiment YAML (`examples/tiny_llama/conf/infer.yaml`): `experiment.task: {type: infer, backend: llama.cpp}`,
`experiment.exp_dir`, `experiment.envs`; task YAML (`conf/infer/tiny.yaml`)::

    engine: llama.cpp                      # llama.cpp | vllm | sglang | transformers | diffusers
                                           # (default: experiment.task.backend)
    model: /path/tiny.gguf                 # GGUF for llama.cpp; checkpoint folder or hub id for vLLM/SGLang;
                                           # a local folder for transformers and diffusers
    engine_args: {n_ctx: 512, n_threads: 1}   # llama_cpp.Llama(...) | vllm.LLM(...) | sglang.Engine(...) |
                                           # the model's / pipeline's from_pretrained(...) keywords
    dtype: float32                         # transformers, diffusers: auto | float32 | float16 | bfloat16
    device: cpu                            # transformers, diffusers: a torch device
    pipeline: FluxPipeline                 # diffusers: the class the folder must be (None: model_index.json's)
    components:                            # diffusers: components loaded with their own class and/or dtype
      transformer: {class: FluxTransformer2DModel, dtype: bfloat16}
    transformations: []                    # diffusers: flagscale.transforms specs, applied in order
    generate:
      prompts: prompts.txt                 # one prompt per line, or JSONL with a "prompt" field (transformers:
                                           # and "images", or "messages"; diffusers: and "seed")
      output: outputs/completions.jsonl    # prompt, completion, tokens, timing per line; diffusers: a folder of
                                           # PNG / MP4 files and their index.jsonl
      max_tokens: 32
      temperature: 0.0
      top_p: 1.0
      seed: 0                              # diffusers: prompt i gets seed + i (unless its line names one)
      stop: []
      batch_size: 1                        # transformers, diffusers: prompts per forward batch
      width: null                          # diffusers: pixels (null: the pipeline's default)
      height: null
      steps: null                          # diffusers: denoising steps
      guidance: null                       # diffusers: guidance scale
      num_frames: null                     # diffusers, text-to-video: frames (Wan: 4k+1)
      fps: 16                              # diffusers, text-to-video: frames per second of the MP4
      negative_prompt: null
      call_args: {}                        # diffusers: more keywords of the pipeline call (max_sequence_length...)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from flagscale.errors import ConfigError
from flagscale.serve.settings import ENGINE_ALIASES
from flagscale.settings import at_least, convert, nearest, plain, setting

ENGINES = ("llama.cpp", "vllm", "sglang", "transformers", "diffusers")
HF_ENGINES = ("transformers", "diffusers")  # run in the worker from a local folder (flagscale.infer.hf_models)
Dtype = Literal["auto", "float32", "float16", "bfloat16"]


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
    batch_size: int = setting(1, check=at_least(1))
    width: int | None = setting(None, check=at_least(8))
    height: int | None = setting(None, check=at_least(8))
    steps: int | None = setting(None, check=at_least(1))
    guidance: float | None = setting(None, check=at_least(0.0))
    num_frames: int | None = setting(None, check=at_least(1))
    fps: int = setting(16, check=at_least(1))
    negative_prompt: str | None = None
    call_args: dict | None = None


@dataclass(frozen=True)
class Component:
    """`components.<name>:` of a diffusers task: the class and/or dtype it is loaded with."""

    class_name: str | None = setting(None, key="class")
    dtype: Dtype | None = None


@dataclass(frozen=True)
class InferTask:
    """The task YAML (the `infer:` section)."""

    engine: str | None = None  # None: experiment.task.backend
    model: str | None = None
    engine_args: dict | None = None
    dtype: Dtype = "float32"
    device: str = "cpu"
    pipeline: str | None = None
    components: tuple[tuple[str, Component], ...] = ()
    transformations: tuple[dict, ...] = ()
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
    # transformers and diffusers
    dtype: str = "float32"
    device: str = "cpu"
    batch_size: int = 1
    # diffusers
    pipeline: str | None = None
    components: dict | None = None  # name -> {"class": ..., "dtype": ...} (only the keys given)
    transformations: tuple[dict, ...] = ()
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    num_frames: int | None = None
    fps: int = 16
    negative_prompt: str | None = None
    call_args: dict | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> InferSettings:
        tuples = {
            "stop": tuple(data["stop"]),
            "envs": tuple(map(tuple, data["envs"])),
            "transformations": tuple(data.get("transformations", ())),
        }
        return cls(**{**data, **tuples})


def engine_of(value: Any, where: str = "infer.engine") -> str:
    """The engine `value` names (an alias such as llama_cpp too), or a ConfigError naming `where`."""
    name = ENGINE_ALIASES.get(str(value), str(value))
    if name not in ENGINES:
        raise ConfigError(f"{where}={value}: use one of {', '.join(ENGINES)}{nearest(value, ENGINES)}")
    return name


def check_model(engine: str, model: str, pipeline: str | None) -> None:
    """The model is what the engine loads: a GGUF file for llama.cpp, the right kind of folder for the HF engines."""
    if engine == "llama.cpp" and not Path(model).is_file():
        raise ConfigError(
            f"infer.model={model}: no such GGUF file (convert a checkpoint with tools/convert_to_gguf.py)"
        )
    from flagscale.infer import hf_models  # light at import: torch and the libraries load in its functions

    if engine == "diffusers":
        hf_models.check_pipeline_folder(model, pipeline)
    elif engine == "transformers":
        hf_models.check_model_folder(model)


def _components(t: InferTask) -> dict | None:
    if not t.components:
        return None
    return {
        name: {k: v for k, v in (("class", c.class_name), ("dtype", c.dtype)) if v is not None}
        for name, c in t.components
    }


def _hf_only(t: InferTask, gen: Generate, engine: str) -> None:
    """Keys of the diffusers engine are refused by the others (they would be silently ignored)."""
    if engine == "diffusers":
        return
    for key, value in (("pipeline", t.pipeline), ("components", t.components), ("transformations", t.transformations)):
        if value:
            raise ConfigError(f"infer.{key}: only the diffusers engine takes it (engine is {engine})")
    if gen.call_args:
        raise ConfigError(f"infer.generate.call_args: only the diffusers engine takes it (engine is {engine})")


def from_config(cfg: Any) -> InferSettings:
    exp = plain(cfg.get("experiment")) or {}
    task = plain(cfg.get("infer"))
    if not isinstance(task, dict):
        raise ConfigError("the config has no infer section: add `- infer: <task yaml>` to the defaults list")
    t = convert(InferTask, task, "infer", from_yaml=True)
    engine = engine_of(t.engine or (exp.get("task") or {}).get("backend") or "")
    model = t.model or ""
    if not model:
        raise ConfigError("infer.model: the model to load is required")
    gen = t.generate or Generate()
    _hf_only(t, gen, engine)
    if t.transformations:
        from flagscale.transforms import parse  # the standard library only: checked before torch loads

        parse(list(t.transformations), "infer.transformations")
    check_model(engine, model, t.pipeline)
    if Path(model).exists():
        model = str(Path(model).resolve())
    prompts = Path(gen.prompts or "")
    if not gen.prompts or not prompts.is_file():
        raise ConfigError(f"infer.generate.prompts={gen.prompts}: no such prompts file")
    exp_dir = Path(str(exp.get("exp_dir") or "outputs/infer"))
    output = Path(gen.output or exp_dir / ("media" if engine == "diffusers" else "completions.jsonl"))
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
        dtype=t.dtype,
        device=t.device,
        batch_size=gen.batch_size,
        pipeline=t.pipeline,
        components=_components(t),
        transformations=t.transformations,
        width=gen.width,
        height=gen.height,
        steps=gen.steps,
        guidance=gen.guidance,
        num_frames=gen.num_frames,
        fps=gen.fps,
        negative_prompt=gen.negative_prompt,
        call_args=dict(gen.call_args) if gen.call_args else None,
    )
