"""Hydra composition of experiment + task configs, and its one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from flagscale.errors import ConfigError
from flagscale.runner.config import action_of, compose, task_type

EXPERIMENT = """\
defaults:
  - _self_
  - train: tiny

experiment:
  exp_name: demo
  exp_dir: ./outputs/demo
  task:
    type: train
    backend: megatron
action: run
"""
TASK = """\
model:
  num_layers: 2
  hidden_size: 64
system:
  tensor_model_parallel_size: 1
"""


@pytest.fixture
def conf(tmp_path):
    (tmp_path / "conf" / "train").mkdir(parents=True)
    (tmp_path / "conf" / "train.yaml").write_text(EXPERIMENT)
    (tmp_path / "conf" / "train" / "tiny.yaml").write_text(TASK)
    return tmp_path / "conf"


def test_compose_pulls_in_the_task_and_applies_overrides(conf):
    cfg = compose(conf, "train", ["train.model.num_layers=4", "action=dryrun"])
    assert cfg.train.model.num_layers == 4 and cfg.train.model.hidden_size == 64
    assert cfg.experiment.exp_name == "demo"
    assert action_of(cfg) == "dryrun" and task_type(cfg) == "train"
    assert compose(conf, "train.yaml").train.model.num_layers == 2  # composing twice in one process


def test_bad_override_key_names_the_nearest(conf):
    with pytest.raises(ConfigError) as info:
        compose(conf, "train", ["train.model.num_layerz=4"])
    message = str(info.value)
    assert "Could not override 'train.model.num_layerz'" in message
    assert "did you mean train.model.num_layers?" in message
    assert "\n" not in message


def test_missing_folder_file_and_bad_values(conf, tmp_path):
    with pytest.raises(ConfigError, match="config folder .* does not exist"):
        compose(tmp_path / "nope", "train")
    with pytest.raises(
        ConfigError, match=r"trian.yaml does not exist \(did you mean 'train'\?\); configs there: train"
    ):
        compose(conf, "trian")
    with pytest.raises(ConfigError, match="action=rn: use one of run, dryrun, stop, status"):
        action_of(compose(conf, "train", ["action=rn"]))
    with pytest.raises(ConfigError, match="experiment.task.type=trian.*did you mean 'train'"):
        task_type(compose(conf, "train", ["experiment.task.type=trian"]))
    (conf / "train.yaml").write_text(EXPERIMENT.replace("train: tiny", "train: huge"))
    with pytest.raises(ConfigError, match="huge"):
        compose(conf, "train")


def test_run_py_reports_config_errors_in_one_line(conf):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "run.py"),
            "--config-path",
            str(conf),
            "--config-name",
            "train",
            "experiment.task.type=bogus",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: experiment.task.type=bogus: use one of train, infer, serve, compress"
    ]
