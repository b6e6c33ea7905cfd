"""From a composed config to torchrun on every node: plan, dry run, start, stop, status.

One torchrun per node. A single node without a hostfile runs here; with a hostfile every node is
reached over ssh and a small agent there (`python -m flagscale.train.node`) starts, stops and reports
the node's torchrun with the same pid records as a local run. Every node gets a generated launch script
(`<exp_dir>/scripts/node<i>.sh`: cd, exports, before/after commands, torchrun), sent over ssh's stdin,
so config values reach a shell only as `shlex.quote`d words.

`plan()` validates everything (settings, hostfile, parallel sizes, data files, device manifest)
before anything is written or started; `action=dryrun` prints exactly what `action=run` would run.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from flagscale.errors import ConfigError, FlagScaleError, LaunchError
from flagscale.runner import monitor, process
from flagscale.runner.environment import device_environment
from flagscale.runner.hostfile import Node, read_hostfile
from flagscale.runner.ssh import check_options as check_ssh_options
from flagscale.runner.ssh import ssh_command as ssh_argv
from flagscale.train import hetero, hf_start
from flagscale.train.settings import ExperimentSettings, TrainSettings, as_dict, experiment_settings, train_settings
from flagscale.train.shapes import stage_parameters, total_parameters
from flagscale.train.tokenizer import ByteTokenizer

DRIVER_MODULE = "flagscale.train.driver"
NODE_AGENT = "flagscale.train.node"
SSH_TIMEOUT = 60
# Variables a parent torchrun or scheduler may have set: they would confuse the nodes' own torchrun.
_INHERITED_DROP = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)


@dataclass(frozen=True)
class NodePlan:
    rank: int
    host: str  # "localhost" for the single local node
    nproc: int
    type: str | None
    remote: bool
    script: Path
    script_text: str = ""  # written by `plan` only: stop and status never run it

    @property
    def name(self) -> str:
        return f"node{self.rank}"


@dataclass(frozen=True)
class Job:
    """An experiment's folder and nodes: all that stop and status need (no task, no scripts)."""

    exp: ExperimentSettings
    exp_dir: Path
    python: str
    nodes: tuple[NodePlan, ...]

    @property
    def multi_node(self) -> bool:
        return any(n.remote for n in self.nodes)


@dataclass(frozen=True)
class LaunchPlan(Job):
    """A job ready to start: the validated task, the driver's config file and every node's script."""

    train: TrainSettings
    config_file: Path
    world_size: int


# ------------------------------------------------------------------------------------------ planning
def _nodes_of(exp: ExperimentSettings) -> list[Node]:
    r = exp.runner
    if not r.hostfile:
        return [Node("localhost", r.nproc_per_node)]
    hosts = read_hostfile(Path(r.hostfile).expanduser())
    if r.nnodes > len(hosts):
        raise ConfigError(f"experiment.runner.nnodes={r.nnodes} but hostfile {r.hostfile} lists {len(hosts)} host(s)")
    nodes = hosts[: r.nnodes]
    short = [n for n in nodes if n.slots < r.nproc_per_node]
    if short:
        raise ConfigError(
            f"hostfile {r.hostfile}: {short[0].host} has slots={short[0].slots}, fewer than "
            f"experiment.runner.nproc_per_node={r.nproc_per_node}"
        )
    return nodes


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_value(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return "" if value is None else str(value)


def node_environment(exp: ExperimentSettings, node: NodePlan, device_env: dict[str, str]) -> dict[str, str]:
    """Device manifest, then global envs, then the node's device type's, then the node's own (last wins)."""
    env = dict(device_env)
    env.update({k: _env_value(v) for k, v in exp.envs.items()})
    if node.type is not None:
        env.update({k: _env_value(v) for k, v in exp.device_type_envs.get(node.type, {}).items()})
    env.update({k: _env_value(v) for k, v in exp.node_envs.get(node.host, {}).items()})
    return env


def torchrun_command(
    plan_python: str,
    exp: ExperimentSettings,
    node_rank: int | str,  # str: a value the script reads when it runs (Slurm: flagscale/train/slurm.py)
    nnodes: int | str,
    nproc: int,
    master_addr: str,
    master_port: int | str,
    config_file: Path,
) -> list[str]:
    r = exp.runner
    cmd = [plan_python, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}"]
    if r.rdzv_backend == "static":
        cmd += [f"--node-rank={node_rank}", f"--master-addr={master_addr}", f"--master-port={master_port}"]
    else:
        cmd += [
            f"--rdzv-backend={r.rdzv_backend}",
            f"--rdzv-endpoint={master_addr}:{master_port}",
            f"--rdzv-id={r.rdzv_id or exp.exp_name}",
        ]
    cmd += ["--max-restarts=0"]
    if exp.task.entrypoint:
        cmd += [exp.task.entrypoint]
    else:
        cmd += ["-m", DRIVER_MODULE]
    return cmd + ["--config", str(config_file)]


def before_start_lines(exp: ExperimentSettings) -> list[str]:
    """experiment.cmds.before_start in a node script: its failure ends the node before torchrun starts."""
    if not exp.cmds.before_start:
        return []
    return [
        "# experiment.cmds.before_start",
        exp.cmds.before_start,
        'status=$?; [ "$status" -eq 0 ] || { echo "flagscale: before_start failed ($status)" >&2; exit "$status"; }',
    ]


def launch_script(
    exp: ExperimentSettings, node: NodePlan, nnodes: int, exp_dir: Path, env: dict[str, str], torchrun: list[str]
) -> str:
    lines = [
        "#!/usr/bin/env bash",
        f"# Generated by `flagscale train`: experiment {exp.exp_name}, node {node.rank} of {nnodes} "
        f"({node.host}, {node.nproc} processes).",
        f"cd {shlex.quote(str(exp_dir))} || exit 1",
    ]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines += before_start_lines(exp)
    lines += [shlex.join(torchrun), "status=$?"]
    if exp.cmds.after_stop:
        lines += ["# experiment.cmds.after_stop", exp.cmds.after_stop]
    lines += ['exit "$status"', ""]
    return "\n".join(lines)


def _resolve_paths(train: TrainSettings, exp_dir: Path) -> TrainSettings:
    """Paths in the task become absolute (relative to the folder flagscale runs in): nodes cd elsewhere."""

    def absolute(p: str | None) -> str | None:
        return None if p is None else str(Path(p).expanduser().resolve())

    data = replace(
        train.data,
        data_path=str(Path(train.data.data_path).expanduser().resolve()),
        sft=replace(train.data.sft, path=absolute(train.data.sft.path or None) or ""),
        tokenizer=replace(train.data.tokenizer, path=absolute(train.data.tokenizer.path)),
    )
    ckpt = train.system.checkpoint
    ckpt = replace(ckpt, save=absolute(ckpt.save), load=absolute(ckpt.load))
    logging = train.system.logging
    logging = replace(logging, metrics_file=absolute(logging.metrics_file) or str(exp_dir / "logs" / "metrics.jsonl"))
    return replace(train, data=data, system=replace(train.system, checkpoint=ckpt, logging=logging))


def _check_inputs(train: TrainSettings) -> None:
    prefix = train.data.data_path
    if train.data.format == "sft":  # every record checked now: a bad one fails before anything is written
        from flagscale.train.sft import check_file

        check_file(train.data.sft.path)
    for suffix in (".bin", ".idx") if train.data.format == "pretrain" else ():
        if not Path(prefix + suffix).is_file():
            raise ConfigError(
                f"train.data.data_path: {prefix}{suffix} does not exist; make the .bin/.idx pair "
                "with tools/preprocess_data.py (or fix the path)"
            )
    tok = train.data.tokenizer
    if tok.type == "hf" and not (tok.path and Path(tok.path).is_dir()):
        raise ConfigError(f"train.data.tokenizer.path: {tok.path} is not a folder with a tokenizer")
    load = train.system.checkpoint.load
    if load and not Path(load).is_dir():
        raise ConfigError(f"train.system.checkpoint.load: {load} does not exist")


def _check_runtime(python: str) -> None:
    """When the nodes run this very interpreter: are torch and megatron-core there? (Cheap: no import.)"""
    from importlib.util import find_spec

    def missing(module: str) -> bool:
        try:
            return find_spec(module) is None
        except ModuleNotFoundError:  # the parent package is missing
            return True

    absent = [name for module, name in (("torch", "torch"), ("megatron.core", "megatron-core")) if missing(module)]
    if absent:
        raise LaunchError(
            f"{' and '.join(absent)} not installed for {python}: install the backend "
            '(pip install ".[train]" -C device=... -C backend=megatron) '
            "or set experiment.runner.python"
        )


def job(plain: dict) -> Job:
    """The experiment's folder and nodes, as stop and status need them; nothing is written or started."""
    if not isinstance(plain.get("experiment"), dict):
        raise ConfigError("the config has no experiment section")
    exp = experiment_settings(plain["experiment"])
    exp_dir = Path(exp.exp_dir).expanduser().resolve()
    python = exp.runner.python or sys.executable
    if exp.runner.launcher == "slurm":  # Slurm picks the nodes when the job starts (flagscale/train/slurm.py)
        return Job(exp, exp_dir, python, ())
    hosts = _nodes_of(exp)
    remote = bool(exp.runner.hostfile)
    if remote:
        check_ssh_options(exp.runner.ssh_options)  # now, not at the first ssh (after the files are written)
    nodes = tuple(
        NodePlan(i, n.host, exp.runner.nproc_per_node, n.type, remote, exp_dir / "scripts" / f"node{i}.sh")
        for i, n in enumerate(hosts)
    )
    return Job(exp, exp_dir, python, nodes)


def plan(plain: dict) -> LaunchPlan:
    """Validate the config and work out every node's script; nothing is written or started."""
    base = job(plain)
    exp, exp_dir, python = base.exp, base.exp_dir, base.python
    if "train" not in plain:
        raise ConfigError(
            "the config has no train section: add a task YAML to the defaults list (e.g. `- train: tiny`)"
        )
    world_size = exp.runner.nproc_per_node * (len(base.nodes) or exp.runner.slurm.nodes or exp.runner.nnodes)
    # checkpoint.hf_model: the architecture and tokenizer come from the folder (imported at run, not here)
    train = _resolve_paths(train_settings(hf_start.merge(plain["train"])), exp_dir)
    train.check(world_size)
    if train.system.hetero is not None:  # the hostfile's type= against the meshes
        r = exp.runner
        hetero.check_nodes(train, list(base.nodes), r.nproc_per_node, r.hostfile, r.rdzv_backend)
    _check_inputs(train)
    device_env = device_environment(exp.runner.device, exp.runner.visible_devices)
    if train.system.precision == "fp16" and device_env.get("MEGATRON_DEVICE_TYPE") == "cpu":
        raise ConfigError("train.system.precision=fp16 needs an accelerator; on the cpu device use fp32 or bf16")

    if not base.multi_node and python == sys.executable:
        _check_runtime(python)
        from flagscale.train.metrics import check_installed  # TensorBoard / W&B when asked for

        check_installed(train.system.logging)
    master_addr = exp.runner.master_addr or (base.nodes[0].host if base.multi_node else "127.0.0.1")
    master_port = exp.runner.master_port or (29500 if base.multi_node else _free_port())
    config_file = exp_dir / "config" / "train.json"
    nodes = []
    for node in base.nodes:
        cmd = torchrun_command(
            python, exp, node.rank, len(base.nodes), node.nproc, master_addr, master_port, config_file
        )
        env = node_environment(exp, node, _node_device_env(train, exp, node, device_env))
        text = launch_script(exp, node, len(base.nodes), exp_dir, env, cmd)
        nodes.append(replace(node, script_text=text))
    return LaunchPlan(exp, exp_dir, python, tuple(nodes), train, config_file, world_size)


def _node_device_env(train: TrainSettings, exp: ExperimentSettings, node: NodePlan, job_env: dict[str, str]):
    """The device environment of a node: its hetero mesh's device manifest when the mesh names one."""
    if train.system.hetero is None:
        return job_env
    mesh = hetero.mesh_of_node(train, node.rank, exp.runner.nproc_per_node)
    return job_env if mesh.device is None else device_environment(mesh.device, exp.runner.visible_devices)


# ------------------------------------------------------------------------------------ ssh and agent
def ssh_command(exp: ExperimentSettings, host: str, remote_argv: list[str]) -> list[str]:
    """ssh argv running `remote_argv` on `host`, with the runner's ssh port and options."""
    return ssh_argv(host, remote_argv, port=exp.runner.ssh_port, options=exp.runner.ssh_options)


def agent_argv(job_: Job, action: str, node: NodePlan, *extra: str) -> list[str]:
    return [job_.python, "-m", NODE_AGENT, action, "--run-dir", str(job_.exp_dir), "--name", node.name, *extra]


def _ssh(job_: Job, node: NodePlan, argv: list[str], stdin: str | None = None) -> str:
    cmd = ssh_command(job_.exp, node.host, argv)
    try:
        result = subprocess.run(
            cmd,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=SSH_TIMEOUT,
            stdin=None if stdin is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise LaunchError(f"{node.name} ({node.host}): ssh did not answer within {SSH_TIMEOUT} s") from None
    except OSError as exc:
        raise LaunchError(f"{node.name} ({node.host}): cannot run ssh: {exc}") from None
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
        raise LaunchError(f"{node.name} ({node.host}): {detail}")
    return result.stdout


def _agent(job_: Job, node: NodePlan, action: str, *extra: str) -> dict:
    out = _ssh(job_, node, agent_argv(job_, action, node, *extra))
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise LaunchError(f"{node.name} ({node.host}): unexpected answer from the node agent: {out[-300:]!r}") from None


def _upload_argv(node: NodePlan) -> list[str]:
    folder = shlex.quote(str(node.script.parent))
    return ["sh", "-c", f"mkdir -p {folder} && cat > {shlex.quote(str(node.script))}"]


# ------------------------------------------------------------------------------------------ actions
def _local_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _INHERITED_DROP}


def _write_files(p: LaunchPlan) -> None:
    (p.exp_dir / "logs").mkdir(parents=True, exist_ok=True)
    p.config_file.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "exp_name": p.exp.exp_name,
        "exp_dir": str(p.exp_dir),
        "world_size": p.world_size,
        "train": as_dict(p.train),
        "experiment": as_dict(p.exp),
    }
    p.config_file.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    for node in p.nodes:
        node.script.parent.mkdir(parents=True, exist_ok=True)
        node.script.write_text(node.script_text)
        node.script.chmod(0o755)


def parameter_lines(train: TrainSettings) -> list[str]:
    """Parameters per rank of every pipeline stage, from the shapes (exactly what megatron.core will build)."""
    m, s = train.model, train.system
    vocab = m.vocab_size or (ByteTokenizer.vocab_size if train.data.tokenizer.type == "byte" else None)
    if vocab is None:  # an HF tokenizer: its size is known once it is loaded (on the nodes)
        return [
            "parameters per rank: set train.model.vocab_size to count them here (the hf tokenizer loads on the nodes)"
        ]
    tp, pp = s.tensor_model_parallel_size, s.pipeline_model_parallel_size
    stages = stage_parameters(m, vocab, tp, pp, s.expert_model_parallel_size)
    lines = [f"parameters per rank ({m.family}, vocabulary {vocab}, TP={tp} PP={pp}; data-parallel ranks hold copies):"]
    for st in stages:
        lines.append(
            f"  stage {st.stage}: {st.total:,} on each of its {tp} TP rank(s) = embedding {st.embedding:,}"
            f" + {st.layers} layer(s) x {st.per_layer:,} + final norm and output layer {st.head:,}"
        )
    lines.append(f"  the whole model: {total_parameters(m, vocab):,}")
    return lines


def _vocabulary(train: TrainSettings) -> int | None:
    m = train.model
    return m.vocab_size or (ByteTokenizer.vocab_size if train.data.tokenizer.type == "byte" else None)


def memory_lines(train: TrainSettings, world_size: int) -> list[str]:
    """Memory per rank from the memory model (flagscale.train.memory): one line per distinct (stage, shard) row."""
    from flagscale.train.memory import estimate

    vocab = _vocabulary(train)
    if vocab is None:
        return ["memory per rank: set train.model.vocab_size to estimate it here (the hf tokenizer loads on the nodes)"]
    ranks = estimate(train, world_size, vocab)
    unit, scale = ("GiB", 2**30) if max(r.total for r in ranks) >= 2**30 else ("MiB", 2**20)
    lines = [
        f"memory per rank ({unit}; flagscale.train.memory, docs/train.md: parameters + gradients + optimizer states "
        "+ activations = total):"
    ]
    shown: dict[tuple, list[int]] = {}
    for r in ranks:
        shown.setdefault((r.stage, r.parameters, r.gradients, r.optimizer, r.activations), []).append(r.rank)
    for (stage, params, grads, opt, act), members in shown.items():
        total = params + grads + opt + act
        which = f"rank {members[0]}" if len(members) == 1 else f"ranks {members[0]}..{members[-1]} ({len(members)})"
        lines.append(
            f"  stage {stage}, {which}: {params / scale:.2f} + {grads / scale:.2f} + {opt / scale:.2f} + "
            f"{act / scale:.2f} = {total / scale:.2f}"
        )
    return lines


def dryrun_header(
    title: str, config_file: Path, train: TrainSettings, made_when: str, out, world_size: int = 1
) -> None:
    """What every launcher's dry run starts with: the job, the driver config, the model's parameters and memory per
    rank and the HF import the run starts from (`made_when`: when a missing one is made)."""
    print(f"# flagscale train (dry run): {title}", file=out)
    print(f"# driver config -> {config_file}", file=out)
    if train.system.hetero is not None:  # every mesh, its ranks and layout
        lines = hetero.dryrun_lines(train) + hetero.parameter_lines(train, _vocabulary(train))
        lines.append("memory per rank: the memory model does not cover hetero layouts yet")
    else:
        lines = parameter_lines(train) + memory_lines(train, world_size)
    for line in lines:
        print(f"# {line}", file=out)
    imported = hf_start.import_path(train)
    if imported is not None:
        state = "cached" if imported.exists() else f"made {made_when}"
        print(f"# starts from {train.system.checkpoint.hf_model}: its import {imported} ({state})", file=out)


def dryrun(p: LaunchPlan, out=None) -> int:
    out = out or sys.stdout
    title = f"experiment {p.exp.exp_name}, {len(p.nodes)} node(s), world size {p.world_size}, folder {p.exp_dir}"
    dryrun_header(title, p.config_file, p.train, "at action=run", out, p.world_size)
    for node in p.nodes:
        print(f"\n# node {node.rank} on {node.host}: {node.script}", file=out)
        print(node.script_text, end="", file=out)
        if node.remote:
            print(f"$ {shlex.join(ssh_command(p.exp, node.host, _upload_argv(node)))} < {node.script}", file=out)
            start = agent_argv(p, "start", node, "--", "bash", str(node.script))
            print(f"$ {shlex.join(ssh_command(p.exp, node.host, start))}", file=out)
        else:
            print(
                f"$ bash {shlex.quote(str(node.script))}   (log {p.exp_dir / 'logs' / (node.name + '.log')}), run by "
                f"the job monitor: $ {shlex.join(_monitor_argv(p))}"
                + ("   (in this command: --foreground)" if p.exp.runner.foreground else "   (detached)"),
                file=out,
            )
    return 0


def run(p: LaunchPlan, out=None) -> int:
    out = out or sys.stdout
    running = [n for n, s in status_of(p).items() if s == "running"]
    if running:  # before rewriting the scripts and config a running job was started from
        raise LaunchError(
            f"experiment {p.exp.exp_name} is already running ({', '.join(running)} in {p.exp_dir}): "
            "stop it first with action=stop"
        )
    if process.state(p.exp_dir, monitor.MONITOR_NAME) == "running":
        raise LaunchError(
            f"experiment {p.exp.exp_name} is already running (its monitor, in {p.exp_dir}): stop it first with "
            "action=stop"
        )
    p = replace(p, train=hf_start.prepare(p.train))  # here, once: the import every rank then loads
    _write_files(p)
    # under the job monitor: heartbeats, crash and hang detection, restarts
    if p.exp.runner.foreground:
        return _monitor_here(p, out)
    record = process.start(_monitor_argv(p), name=monitor.MONITOR_NAME, run_dir=p.exp_dir, env=_local_env())
    for node in p.nodes:
        where = f" on {node.host}" if node.remote else ""
        print(f"started {node.name}{where} under the job monitor; node log {_node_log(p, node)}", file=out)
    print(
        f"job monitor: pid {record.pid}, log {record.log}; status {monitor.status_path(p.exp_dir)} "
        "(action=status); stop with action=stop",
        file=out,
    )
    return 0


def _node_log(p: Job, node: NodePlan) -> str:
    return f"{node.host + ':' if node.remote else ''}{p.exp_dir / 'logs' / (node.name + '.log')}"


def _monitor_argv(p: LaunchPlan) -> list[str]:
    return [sys.executable, "-m", "flagscale.runner.monitor", "--exp-dir", str(p.exp_dir)]


def _monitor_here(p: LaunchPlan, out) -> int:
    """--foreground: the monitor runs in this process (recorded as `monitor`, so status and stop find it);
    it prints the node's output and a progress line. Exit status: 0 finished, 1 failed, 130 stopped."""
    import argparse

    args = argparse.Namespace(max_restarts=None, hang_timeout=None, restart_backoff=None)
    mon, _ = monitor.build(p.exp_dir, args, [], out)
    record_path = p.exp_dir / "pids" / f"{monitor.MONITOR_NAME}.json"
    record_path.parent.mkdir(parents=True, exist_ok=True)
    ticks = process.start_ticks(os.getpid())
    me = process.ProcessRecord(
        monitor.MONITOR_NAME, os.getpid(), ticks or -1, socket.gethostname(), tuple(sys.argv), "", time.time()
    )
    record_path.write_text(json.dumps(asdict(me), indent=2, sort_keys=True) + "\n")
    try:
        return monitor.run_monitored(mon)
    finally:
        record_path.unlink(missing_ok=True)  # this process lives on (a test, a notebook): never signal it later


def node_group(config: dict, exp_dir: Path, env: dict[str, str]) -> monitor.NodeGroup:
    """The monitor's view of a job `action=run` prepared (config/train.json and the node scripts)."""
    base = job({"experiment": config["experiment"]})
    if base.multi_node:
        return RemoteGroup(base)
    node = base.nodes[0]
    return monitor.LocalGroup(exp_dir, {node.name: ["bash", str(node.script)]}, env, base.exp.runner.stop_timeout)


class RemoteGroup:
    """Every node of a hostfile job, through its node agent over ssh (one ssh per node per poll)."""

    poll = 2.0

    def __init__(self, job_: Job) -> None:
        self.job = job_
        self.names = [n.name for n in job_.nodes]
        self.hosts = {n.name: n.host for n in job_.nodes}
        self.started: dict[str, dict] = {}
        self.beats: dict[int, dict] = {}

    def _each(self, action):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(self.job.nodes)) as pool:
            return list(pool.map(action, self.job.nodes))

    def start(self) -> None:
        self.started.clear()
        try:
            for node in self.job.nodes:
                _ssh(self.job, node, _upload_argv(node), stdin=node.script.read_text())
                self.started[node.name] = _agent(self.job, node, "start", "--", "bash", str(node.script))
        except FlagScaleError:
            self.stop()  # a job with a node missing would hang in rendezvous: take it down
            raise

    def states(self) -> dict[str, str]:
        answers = self._each(lambda n: _agent(self.job, n, "status"))
        self.beats = {h["rank"]: h for a in answers for h in a.get("heartbeats", [])}
        return {n.name: a.get(n.name, "unknown") for n, a in zip(self.job.nodes, answers, strict=True)}

    def heartbeats(self) -> list[dict]:
        return [self.beats[r] for r in sorted(self.beats)]

    def stop(self) -> None:
        _stop_remote(self.job, list(self.job.nodes))

    def diagnose(self, name: str, iterations: dict[int, int]):
        from flagscale.runner.diagnose import Diagnosis

        node = next(n for n in self.job.nodes if n.name == name)
        begun = self.started.get(name, {})
        answer = _agent(
            self.job,
            node,
            "diagnose",
            "--iterations",
            json.dumps(iterations),
            "--log-start",
            json.dumps({"node": begun.get("log_start", 0), "ranks": begun.get("rank_log_start", {})}),
        )
        return Diagnosis(**answer)


def _stop_remote(p: Job, remote: list[NodePlan]) -> list[str]:
    """Mark every node first, then signal them all at once: the nodes still running fail as soon as one is
    gone, and should read as stopped, not failed. Returns the nodes that were running."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(remote)) as pool:
        marked = [n for answer in pool.map(lambda n: _agent(p, n, "mark"), remote) for n in answer["marked"]]
        signalled = pool.map(lambda n: _agent(p, n, "stop", "--timeout", str(p.exp.runner.stop_timeout)), remote)
        done = {name for answer in signalled for name in answer.get("stopped", [])}
    return [n.name for n in remote if n.name in done or n.name in marked]


def status_of(p: Job) -> dict[str, str]:
    result = {}
    for node in p.nodes:
        if node.remote:
            result[node.name] = _agent(p, node, "status").get(node.name, "unknown")
        else:
            result[node.name] = process.state(p.exp_dir, node.name)
    return result


def status_record(p: Job) -> dict:
    """The monitor's status record (run/status.json) with the nodes' states as they are now; a job whose
    monitor is gone (killed, or never ran one) gets its state from the nodes."""
    states = status_of(p)
    record = monitor.read_status(p.exp_dir) or {
        "exp_name": p.exp.exp_name,
        "exp_dir": str(p.exp_dir),
        "ranks": [],
        "iteration": None,
        "loss": None,
        "tokens_per_sec": None,
        "restarts": 0,
        "max_restarts": p.exp.runner.fault_tolerance.max_restarts,
        "diagnoses": [],
    }
    record["nodes"] = [{"name": n.name, "host": n.host, "state": states.get(n.name, "unknown")} for n in p.nodes]
    watched = (p.exp_dir / "pids" / f"{monitor.MONITOR_NAME}.json").exists()
    if (
        record.get("state") not in monitor.ACTIVE
        or not watched
        or process.state(p.exp_dir, monitor.MONITOR_NAME) != "running"
    ):
        node_states = set(states.values())
        if record.get("state") in ("finished", "failed", "stopped") and "running" not in node_states:
            pass  # the monitor's verdict stands
        elif "running" in node_states:
            record["state"] = "running"
        elif node_states == {"finished"}:
            record["state"] = "finished"
        elif "stopped" in node_states:
            record["state"] = "stopped"
        else:
            record["state"] = "failed" if node_states - {"unknown"} else "unknown"
    return record


def format_status(record: dict) -> str:
    """action=status as a table: the job, its nodes, its ranks, then every diagnosis."""
    head = [f"experiment {record.get('exp_name')}: {record.get('state')}", *monitor.summary(record, 6)]
    rows = [["NODE", "HOST", "STATE"]] + [[n["name"], n["host"], n["state"]] for n in record.get("nodes", [])]
    lines = [", ".join(head), ""] + _table(rows)
    ranks = record.get("ranks") or []
    if ranks:
        rows = [["RANK", "NODE", "HOST", "PID", "ITERATION", "PHASE", "HEARTBEAT"]]
        rows += [
            [
                str(r.get("rank")),
                f"node{r.get('node')}",
                str(r.get("host")),
                str(r.get("pid")),
                str(r.get("iteration")),
                str(r.get("phase")),
                f"{time.time() - r.get('time', time.time()):.0f} s ago",  # now, not at the monitor's last look
            ]
            for r in ranks
        ]
        lines += [""] + _table(rows)
    for d in record.get("diagnoses") or []:
        lines.append(
            f"attempt {d.get('attempt')}: {d.get('event')} ({d.get('kind')}): {d.get('message')}"
            + (f" [log {d['log']}]" if d.get("log") else "")
        )
    return "\n".join(lines)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def status(p: Job, out=None) -> int:
    out = out or sys.stdout
    record = status_record(p)
    if p.exp.runner.json:
        print(json.dumps(record, indent=2, sort_keys=True), file=out)
    else:
        print(format_status(record), file=out)
    return 0


def stop(p: Job, out=None) -> int:
    out = out or sys.stdout
    remote = [n for n in p.nodes if n.remote]
    local = [n.name for n in p.nodes if not n.remote]
    known = {r.name for r in process.records(p.exp_dir)} if (p.exp_dir / "pids").is_dir() else set()
    stopped: list[str] = []
    if monitor.MONITOR_NAME in known and process.state(p.exp_dir, monitor.MONITOR_NAME) == "running":
        # The monitor is signalled first, or it would restart what we stop, and the local nodes are marked, so
        # they read as stopped, not failed: on SIGTERM the monitor stops them itself and records the job as
        # stopped. Remote nodes are stopped from here at the same time (marked first, then signalled): waiting
        # for the monitor's next poll over ssh to reach them lets a job run on for many seconds.
        from concurrent.futures import ThreadPoolExecutor

        stopped += process.mark_stopping(p.exp_dir, [n for n in local if n in known])
        with ThreadPoolExecutor(1) as pool:
            ending = pool.submit(
                process.stop, p.exp_dir, [monitor.MONITOR_NAME], timeout=2 * p.exp.runner.stop_timeout + 15
            )
            if remote:
                stopped += [n for n in _stop_remote(p, remote) if n not in stopped]
            ending.result()
    elif remote:  # no monitor (it was killed): the nodes directly
        stopped += _stop_remote(p, remote)
    for name in local:
        if name in known:
            stopped += [
                n for n in process.stop(p.exp_dir, [name], timeout=p.exp.runner.stop_timeout) if n not in stopped
            ]
    print(f"stopped: {', '.join(stopped) or 'nothing was running'}", file=out)
    return 0
