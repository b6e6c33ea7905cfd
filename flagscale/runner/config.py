"""Hydra configs as FlagScale users know them: an experiment YAML that pulls in a task YAML.

`compose` is the one place a config is read, for `flagscale train|infer|serve` and `run.py` alike, so
both faces accept the same overrides and fail with the same one-line errors.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence
from pathlib import Path

from flagscale.errors import ConfigError
from flagscale.settings import closest, nearest

ACTIONS = ("run", "dryrun", "stop", "status", "auto_tune")
TASKS = ("train", "infer", "serve", "compress")


def compose(config_dir: Path | str, config_name: str, overrides: Sequence[str] = ()):
    """The experiment config `config_dir/config_name.yaml` with its defaults list and `overrides` applied."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    folder = Path(config_dir).expanduser().resolve()
    name = config_name[:-5] if config_name.endswith(".yaml") else config_name
    if not folder.is_dir():
        raise ConfigError(
            f"config folder {folder} does not exist: pass the folder that holds {name}.yaml "
            "(for example examples/tiny_gpt/conf)"
        )
    if not (folder / f"{name}.yaml").is_file():
        found = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ConfigError(
            f"{folder / (name + '.yaml')} does not exist{nearest(name, found)}; "
            f"configs there: {', '.join(found) or 'none'}"
        )
    GlobalHydra.instance().clear()  # compose may run more than once in a process (tests, run.py)
    try:
        with initialize_config_dir(config_dir=str(folder), version_base=None, job_name="flagscale"):
            try:
                return hydra_compose(config_name=name, overrides=list(overrides))
            except (HydraException, OmegaConfBaseException) as exc:
                raise ConfigError(
                    f"{folder / (name + '.yaml')}: {_one_line(exc)}"
                    f"{_override_hint(exc, hydra_compose, name, overrides)}"
                ) from None
    finally:
        GlobalHydra.instance().clear()


def action_of(cfg) -> str:
    """`action=run|dryrun|stop|status|auto_tune` (default run)."""
    action = str(cfg.get("action", "run") or "run")
    if action not in ACTIONS:
        raise ConfigError(f"action={action}: use one of {', '.join(ACTIONS)}{nearest(action, ACTIONS)}")
    return action


def task_type(cfg) -> str:
    """`experiment.task.type`: which of train, infer, serve, compress runs this config."""
    try:
        task = str(cfg.experiment.task.type)
    except Exception:  # omegaconf raises several kinds for a missing node
        raise ConfigError("the config has no experiment.task.type: set it to train, infer, serve or compress") from None
    if task not in TASKS:
        raise ConfigError(f"experiment.task.type={task}: use one of {', '.join(TASKS)}{nearest(task, TASKS)}")
    return task


def dispatch(cfg) -> int:
    """Run the config's task (`flagscale.<type>.main`) and return its exit status."""
    return int(importlib.import_module(f"flagscale.{task_type(cfg)}").main(cfg) or 0)


def _one_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # Hydra's own "To append to your config use +key=value" advice stays; omegaconf's full_key/object_type
    # trailer repeats what the first line says.
    return "; ".join(line for line in lines if not line.startswith(("full_key:", "object_type=", "reference_type=")))


def _override_hint(exc: Exception, hydra_compose, name: str, overrides: Sequence[str]) -> str:
    """For `Could not override 'a.b.c'`, the nearest existing key under `a.b`."""
    match = re.search(r"Could not override '([^']+)'", str(exc))
    if not match:
        return ""
    key = match.group(1)
    parent, _, leaf = key.rpartition(".")
    rest = [o for o in overrides if not o.lstrip("+~").startswith(key + "=")]
    try:
        node = hydra_compose(config_name=name, overrides=rest)
        for part in filter(None, parent.split(".")):
            node = node[part]
        keys = [str(k) for k in node.keys()]
    except Exception:  # another override is bad too, or the parent is not a mapping: no hint
        return ""
    near = closest(leaf, keys)
    return f" (did you mean {'.'.join(filter(None, [parent, near]))}?)" if near else ""
