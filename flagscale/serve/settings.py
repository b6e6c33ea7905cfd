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
      engine: llama.cpp                 # llama.cpp | vllm | sglang (default: experiment.task.backend)
      engine_args: {model: /path/tiny.gguf, threads: 1, ctx_size: 512}   # snake_case -> --ctx-size
      replicas: 1
      autoscaling: {min_replicas: 1, max_replicas: 2}   # Ray Serve bounds (optional)

`deploy: auto` picks `direct` (one engine process per model, no proxy) for one model with one replica,
and `ray` (Ray Serve: one deployment per model, routed by model name) otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flagscale.errors import ConfigError

ENGINES = ("llama.cpp", "vllm", "sglang")
ENGINE_ALIASES = {"llama_cpp": "llama.cpp", "llamacpp": "llama.cpp", "llama-cpp": "llama.cpp"}
DEPLOYS = ("auto", "direct", "ray")
# The runner owns these: an engine arg of the same meaning would contradict runner.host/port or serve_id.
RUNNER_OWNED = {"host": "experiment.runner.host", "port": "experiment.runner.port",
                "alias": "serve_id", "served_model_name": "serve_id"}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MODEL_KEYS = {"serve_id", "engine", "engine_args", "replicas", "autoscaling", "port", "ray_actor_options"}
RUNNER_KEYS = {"host", "port", "deploy", "hostfile", "ready_timeout", "device", "visible_devices", "ray_port",
               "ssh_port", "ssh_options", "health_check_period_s"}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    engine: str
    engine_args: tuple[tuple[str, Any], ...]
    replicas: int = 1
    min_replicas: int | None = None  # set with max_replicas: Ray Serve autoscaling bounds
    max_replicas: int | None = None
    port: int | None = None  # direct mode: this model's port (default runner.port + its index)
    num_cpus: float = 1.0  # Ray Serve: CPUs one replica reserves

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
    device: str = "cpu"
    visible_devices: str | None = None
    ray_port: int = 6379
    ssh_port: int = 22  # Ray mode with a hostfile: how worker nodes are reached (as `flagscale train` does)
    ssh_options: tuple[str, ...] = ()  # extra `ssh -o Key=Value` options
    health_check_period_s: float = 2.0
    extra: dict = field(default_factory=dict, compare=False)

    def model(self, name: str) -> ModelSpec:
        for spec in self.models:
            if spec.name == name:
                return spec
        raise ConfigError(f"no model {name!r} in this config; served: {', '.join(m.name for m in self.models)}")

    def port_of(self, spec: ModelSpec) -> int:
        return spec.port if spec.port is not None else self.port + self.models.index(spec)


def _plain(node: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _int(value: Any, where: str, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{where}={value!r}: expected an integer >= {low}")
    return value


def _port(value: Any, where: str) -> int:
    port = _int(value, where, 1)
    if port > 65535:
        raise ConfigError(f"{where}={value}: a TCP port is at most 65535")
    return port


def _unknown(keys, allowed: set[str], where: str) -> None:
    import difflib

    for key in keys:
        if key not in allowed:
            near = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            hint = f" (did you mean {near[0]}?)" if near else f"; known: {', '.join(sorted(allowed))}"
            raise ConfigError(f"{where}.{key} is not a setting{hint}")


def _ssh_options(value: Any) -> tuple[str, ...]:
    from flagscale.runner.ssh import check_options

    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"experiment.runner.ssh_options={value!r}: expected a list of Key=Value ssh options")
    return check_options(value)


def engine_name(value: Any, where: str) -> str:
    name = ENGINE_ALIASES.get(str(value), str(value))
    if name not in ENGINES:
        raise ConfigError(f"{where}={value}: use one of {', '.join(ENGINES)}")
    return name


def parse_model(raw: Any, index: int, default_engine: str | None) -> ModelSpec:
    where = f"serve[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with serve_id, engine_args, ...; got {raw!r}")
    _unknown(raw, MODEL_KEYS, where)
    name = str(raw.get("serve_id") or "")
    if not NAME.fullmatch(name):
        raise ConfigError(f"{where}.serve_id={name!r}: give each model a name (letters, digits, . _ -); "
                          "clients send it as \"model\"")
    engine = engine_name(raw.get("engine") or default_engine or "", f"{where}.engine")
    args = raw.get("engine_args") or {}
    if not isinstance(args, dict):
        raise ConfigError(f"{where}.engine_args: expected a mapping of engine arguments, got {args!r}")
    args = {str(k).replace("-", "_"): v for k, v in args.items()}
    for key, owner in RUNNER_OWNED.items():
        if key in args:
            raise ConfigError(f"{where}.engine_args.{key}: set {owner} instead (the runner binds and names the "
                              "engine)")
    if not args.get("model"):
        raise ConfigError(f"{where}.engine_args.model: the model to serve (a GGUF file for llama.cpp, a checkpoint "
                          "folder or hub id for vLLM/SGLang) is required")
    replicas = _int(raw.get("replicas", 1), f"{where}.replicas", 1)
    low = high = None
    scaling = raw.get("autoscaling")
    if scaling:
        if not isinstance(scaling, dict):
            raise ConfigError(f"{where}.autoscaling: expected {{min_replicas: N, max_replicas: M}}")
        _unknown(scaling, {"min_replicas", "max_replicas"}, f"{where}.autoscaling")
        low = _int(scaling.get("min_replicas", 1), f"{where}.autoscaling.min_replicas", 0)
        high = _int(scaling.get("max_replicas", max(low, replicas)), f"{where}.autoscaling.max_replicas", 1)
        if low > high:
            raise ConfigError(f"{where}.autoscaling: min_replicas={low} exceeds max_replicas={high}")
    port = _port(raw["port"], f"{where}.port") if raw.get("port") is not None else None
    options = raw.get("ray_actor_options") or {}
    num_cpus = float(options.get("num_cpus", 1.0)) if isinstance(options, dict) else 1.0
    return ModelSpec(name, engine, tuple(sorted(args.items())), replicas, low, high, port, num_cpus)


def from_config(cfg: Any) -> ServeSettings:
    """Validate the composed config once; every later step trusts the result."""
    exp = cfg.get("experiment") if hasattr(cfg, "get") else None
    if exp is None:
        raise ConfigError("the config has no experiment section (exp_name, exp_dir, task, runner)")
    exp = _plain(exp)
    runner = exp.get("runner") or {}
    _unknown(runner, RUNNER_KEYS, "experiment.runner")
    models_raw = _plain(cfg.get("serve"))
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
    deploy = str(runner.get("deploy", "auto"))
    if deploy not in DEPLOYS:
        raise ConfigError(f"experiment.runner.deploy={deploy}: use one of {', '.join(DEPLOYS)}")
    scaled = len(models) > 1 or any(m.replicas > 1 or m.max_replicas for m in models)
    if deploy == "auto":
        deploy = "ray" if scaled else "direct"
    hostfile = runner.get("hostfile")
    if hostfile and not Path(hostfile).is_file():
        raise ConfigError(f"experiment.runner.hostfile={hostfile} does not exist")
    if hostfile and deploy != "ray":
        raise ConfigError("experiment.runner.hostfile joins Ray worker nodes: it needs runner.deploy=ray")
    if deploy == "direct" and any(m.replicas > 1 for m in models):
        raise ConfigError("replicas > 1 needs Ray Serve: set experiment.runner.deploy=ray (or auto)")
    exp_name = str(exp.get("exp_name") or "serve")
    run_dir = Path(str(exp.get("exp_dir") or Path("outputs") / exp_name)).expanduser().resolve()
    envs = tuple(sorted((str(k), str(v)) for k, v in (exp.get("envs") or {}).items()))
    return ServeSettings(
        exp_name=exp_name, run_dir=run_dir, host=str(runner.get("host") or "127.0.0.1"),
        port=_port(runner.get("port", 8000), "experiment.runner.port"), deploy=deploy, models=models, envs=envs,
        hostfile=Path(hostfile) if hostfile else None,
        ready_timeout=float(runner.get("ready_timeout", 120)), device=str(runner.get("device") or "cpu"),
        visible_devices=str(runner["visible_devices"]) if runner.get("visible_devices") is not None else None,
        ray_port=_port(runner.get("ray_port", 6379), "experiment.runner.ray_port"),
        ssh_port=_port(runner.get("ssh_port", 22), "experiment.runner.ssh_port"),
        ssh_options=_ssh_options(runner.get("ssh_options")),
        health_check_period_s=float(runner.get("health_check_period_s", 2.0)),
        extra={"config": {"experiment": exp, "serve": models_raw}})  # what Ray replicas re-validate
