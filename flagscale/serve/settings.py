"""`flagscale serve` settings: the composed Hydra config, validated once into frozen dataclasses.

Experiment YAML (`examples/tiny_llama/conf/serve.yaml`)::

    experiment:
      exp_name: tiny_llama_serve
      exp_dir: outputs/${experiment.exp_name}     # logs/, pids/, state.json live here
      task: {type: serve, backend: llama.cpp}     # default engine of every model
      runner: {host: 127.0.0.1, port: 8000, deploy: auto, hostfile: null, ready_timeout: 120}
      envs: {}                                    # extra environment of every engine process

Task YAML (`conf/serve/tiny.yaml`): a list of models (or one mapping)::

    - serve_id: tiny                    # the model name clients send ("model": "tiny")
      engine: llama.cpp                 # llama.cpp | vllm | sglang | transformers | diffusers
      engine_args: {model: /path/tiny.gguf, threads: 1, ctx_size: 512}   # snake_case -> --ctx-size
      gguf: {outtype: auto, quantize: null}   # llama.cpp given an HF folder as model: how it becomes a GGUF
      replicas: 1
      autoscaling: {min_replicas: 1, max_replicas: 2}   # Ray mode: replicas follow the load (optional)

`deploy: auto` picks `direct` (one engine process per model, no proxy) for one model with one replica,
and `ray` (replicas as Ray actors behind the front door, routed by model name) otherwise.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from flagscale.errors import ConfigError
from flagscale.settings import at_least, convert, plain, setting

ENGINES = ("llama.cpp", "vllm", "sglang", "transformers", "diffusers")
ENGINE_ALIASES = {"llama_cpp": "llama.cpp", "llamacpp": "llama.cpp", "llama-cpp": "llama.cpp"}
# Engines FlagScale runs itself (flagscale.serve.hf_engine, on the Hugging Face libraries): images in and out.
MEDIA_ENGINES = ("transformers", "diffusers")
# The runner owns these: an engine arg of the same meaning would contradict runner.host/port or serve_id.
RUNNER_OWNED = {
    "host": "experiment.runner.host",
    "port": "experiment.runner.port",
    "alias": "serve_id",
    "served_model_name": "serve_id",
}
# ... and of the media engines (flagscale.serve.hf_engine): the front door's image limits, where url-mode images go
MEDIA_OWNED = {
    "media_dir": "experiment.exp_dir (images go to <exp_dir>/media)",
    "media_url": "experiment.runner.host/port (the front door serves <exp_dir>/media)",
    "max_image_bytes": "experiment.runner.max_image_bytes",
    "max_image_pixels": "experiment.runner.max_image_pixels",
    "media_dirs": "experiment.runner.media_dirs",
}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
GGUF_OUTTYPES = ("auto", "f32", "f16", "bf16", "q8_0")  # convert_hf_to_gguf.py's --outtype (auto: the source's)


# Per-field checks: `convert` reports their ValueError as `<dotted key>=<value>: <message>`.
def _port(value: int) -> int:
    if value > 65535:
        raise ValueError("a TCP port is at most 65535")
    return at_least(1, "an integer")(value)


def _model_name(value: str) -> str:
    if not NAME.fullmatch(value):
        raise ValueError('give each model a name (letters, digits, . _ -); clients send it as "model"')
    return value


def _api_keys(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(k, str) and k.strip() for k in value):
        raise ValueError("expected a list of API keys (non-empty strings)")
    return tuple(k.strip() for k in value)


def _folders(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(d, str) and d.strip() for d in value):
        raise ValueError("expected a list of folders")
    missing = [d for d in value if not Path(d).expanduser().is_dir()]
    if missing:
        raise ValueError(f"no such folder: {missing[0]}")
    return tuple(str(Path(d).expanduser().resolve()) for d in value)


def env_api_keys() -> tuple[str, ...]:
    """$FLAGSCALE_API_KEYS: comma-separated keys, added to experiment.runner.api_keys."""
    return tuple(k.strip() for k in os.environ.get("FLAGSCALE_API_KEYS", "").split(",") if k.strip())


def _ssh_options(value: Any) -> tuple[str, ...]:
    from flagscale.runner.ssh import check_options

    if not isinstance(value, (list, tuple)):
        raise ValueError("expected a list of Key=Value ssh options")
    return check_options(value)


# --------------------------------------------------------------------------------- the YAML, as read
@dataclass(frozen=True)
class Autoscaling:
    """`autoscaling:` of a model (Ray mode): replica bounds, and how the replica count follows the load."""

    min_replicas: int | None = setting(None, check=at_least(0, "an integer"))  # None: 1
    max_replicas: int | None = setting(None, check=at_least(1, "an integer"))  # None: max(min, replicas)
    # replicas wanted = ceil(in-flight requests of the model, averaged over the last seconds / this)
    target_ongoing_requests: float = setting(2.0, check=at_least(0.1))
    upscale_delay_s: float = setting(5.0, check=at_least(0))  # more wanted for this long: scale up
    downscale_delay_s: float = setting(30.0, check=at_least(0))  # fewer wanted for this long: scale down


@dataclass(frozen=True)
class GGUFConfig:
    """`gguf:` of a llama.cpp model whose `engine_args.model` is a Hugging Face folder (flagscale.serve.gguf)."""

    outtype: str = "auto"  # auto (the weights' own type: f32, bf16 or f16) | f32 | f16 | bf16 | q8_0
    quantize: str | None = None  # then llama-quantize to this type (Q4_K_M, Q8_0, ...)


@dataclass(frozen=True)
class ModelConfig:
    """One model of the task YAML (the `serve:` list)."""

    serve_id: str = setting(check=_model_name)  # the model name clients send
    engine: str | None = None  # None: experiment.task.backend
    engine_args: dict | None = None
    replicas: int = setting(1, check=at_least(1, "an integer"))
    autoscaling: Autoscaling | None = None
    port: int | None = setting(None, check=_port)
    ray_actor_options: dict | None = None
    gguf: GGUFConfig | None = None


@dataclass(frozen=True)
class RunnerConfig:
    """`experiment.runner` of the experiment YAML."""

    host: str | None = None  # None: 127.0.0.1
    port: int = setting(8000, check=_port)
    deploy: Literal["auto", "direct", "ray"] = "auto"
    hostfile: str | None = None
    ready_timeout: float = 120.0
    device: str | None = None  # None: the device the installed flagscale was built for, else cpu
    visible_devices: str | None = None
    ray_port: int = setting(6379, check=_port)
    ssh_port: int = setting(22, check=_port)
    ssh_options: Any = setting(None, check=_ssh_options)  # Any: the check words a non-list for ssh options
    health_check_period_s: float = 2.0
    # the front door (flagscale.serve.frontdoor), both modes
    api_keys: Any = setting(None, check=_api_keys)  # Bearer keys; $FLAGSCALE_API_KEYS adds more
    max_body_bytes: int = setting(8 << 20, check=at_least(1024, "an integer"))  # larger bodies: 413
    request_timeout: float = setting(600.0, check=at_least(0.1))  # seconds per request, streams included: 504
    drain_timeout: float = setting(30.0, check=at_least(0))  # action=stop: in-flight requests may finish
    # images in requests to the transformers engine (front door and engine check them alike)
    max_image_bytes: int = setting(4 << 20, check=at_least(1, "an integer"))  # one image's encoded bytes
    max_image_pixels: int = setting(4096 * 4096, check=at_least(1, "an integer"))  # width x height
    media_dirs: Any = setting(None, check=_folders)  # file:// URLs and paths are read only under these folders
    public_url: str | None = None  # how clients reach the front door (url-mode image links); None: http://host:port


# ------------------------------------------------------------------------------- the typed settings
@dataclass(frozen=True)
class ModelSpec:
    name: str
    engine: str
    engine_args: tuple[tuple[str, Any], ...]
    replicas: int = 1
    min_replicas: int | None = None  # set with max_replicas: Ray mode autoscaling bounds
    max_replicas: int | None = None
    port: int | None = None  # direct mode: this model's port (default runner.port + its index)
    num_cpus: float = 1.0  # Ray mode: CPUs one replica reserves
    gguf: GGUFConfig = field(default_factory=GGUFConfig)  # llama.cpp given an HF folder: its conversion
    scaling: Autoscaling = field(default_factory=Autoscaling)  # Ray mode: target load and delays

    @property
    def args(self) -> dict[str, Any]:
        return dict(self.engine_args)

    @property
    def model_path(self) -> str:
        return str(self.args["model"])


@dataclass(frozen=True)
class ServeSettings:
    exp_name: str
    run_dir: Path
    host: str
    port: int
    deploy: str  # direct | ray (auto resolved)
    models: tuple[ModelSpec, ...]
    envs: tuple[tuple[str, str], ...] = ()
    hostfile: Path | None = None
    ready_timeout: float = 120.0
    device: str | None = None  # None: the installed build's device (flagscale.runner.environment)
    visible_devices: str | None = None
    ray_port: int = 6379
    ssh_port: int = 22  # Ray mode with a hostfile: how worker nodes are reached (as `flagscale train` does)
    ssh_options: tuple[str, ...] = ()  # extra `ssh -o Key=Value` options
    health_check_period_s: float = 2.0
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # the front door's Bearer keys (config + env)
    max_body_bytes: int = 8 << 20
    request_timeout: float = 600.0
    drain_timeout: float = 30.0
    max_image_bytes: int = 4 << 20
    max_image_pixels: int = 4096 * 4096
    media_dirs: tuple[str, ...] = ()
    public_url: str | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def model(self, name: str) -> ModelSpec:
        for spec in self.models:
            if spec.name == name:
                return spec
        raise ConfigError(f"no model {name!r} in this config; served: {', '.join(m.name for m in self.models)}")

    def port_of(self, spec: ModelSpec) -> int:
        return spec.port if spec.port is not None else self.port + self.models.index(spec)

    @property
    def media_dir(self) -> Path:
        """Where the diffusers engine writes url-mode images; the front door serves them at /v1/media/<name>."""
        return self.run_dir / "media"

    @property
    def front_url(self) -> str:
        """The front door's URL as this machine reaches it (both modes listen on host:port)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    @property
    def media_url(self) -> str:
        """Where clients fetch url-mode images (the front door's /v1/media)."""
        return f"{self.public_url or self.front_url}/v1/media"


def engine_name(value: Any, where: str) -> str:
    """The engine `value` names (an alias such as llama_cpp too), or a ConfigError naming `where`."""
    name = ENGINE_ALIASES.get(str(value), str(value))
    if name not in ENGINES:
        raise ConfigError(f"{where}={value}: use one of {', '.join(ENGINES)}")
    return name


def _replica_bounds(m: ModelConfig, where: str) -> tuple[int | None, int | None]:
    """(min, max) replicas of Ray mode autoscaling, or (None, None) without it."""
    scaling = m.autoscaling
    if scaling is None or scaling == Autoscaling():  # absent or empty: no autoscaling
        return None, None
    low = 1 if scaling.min_replicas is None else scaling.min_replicas
    high = max(low, m.replicas) if scaling.max_replicas is None else scaling.max_replicas
    if low > high:
        raise ConfigError(f"{where}.autoscaling: min_replicas={low} exceeds max_replicas={high}")
    return low, high


def parse_model(raw: Any, index: int, default_engine: str | None) -> ModelSpec:
    where = f"serve[{index}]"
    m = convert(ModelConfig, raw, where, from_yaml=True)
    engine = engine_name(m.engine or default_engine or "", f"{where}.engine")
    args = {str(k).replace("-", "_"): v for k, v in (m.engine_args or {}).items()}
    owned = {**RUNNER_OWNED, **(MEDIA_OWNED if engine in MEDIA_ENGINES else {})}
    for key, owner in owned.items():
        if key in args:
            raise ConfigError(f"{where}.engine_args.{key}: set {owner} instead (the runner binds and names the engine)")
    if not args.get("model"):
        raise ConfigError(
            f"{where}.engine_args.model: the model to serve (a GGUF file for llama.cpp, a checkpoint "
            "folder or hub id for vLLM/SGLang, a local model folder for transformers/diffusers) is required"
        )
    low, high = _replica_bounds(m, where)
    num_cpus = float((m.ray_actor_options or {}).get("num_cpus", 1.0))
    gguf = m.gguf or GGUFConfig()
    if m.gguf is not None and engine != "llama.cpp":
        raise ConfigError(f"{where}.gguf: only the llama.cpp engine serves GGUF files; remove it for {engine}")
    if gguf.outtype not in GGUF_OUTTYPES:
        raise ConfigError(f"{where}.gguf.outtype={gguf.outtype}: use one of {', '.join(GGUF_OUTTYPES)}")
    scaling = m.autoscaling or Autoscaling()
    return ModelSpec(
        m.serve_id, engine, tuple(sorted(args.items())), m.replicas, low, high, m.port, num_cpus, gguf, scaling
    )


def from_config(cfg: Any) -> ServeSettings:
    """Validate the composed config once; every later step trusts the result."""
    exp = cfg.get("experiment") if hasattr(cfg, "get") else None
    if exp is None:
        raise ConfigError("the config has no experiment section (exp_name, exp_dir, task, runner)")
    exp = plain(exp)
    runner = convert(RunnerConfig, exp.get("runner"), "experiment.runner", from_yaml=True)
    models_raw = plain(cfg.get("serve"))
    if models_raw is None:
        raise ConfigError("the config has no serve section: add `- serve: <task yaml>` to the defaults list")
    if isinstance(models_raw, dict):
        models_raw = [models_raw]
    if not isinstance(models_raw, list) or not models_raw:
        raise ConfigError("serve: expected a list of models (serve_id, engine, engine_args, ...)")
    default_engine = (exp.get("task") or {}).get("backend")
    models = tuple(parse_model(m, i, default_engine) for i, m in enumerate(models_raw))
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ConfigError(f"serve: serve_id values must be unique, got {', '.join(names)}")
    scaled = len(models) > 1 or any(m.replicas > 1 or m.max_replicas for m in models)
    deploy = ("ray" if scaled else "direct") if runner.deploy == "auto" else runner.deploy
    hostfile = runner.hostfile
    if hostfile and not Path(hostfile).is_file():
        raise ConfigError(f"experiment.runner.hostfile={hostfile} does not exist")
    if hostfile and deploy != "ray":
        raise ConfigError("experiment.runner.hostfile joins Ray worker nodes: it needs runner.deploy=ray")
    if deploy == "direct" and any(m.replicas > 1 for m in models):
        raise ConfigError("replicas > 1 needs Ray mode: set experiment.runner.deploy=ray (or auto)")
    exp_name = str(exp.get("exp_name") or "serve")
    run_dir = Path(str(exp.get("exp_dir") or Path("outputs") / exp_name)).expanduser().resolve()
    envs = tuple(sorted((str(k), str(v)) for k, v in (exp.get("envs") or {}).items()))
    return ServeSettings(
        exp_name=exp_name,
        run_dir=run_dir,
        host=runner.host or "127.0.0.1",
        port=runner.port,
        deploy=deploy,
        models=models,
        envs=envs,
        hostfile=Path(hostfile) if hostfile else None,
        ready_timeout=runner.ready_timeout,
        device=runner.device,
        visible_devices=runner.visible_devices,
        ray_port=runner.ray_port,
        ssh_port=runner.ssh_port,
        ssh_options=runner.ssh_options or (),
        health_check_period_s=runner.health_check_period_s,
        api_keys=tuple(dict.fromkeys((*(runner.api_keys or ()), *env_api_keys()))),
        max_body_bytes=runner.max_body_bytes,
        request_timeout=runner.request_timeout,
        drain_timeout=runner.drain_timeout,
        max_image_bytes=runner.max_image_bytes,
        max_image_pixels=runner.max_image_pixels,
        media_dirs=runner.media_dirs or (),
        public_url=runner.public_url.rstrip("/") if runner.public_url else None,
        extra={"config": {"experiment": exp, "serve": models_raw}},
    )  # what Ray replicas re-validate
