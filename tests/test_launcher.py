"""`flagscale train` as a launcher, without torch: the real CLI, Hydra, bash, launch scripts and recorded
process groups, with a stand-in interpreter (`experiment.runner.python`) that records the argv and
environment it got instead of starting torchrun. The real training runs are in tests/test_train.py.

Covers: dry runs print the exact commands and write nothing; `run.py` and `flagscale train` agree;
bad input fails with one line before anything is written; config values reach the job verbatim
(no shell injection); `action=stop` stops the job's whole process group and nothing else;
`action=status` reports it; `flagscale --help` imports neither torch nor hydra.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, flagscale_cli, pid_alive, wait_until

CONF = REPO_ROOT / "examples" / "tiny_gpt" / "conf"
HOSTILE = "$(touch PWNED) `touch PWNED2`; touch PWNED3 'x\" &"


def hydra_quote(value: str) -> str:
    """`value` as one quoted Hydra override value (Hydra's grammar, not a shell's)."""
    return "'" + value.replace("'", "\\'") + "'"


FAKE_PYTHON = """#!{python}
# Stands in for the nodes' python: records what torchrun would have been started with.
import json, os, sys, time
config = sys.argv[sys.argv.index("--config") + 1]
out = os.path.join(os.path.dirname(os.path.dirname(config)), "fake-%d.json" % os.getpid())
with open(out, "w") as f:
    json.dump({{"argv": sys.argv, "env": dict(os.environ), "pid": os.getpid(), "cwd": os.getcwd()}}, f)
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
"""


@pytest.fixture
def exp(tmp_path):
    """A scratch folder with (empty) data files, a stand-in interpreter and the overrides pointing at them."""
    data = tmp_path / "data"
    data.mkdir()
    for suffix in (".bin", ".idx"):
        (data / f"corpus{suffix}").write_bytes(b"")
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    exp_dir = tmp_path / "exp dir 'quoted'"

    class Exp:
        root = tmp_path
        dir = exp_dir
        overrides = [
            f"experiment.exp_dir={hydra_quote(str(exp_dir))}",
            f"train.data.data_path={data / 'corpus'}",
            f"experiment.runner.python={fake}",
        ]

        def fakes(self) -> list[dict]:
            return [json.loads(p.read_text()) for p in sorted(exp_dir.glob("fake-*.json"))]

    return Exp()


def train(exp, *overrides: str, config: str = "train", extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return flagscale_cli("train", str(CONF), "--config-name", config, *extra, *exp.overrides, *overrides, cwd=exp.root)


def test_help_imports_neither_torch_nor_hydra():
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('HEAVY', sorted(m for m in ('torch', 'megatron', 'hydra', 'omegaconf')"
        " if m in sys.modules)))\n"
        "from flagscale.cli import run\nsys.argv = ['flagscale', 'train', '--help']\nrun()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "config_dir" in result.stdout.lower(), result.stdout + result.stderr
    assert result.stdout.strip().endswith("HEAVY []"), result.stdout[-500:]


def test_dryrun_prints_the_exact_commands_and_writes_nothing(exp):
    result = train(exp, "action=dryrun", "experiment.runner.master_port=29555", config="tp2")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "world size 2" in out
    torchrun = next(line for line in out.splitlines() if "torch.distributed.run" in line)
    argv = shlex.split(torchrun)
    assert argv[1:3] == ["-m", "torch.distributed.run"]
    assert "--nproc-per-node=2" in argv and "--rdzv-endpoint=127.0.0.1:29555" in argv
    assert (
        argv[-4:] == ["flagscale.train.driver", "--config", str(exp.dir / "config" / "train.json")][-3:]
        or argv[-3:] == ["flagscale.train.driver", "--config", str(exp.dir / "config" / "train.json")][-3:]
    )
    assert "export MEGATRON_COLLECTIVE_BACKEND=gloo" in out  # from hardware/cpu/device.toml
    assert not exp.dir.exists(), "a dry run wrote files"


def test_dryrun_prints_the_parameters_of_every_pipeline_stage(exp):
    """The counts come from the shapes (tests/test_shapes.py checks them against megatron.core's build)."""
    from flagscale.train.settings import train_settings
    from flagscale.train.shapes import stage_parameters

    layout = ["train.system.tensor_model_parallel_size=1", "train.system.pipeline_model_parallel_size=2"]
    result = train(exp, "action=dryrun", "+train.model.family=llama", *layout, config="tp2")  # world size 2
    assert result.returncode == 0, result.stderr
    model = train_settings({"model": {"family": "llama"}, "data": {"data_path": "-"}}).model
    for stage in stage_parameters(model, 257, 1, 2):  # the byte tokenizer's 257 ids
        assert f"#   stage {stage.stage}: {stage.total:,} on each of its 1 TP rank(s)" in result.stdout, result.stdout


def test_run_py_and_flagscale_train_print_the_same_plan(exp):
    args = ["action=dryrun", "experiment.runner.master_port=29556", *exp.overrides]
    via_cli = train(exp, "action=dryrun", "experiment.runner.master_port=29556", config="dp2")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    via_run_py = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run.py"), "--config-path", str(CONF), "--config-name", "dp2", *args],
        cwd=exp.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert via_cli.returncode == 0 and via_run_py.returncode == 0, via_cli.stderr + via_run_py.stderr
    assert via_cli.stdout == via_run_py.stdout


def test_multinode_dryrun_quotes_every_ssh_command(exp):
    hostfile = exp.root / "hosts"
    hostfile.write_text("127.0.0.1 slots=2 type=cpu\nnode-b slots=2\n")
    result = train(
        exp,
        "action=dryrun",
        "experiment.runner.nnodes=2",
        "experiment.runner.nproc_per_node=2",
        f"experiment.runner.hostfile={hostfile}",
        f"+experiment.envs.EVIL={hydra_quote(HOSTILE)}",
        "+experiment.device_type_envs.cpu.ONLY_CPU=1",
        "+experiment.node_envs.node-b.ONLY_B=1",
    )
    assert result.returncode == 0, result.stderr
    ssh_lines = [line[2:] for line in result.stdout.splitlines() if line.startswith("$ ssh ")]
    assert len(ssh_lines) == 4  # upload + start per node
    start = shlex.split(ssh_lines[-1])
    assert start[:6] == ["ssh", "-o", "BatchMode=yes", "-p", "22", "--"] and start[6] == "node-b"
    remote = shlex.split(start[7])  # what the remote shell runs: the agent, with every word intact
    assert remote[1:4] == ["-m", "flagscale.train.node", "start"]
    assert remote[remote.index("--run-dir") + 1] == str(exp.dir)
    assert remote[-2:] == ["bash", str(exp.dir / "scripts" / "node1.sh")]
    scripts = result.stdout.split("# node ")[1:]
    assert "export ONLY_CPU=1" in scripts[0] and "ONLY_B" not in scripts[0]
    assert "export ONLY_B=1" in scripts[1] and "ONLY_CPU" not in scripts[1]
    assert "--rdzv-endpoint=127.0.0.1:29500" in scripts[1]  # the first host is the master
    assert f"export EVIL={shlex.quote(HOSTILE)}" in scripts[1]


def test_bad_ssh_option_fails_before_anything_is_written(exp):
    hostfile = exp.root / "hosts"
    hostfile.write_text("127.0.0.1 slots=2\nnode-b slots=2\n")
    result = train(
        exp,
        "experiment.runner.nnodes=2",
        f"experiment.runner.hostfile={hostfile}",
        "experiment.runner.ssh_options=['-oProxyCommand=touch PWNED']",
        config="dp2",
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == (
        "error: experiment.runner.ssh_options: '-oProxyCommand=touch PWNED' is not an ssh option (Key=Value)"
    ), result.stderr
    assert not exp.dir.exists(), "something was written or launched"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["experiment.runner.nnodes=2", "experiment.runner.hostfile={root}/no-hosts"],
            "hostfile .*no-hosts does not exist",
        ),
        (["experiment.runner.nnodes=2"], "needs experiment.runner.hostfile"),
        (
            ["train.model.num_layerz=4"],
            r"Could not override 'train.model.num_layerz'.*did you mean train.model.num_layers",
        ),
        (["+train.model.num_layerz=4"], r"train.model.num_layerz: unknown key \(did you mean 'num_layers'\?\)"),
        (["train.system.tensor_model_parallel_size=3"], "does not divide the world size 2"),
        (
            ["train.data.data_path={root}/missing/corpus"],
            r"missing/corpus.bin does not exist.*tools/preprocess_data.py",
        ),
        (["train.model.num_layers=two"], "train.model.num_layers='two': expected an integer"),
        (["action=launch"], "action=launch: use one of run, dryrun, stop, status"),
    ],
)
def test_bad_input_fails_in_one_line_before_anything_is_launched(exp, overrides, message):
    import re

    result = train(exp, *(o.format(root=exp.root) for o in overrides), config="dp2")
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not exp.dir.exists(), "something was written or launched"


def test_missing_backend_is_reported_before_launch(exp):
    """Without experiment.runner.python the nodes run flagscale's own interpreter: it must have megatron."""
    from importlib.util import find_spec

    if find_spec("torch") is not None and find_spec("megatron") is not None:
        pytest.skip("this environment has torch and megatron-core: nothing is missing")
    overrides = [o for o in exp.overrides if not o.startswith("experiment.runner.python=")]
    result = flagscale_cli("train", str(CONF), *overrides, cwd=exp.root)
    assert result.returncode == 2 and "not installed for" in result.stderr, result.stdout + result.stderr
    assert "megatron-core" in result.stderr
    assert not exp.dir.exists()


def test_config_values_reach_the_job_verbatim(exp):
    result = train(
        exp, "--foreground", f"+experiment.envs.EVIL={hydra_quote(HOSTILE)}", "train.model.num_layers=4", extra=()
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [job] = exp.fakes()
    assert job["env"]["EVIL"] == HOSTILE
    assert job["env"]["MEGATRON_DEVICE_TYPE"] == "cpu" and job["env"]["OMP_NUM_THREADS"] == "1"
    assert job["cwd"] == str(exp.dir)
    assert job["argv"][1:3] == ["-m", "torch.distributed.run"]
    for folder in (exp.root, exp.dir, Path.cwd()):
        assert not list(folder.glob("PWNED*")), "a config value ran as a shell command"
    written = json.loads((exp.dir / "config" / "train.json").read_text())
    assert written["train"]["model"]["num_layers"] == 4
    assert (exp.dir / "pids" / "node0.exit").read_text().strip() == "0"


def test_stop_stops_the_job_and_leaves_a_lookalike_alive(exp):
    started = train(exp, "+experiment.envs.FAKE_SLEEP=300")
    assert started.returncode == 0, started.stderr
    assert "started node0" in started.stdout
    assert wait_until(lambda: len(exp.fakes()) == 1), "the job did not start"
    [job] = exp.fakes()
    record = json.loads((exp.dir / "pids" / "node0.json").read_text())
    script = exp.dir / "scripts" / "node0.sh"
    # Lookalikes: the same words on their command lines, started by someone else.
    decoys = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import time; time.sleep(300)",
                "-m",
                "torch.distributed.run",
                "-m",
                "flagscale.train.driver",
                "--config",
                str(exp.dir / "config" / "train.json"),
            ]
        ),
        subprocess.Popen(["bash", "-c", "sleep 300", str(script)]),
    ]
    try:
        status = train(exp, "action=status", "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["nodes"] == [{"name": "node0", "host": "localhost", "state": "running"}]
        assert "node0  localhost  running" in train(exp, "action=status").stdout  # the table
        again = train(exp, "+experiment.envs.FAKE_SLEEP=300")  # a second start of a running experiment
        assert again.returncode == 2 and "already running" in again.stderr, again.stderr

        stopped = train(exp, "action=stop")
        assert stopped.returncode == 0 and "stopped: node0" in stopped.stdout, stopped.stdout + stopped.stderr
        assert wait_until(lambda: not pid_alive(job["pid"]) and not pid_alive(record["pid"]), 10)
        assert all(d.poll() is None for d in decoys), "action=stop killed an unrelated process"
        status = json.loads(train(exp, "action=status", "--json").stdout)
        assert status["nodes"][0]["state"] == "stopped" and status["state"] == "stopped", status
        assert "nothing was running" in train(exp, "action=stop").stdout
    finally:
        for d in decoys:
            d.send_signal(signal.SIGKILL)
            d.wait()
