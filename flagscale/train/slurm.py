"""`flagscale train` on Slurm (`experiment.runner.launcher: slurm`): one sbatch script, submitted as is.

The script (`<exp_dir>/scripts/slurm.sbatch`) is what `action=dryrun` prints and what `sbatch` gets. sbatch
runs it on the allocation's first node; there it picks the rendezvous address (that node) and port, and hands
over to the job monitor (flagscale.runner.monitor) with one command, `srun ... bash <script> node`: one task per
node, each running this same file's node part (the device and experiment variables, the node's own
`experiment.node_envs` by its Slurm node name, `cmds.before_start`, one torchrun for the node's processes,
`cmds.after_stop`). One srun is one attempt of the whole job: the monitor watches the ranks' heartbeats and
srun's exit, and on a crash or hang stops the step and runs srun again inside the same allocation, by
`experiment.runner.fault_tolerance` (the driver resumes from the latest complete checkpoint).

The run folder must be on a file system every node sees (the driver's config, the script, heartbeats, logs
and checkpoints live there), and the interpreter (`experiment.runner.python`, else this one) at the same path
on every node. `experiment.device_type_envs` apply by the job's device (`experiment.runner.device`, else the
installed one): a Slurm allocation has no hostfile `type=`, and one job runs on one kind of node.

The job id goes to `<exp_dir>/run/slurm.json` at submission; `action=status` asks `scontrol show job` about
that job (and shows the monitor's status record), `action=stop` runs `scancel` on it, and only it, then waits
until Slurm reports it ended. Logs: the monitor's in `logs/slurm-<job id>.out`, the nodes' (srun's output) in
`logs/job.log`, every rank's in `logs/node<N>/rank<R>.log` as for any launcher.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from flagscale.errors import ConfigError, LaunchError
from flagscale.runner import monitor, slurm
from flagscale.runner.environment import device_environment, device_name
from flagscale.runner.wait import wait_until
from flagscale.train import hf_start, launcher
from flagscale.train.settings import ExperimentSettings

SCRIPT = Path("scripts") / "slurm.sbatch"
RECORD = Path("run") / "slurm.json"
POLL_S = 2.0
# Runtime values of the script (`@NAME@` in a word: `$NAME` when it runs; see flagscale.runner.slurm.shell_words)
NNODES, NODE_RANK, JOB_ID = "@SLURM_JOB_NUM_NODES@", "@SLURM_NODEID@", "@SLURM_JOB_ID@"
MASTER_ADDR, MASTER_PORT = "@FLAGSCALE_MASTER_ADDR@", "@FLAGSCALE_MASTER_PORT@"
_FREE_PORT = 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'


@dataclass(frozen=True)
class SlurmPlan(launcher.LaunchPlan):
    """A training job ready for sbatch: the launch plan (no per-node scripts) and the batch script."""

    nnodes: int
    script: Path
    script_text: str


def nnodes(exp: ExperimentSettings) -> int:
    return exp.runner.slurm.nodes or exp.runner.nnodes


def plan(plain: dict) -> SlurmPlan:
    """launcher.plan's validated job (no per-node scripts: Slurm picks the nodes) with its batch script."""
    base = launcher.plan(plain)
    exp = base.exp
    if exp.runner.master_addr:
        raise ConfigError(
            "experiment.runner.master_addr: with launcher slurm the allocation's first node hosts the "
            "rendezvous; remove master_addr"
        )
    n = nnodes(exp)
    device_env = device_environment(exp.runner.device, exp.runner.visible_devices)
    text = batch_script(exp, base.exp_dir, base.python, base.config_file, n, device_env)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    return SlurmPlan(**fields, nnodes=n, script=base.exp_dir / SCRIPT, script_text=text)


def _environment(exp: ExperimentSettings, device_env: dict[str, str]) -> dict[str, str]:
    """Device manifest, then experiment.envs, then the job's device's device_type_envs (later wins)."""
    env = dict(device_env)
    env.update({k: launcher._env_value(v) for k, v in exp.envs.items()})
    typed = exp.device_type_envs.get(device_name(exp.runner.device), {})
    env.update({k: launcher._env_value(v) for k, v in typed.items()})
    return env


def torchrun(python: str, exp: ExperimentSettings, nproc: int, config_file: Path) -> list[str]:
    """The node's torchrun; its node count, rank and rendezvous address are read when the script runs."""
    if exp.runner.rdzv_id is None:  # the job id: a resubmitted job never meets an older one's rendezvous
        exp = replace(exp, runner=replace(exp.runner, rdzv_id=JOB_ID))
    return launcher.torchrun_command(python, exp, NODE_RANK, NNODES, nproc, MASTER_ADDR, MASTER_PORT, config_file)


def batch_script(
    exp: ExperimentSettings, exp_dir: Path, python: str, config_file: Path, n: int, device_env: dict[str, str]
) -> str:
    r = exp.runner
    script = exp_dir / SCRIPT
    log = exp_dir / "logs" / "slurm-%j.out"
    port = str(r.master_port) if r.master_port else f"$({shlex.join([python, '-c', _FREE_PORT])})"
    node_envs = {host: {k: launcher._env_value(v) for k, v in env.items()} for host, env in exp.node_envs.items()}
    lines = [
        "#!/usr/bin/env bash",
        *slurm.header(r.slurm, job_name=exp.exp_name, nodes=n, output=str(log), chdir=str(exp_dir)),
        f"# Generated by `flagscale train`: experiment {exp.exp_name}, {n} node(s) x {r.nproc_per_node} "
        "process(es), one torchrun per node.",
        "# sbatch runs this file on the first node (no argument); srun runs it once per node with `node`.",
        f"cd {shlex.quote(str(exp_dir))} || exit 1",
        *slurm.exports(_environment(exp, device_env)),
        'if [ "${1:-}" != node ]; then',
        "  # the first node of the allocation hosts the rendezvous",
        '  FLAGSCALE_MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"  FLAGSCALE_MASTER_PORT={port}",
        "  export FLAGSCALE_MASTER_ADDR FLAGSCALE_MASTER_PORT",
        "  # the job monitor runs the srun (one attempt on every node), restarts it on a crash or hang",
        "  exec " + shlex.join(_monitor(python, exp_dir) + _srun(n, script)),
        "fi",
        *slurm.per_host_exports(node_envs),
    ]
    lines += launcher.before_start_lines(exp)
    reaped = [python, "-m", "flagscale.runner.reap", "--", *torchrun(python, exp, r.nproc_per_node, config_file)]
    lines += _waited(slurm.shell_words(reaped))
    if exp.cmds.after_stop:
        lines += ["# experiment.cmds.after_stop", exp.cmds.after_stop]
    return "\n".join([*lines, 'exit "$status"', ""])


def _waited(command: str) -> list[str]:
    """Run the node's torchrun (under flagscale.runner.reap: what a killed rank leaves behind ends with it) and
    wait for it even when Slurm signals a stop: when this task's shell exits Slurm SIGKILLs its process group,
    which would cut torchrun's own shutdown of the ranks short (they run in sessions of their own)."""
    return [
        f"{command} &",
        "node_pid=$!",
        "trap 'kill -TERM \"$node_pid\" 2>/dev/null' TERM INT HUP",
        'while kill -0 "$node_pid" 2>/dev/null; do wait "$node_pid"; done  # a trapped signal ends `wait` early',
        'wait "$node_pid"; status=$?',
        "trap - TERM INT HUP",
    ]


def _monitor(python: str, exp_dir: Path) -> list[str]:
    """flagscale.runner.monitor's entry point for a command that is one attempt of the whole job."""
    return [python, "-m", "flagscale.runner.monitor", "--exp-dir", str(exp_dir), "--foreground", "--"]


def _srun(n: int, script: Path) -> list[str]:
    """One task per node running this script's node part; a node that fails takes the step down. The
    nodes' output is srun's, which the monitor keeps in logs/job.log (and reads for its diagnoses)."""
    return ["srun", f"--nodes={n}", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash", str(script), "node"]


# ------------------------------------------------------------------------------------------ actions
def dryrun(p: SlurmPlan, out=None) -> int:
    out = out or sys.stdout
    title = (
        f"experiment {p.exp.exp_name} on Slurm, {p.nnodes} node(s) x {p.exp.runner.nproc_per_node} process(es), "
        f"world size {p.world_size}, folder {p.exp_dir}"
    )
    launcher.dryrun_header(title, p.config_file, p.train, "at action=run, before sbatch", out, p.world_size)
    print(f"# batch script -> {p.script} (submitted as is):", file=out)
    print(p.script_text, end="", file=out)
    print(f"$ {shlex.join(['sbatch', '--parsable', str(p.script)])}", file=out)
    return 0


def _record(exp_dir: Path) -> dict | None:
    path = exp_dir / RECORD
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        raise LaunchError(
            f"{path} is not the JSON flagscale wrote; remove it if no job of this experiment runs"
        ) from None


def _write_record(exp_dir: Path, record: dict) -> None:
    path = exp_dir / RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def run(p: SlurmPlan, out=None) -> int:
    out = out or sys.stdout
    slurm.require("sbatch", "scontrol", why="launcher slurm submits with sbatch")
    record = _record(p.exp_dir)
    if record and slurm.state(record["job_id"]) in slurm.ACTIVE_STATES:  # before rewriting its files
        raise LaunchError(
            f"experiment {p.exp.exp_name} is already queued or running as slurm job {record['job_id']} "
            f"({p.exp_dir}): stop it first with action=stop"
        )
    p = replace(p, train=hf_start.prepare(p.train))  # here, once: the import every rank then loads
    launcher._write_files(p)
    p.script.parent.mkdir(parents=True, exist_ok=True)
    p.script.write_text(p.script_text)
    job_id = slurm.submit(str(p.script), env=launcher._local_env())
    _write_record(p.exp_dir, {"job_id": job_id, "script": str(p.script), "submitted": time.time()})
    log = p.exp_dir / "logs" / f"slurm-{job_id}.out"
    print(
        f"submitted slurm job {job_id} ({p.nnodes} node(s)); log {log}; "
        "follow with action=status, cancel with action=stop",
        file=out,
    )
    if p.exp.runner.foreground:
        return _follow(p, job_id, out)
    return 0


def _follow(p: SlurmPlan, job_id: str, out) -> int:
    """Foreground: relay the job's log until it ends; stopping this process cancels it."""

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    log = p.exp_dir / "logs" / f"slurm-{job_id}.out"
    offset = 0

    def ended() -> bool:
        nonlocal offset
        done = slurm.state(job_id) not in slurm.ACTIVE_STATES  # before the read: the log's end is in
        try:
            with open(log, "rb") as f:  # the monitor's progress lines and the nodes' output, as they come
                f.seek(offset)
                chunk = f.read()
        except OSError:
            chunk = b""
        offset += len(chunk)
        out.write(chunk.decode("utf-8", "replace"))
        out.flush()
        return done

    signal.signal(signal.SIGTERM, interrupted)
    try:
        wait_until(ended, None, interval=POLL_S)
    except KeyboardInterrupt:
        stop(p, out)
        return 130
    final = slurm.state(job_id) or "ended"
    print(f"slurm job {job_id}: {final}", file=out)
    return 0 if final == "COMPLETED" else 1


def _describe(job_id: str, fields: dict[str, str] | None, exp_dir: Path) -> str:
    log = exp_dir / "logs" / f"slurm-{job_id}.out"
    if fields is None:
        return f"slurm job {job_id}: no longer known to Slurm (it ended a while ago); log {log}"
    state = fields.get("JobState", "UNKNOWN")
    parts = [f"nodes {fields.get('NodeList', '?')}", f"elapsed {fields.get('RunTime', '?')}"]
    if state not in ("RUNNING", "COMPLETING") and fields.get("Reason", "None") != "None":
        parts.append(f"reason {fields['Reason']}")
    if state not in slurm.ACTIVE_STATES:
        parts.append(f"exit {fields.get('ExitCode', '?')}")
    return f"slurm job {job_id}: {state} ({', '.join(parts)}); log {log}"


def status(j: launcher.Job, out=None) -> int:
    out = out or sys.stdout
    slurm.require("scontrol", why="action=status asks Slurm")
    record = _record(j.exp_dir)
    if record is None:
        print(f"no slurm job submitted for experiment {j.exp.exp_name} ({j.exp_dir})", file=out)
        return 0
    job_id = record["job_id"]
    fields = slurm.show_job(job_id)
    state = fields.get("JobState") if fields else None
    monitored = monitor.read_status(j.exp_dir)
    if monitored and state not in slurm.ACTIVE_STATES and monitored.get("state") in monitor.ACTIVE:
        # the allocation ended under the monitor (time limit, node failure, scancel -s KILL): Slurm's word stands
        monitored["state"] = "stopped" if state == "CANCELLED" else "failed"
    if j.exp.runner.json:
        slurm_part = {"job_id": job_id, "state": state, "fields": fields}
        print(json.dumps({**(monitored or {}), "slurm": slurm_part}, indent=2, sort_keys=True), file=out)
        return 0
    print(_describe(job_id, fields, j.exp_dir), file=out)
    if monitored:
        print(launcher.format_status(monitored), file=out)
    return 0


def stop(j: launcher.Job, out=None) -> int:
    out = out or sys.stdout
    slurm.require("scancel", "scontrol", why="action=stop cancels with scancel")
    record = _record(j.exp_dir)
    state = slurm.state(record["job_id"]) if record else None
    if record is None or state not in slurm.ACTIVE_STATES:
        print("stopped: nothing was running", file=out)
        return 0
    job_id = record["job_id"]
    slurm.cancel(job_id)
    # Slurm signals the steps (SIGTERM, then SIGKILL after KillWait): wait until it reports the job ended.
    timeout = j.exp.runner.stop_timeout + 60
    ended = wait_until(lambda: slurm.state(job_id) not in slurm.ACTIVE_STATES, timeout, interval=1.0)
    if not ended:
        raise LaunchError(f"slurm job {job_id} was cancelled but still runs after {timeout:.0f} s; see squeue")
    print(f"stopped: slurm job {job_id}", file=out)
    return 0
