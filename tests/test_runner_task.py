"""One task protocol for train, serve and infer: `run_action` calls the method an action names.

The tasks here are the real ones, on the examples' configs and empty run folders (nothing is started).
"""

from __future__ import annotations

import json

import pytest
from conftest import REPO_ROOT

from flagscale import infer, serve, train
from flagscale.errors import ConfigError
from flagscale.infer.settings import from_config as infer_settings
from flagscale.runner.config import ACTIONS, compose
from flagscale.runner.task import Task, run_action
from flagscale.train.settings import to_plain

GPT, LLAMA = REPO_ROOT / "examples" / "tiny_gpt" / "conf", REPO_ROOT / "examples" / "tiny_llama" / "conf"


class Recorder:
    """A task that only notes which action ran and answers a fixed exit status."""

    def __init__(self, answer):
        self.answer, self.done = answer, []

    def plan(self):
        return "the plan"

    def _act(self, action):
        self.done.append(action)
        return self.answer

    def dryrun(self):
        return self._act("dryrun")

    def run(self):
        return self._act("run")

    def stop(self):
        return self._act("stop")

    def status(self):
        return self._act("status")

    def auto_tune(self):
        return self._act("auto_tune")


def test_each_action_calls_the_method_of_its_name():
    for action in ACTIONS:
        task = Recorder(3)
        assert run_action(task, action) == 3 and task.done == [action]
    assert run_action(Recorder(None), "run") == 0  # no status returned reads as success


def test_an_action_outside_the_four_is_refused_before_anything_runs():
    task = Recorder(0)
    with pytest.raises(ValueError, match="unknown action 'plan'"):
        run_action(task, "plan")
    assert task.done == []


def test_train_serve_and_infer_tasks_follow_the_protocol(tmp_path):
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF")
    cfgs = {
        train: compose(GPT, "train", [f"experiment.exp_dir={tmp_path}"]),
        serve: compose(LLAMA, "serve", [f"experiment.exp_dir={tmp_path}"]),
    }
    for module, cfg in cfgs.items():
        assert isinstance(module.make_task(cfg), Task)
    settings = infer_settings(
        compose(LLAMA, "infer", [f"experiment.exp_dir={tmp_path}", f"infer.model={tmp_path / 'tiny.gguf'}"])
    )
    assert isinstance(infer.InferTask(settings), Task)


def test_train_status_and_stop_need_only_the_experiment(tmp_path, capsys):
    cfg = compose(GPT, "train", [f"experiment.exp_dir={tmp_path}", "action=status"])
    assert train.main(cfg) == 0
    out = capsys.readouterr().out  # the monitor's status table, of a job that never ran
    assert out.startswith("experiment tiny_gpt: unknown, restarts 0/3\n") and "node0  localhost  unknown" in out, out
    plain = {k: v for k, v in to_plain(cfg).items() if k != "train"}  # stop and status plan no task
    assert run_action(train.TrainTask(plain), "stop") == 0
    assert capsys.readouterr().out == "stopped: nothing was running\n"
    with pytest.raises(ConfigError, match="the config has no train section"):
        run_action(train.TrainTask(plain), "dryrun")


def test_train_dryrun_plans_and_validates_the_task(tmp_path):
    cfg = compose(
        GPT, "train", [f"experiment.exp_dir={tmp_path}", f"train.data.data_path={tmp_path}/none", "action=dryrun"]
    )
    with pytest.raises(ConfigError, match=f"train.data.data_path: {tmp_path}/none.bin does not exist"):
        train.main(cfg)
    assert not (tmp_path / "scripts").exists()


def test_serve_status_of_an_empty_folder(tmp_path, capsys):
    cfg = compose(LLAMA, "serve", [f"experiment.exp_dir={tmp_path}", "action=status"])
    assert serve.main(cfg) == 1
    assert capsys.readouterr().out == f"nothing was started in {tmp_path}\n"


def test_infer_task_actions_on_an_empty_folder(tmp_path, capsys):
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF")
    settings = infer_settings(
        compose(LLAMA, "infer", [f"experiment.exp_dir={tmp_path}", f"infer.model={tmp_path / 'tiny.gguf'}"])
    )
    task = infer.InferTask(settings)
    assert run_action(task, "status") == 1
    assert capsys.readouterr().out == f"nothing was started in {tmp_path}\n"
    assert run_action(task, "stop") == 0
    assert capsys.readouterr().out == "nothing was running\n"
    assert run_action(task, "dryrun") == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["cmd"][1:] == ["-m", "flagscale.infer.batch", str(tmp_path / "infer.json")]
    assert printed["settings"]["model"] == str(tmp_path / "tiny.gguf")
    assert not (tmp_path / "infer.json").exists()  # a dry run writes nothing
