"""Which experiment `flagscale serve|infer CONFIG` means: a conf folder, a YAML file, or a model name.

A model name is one-click: `flagscale serve tiny_llama` uses examples/tiny_llama/conf/serve.yaml of this
checkout (or ./examples), and `flagscale serve tiny_llama my_models.yaml` serves the models listed in
my_models.yaml (a task YAML) instead of the example's own list.
"""

from __future__ import annotations

from pathlib import Path

from flagscale.errors import ConfigError


def _examples_dirs() -> list[Path]:
    dirs = [Path.cwd() / "examples"]
    try:
        from flagscale.upstream.project import Project

        dirs.append(Project.find().root / "examples")
    except Exception:  # not inside a checkout: only ./examples
        pass
    return dirs


def resolve(config: str, config_name: str) -> tuple[Path, str]:
    """(config folder, experiment name) for CONFIG."""
    path = Path(config).expanduser()
    if path.is_dir():
        return path, config_name
    if path.is_file() or path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"{path} does not exist")
        return path.parent, path.stem
    if "/" not in config:
        for examples in _examples_dirs():
            conf = examples / config / "conf"
            if (conf / f"{config_name}.yaml").is_file():
                return conf, config_name
        known = sorted(
            {p.parent.parent.name for d in _examples_dirs() if d.is_dir() for p in d.glob(f"*/conf/{config_name}.yaml")}
        )
        raise ConfigError(
            f"{config!r} is neither a config folder, a YAML file, nor a model under examples/ with "
            f"conf/{config_name}.yaml; models: {', '.join(known) or 'none'}"
        )
    raise ConfigError(f"{config} does not exist")


def compose_for(config: str, config_name: str, args: list[str], task: str):
    """Compose CONFIG with overrides; a leading `*.yaml` argument is the one-click model list (serve)."""
    from omegaconf import OmegaConf, open_dict

    from flagscale.runner.config import compose

    model_yaml = None
    if args and "=" not in args[0] and args[0].endswith((".yaml", ".yml")):
        model_yaml, args = Path(args[0]).expanduser(), args[1:]
        if not model_yaml.is_file():
            raise ConfigError(f"model config {model_yaml} does not exist")
    folder, name = resolve(config, config_name)
    cfg = compose(folder, name, args)
    if model_yaml is not None:
        try:
            models = OmegaConf.load(model_yaml)
        except Exception as exc:
            raise ConfigError(f"{model_yaml}: {exc}") from None
        with open_dict(cfg):
            cfg[task] = models
    return cfg
