"""Slurm: the `#SBATCH` header of a job, its submission, its state, its cancel.

`experiment.runner.launcher: slurm` hands a job to Slurm instead of starting it over ssh: one batch script
(`sbatch`), whose first step starts one task per node with `srun`. What the job runs on each node is the
task's business (flagscale/train/slurm.py for training); this module knows Slurm's commands only:

* `sbatch --parsable SCRIPT` submits (the job id is its output);
* `scontrol show job -o ID` reports a job while the controller still knows it (pending, running, and
  finished ones for `MinJobAge` seconds); there may be no accounting daemon, so `sacct` is never used;
* `scancel ID` cancels exactly that job.

Every command is looked for on PATH before anything is written or submitted, so a machine without Slurm's
client commands fails with one line.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from flagscale.errors import ConfigError, LaunchError
from flagscale.settings import setting

COMMAND_TIMEOUT = 60
# Slurm's job states (squeue/scontrol `JobState`) in which the job still holds or waits for nodes.
ACTIVE_STATES = frozenset(
    {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING", "SIGNALING", "STAGE_OUT"}
)


def _positive(value: int) -> int:
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _word(value: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise ValueError("must be one word (no spaces)")
    return value


# sbatch --time: minutes, minutes:seconds, hours:minutes:seconds, days-hours[:minutes[:seconds]], or unlimited
_TIME = re.compile(r"(\d+|\d+:\d+|\d+:\d+:\d+|\d+-\d+(:\d+){0,2}|UNLIMITED|INFINITE)", re.IGNORECASE)


def _time(value: str) -> str:
    if not _TIME.fullmatch(value):
        raise ValueError("a Slurm time limit: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    return value


def _sbatch_options(values: tuple[str, ...]) -> tuple[str, ...]:
    for value in values:
        if not value.startswith("-") or "\n" in value or "\r" in value:
            raise ValueError(f"{value!r} is not an sbatch option (one line starting with -, e.g. --qos=high)")
    return values


@dataclass(frozen=True)
class SlurmSettings:
    """`experiment.runner.slurm`: the allocation `sbatch` asks for (read with `launcher: slurm`)."""

    partition: str | None = setting(None, check=_word)  # None: the cluster's default partition
    account: str | None = setting(None, check=_word)  # None: the user's default account
    time: str | None = setting(None, check=_time)  # wall-clock limit; None: the partition's default
    nodes: int | None = setting(None, check=_positive)  # None: experiment.runner.nnodes
    gpus_per_node: int | None = setting(None, check=_positive)  # None: no --gpus-per-node (CPU jobs)
    # more `#SBATCH` lines, as sbatch options: e.g. ["--qos=high", "--exclusive", "--cpus-per-task=16"]
    extra_sbatch: tuple[str, ...] = setting((), check=_sbatch_options)


def header(s: SlurmSettings, *, job_name: str, nodes: int, output: str, chdir: str) -> list[str]:
    """The `#SBATCH` lines of a job with one task per node (each task starts that node's processes)."""
    options = [f"--job-name={job_name}", f"--nodes={nodes}", "--ntasks-per-node=1"]
    options += [f"--{name}={value}" for name, value in (("partition", s.partition), ("account", s.account)) if value]
    if s.time:
        options.append(f"--time={s.time}")
    if s.gpus_per_node:
        options.append(f"--gpus-per-node={s.gpus_per_node}")
    options += [f"--output={output}", "--open-mode=append", f"--chdir={chdir}", *s.extra_sbatch]
    broken = [option for option in options if "\n" in option or "\r" in option]
    if broken:  # sbatch reads the header line by line: the rest of the value would be a command
        raise ConfigError(f"an #SBATCH option cannot hold a line break: {broken[0]!r}")
    # sbatch reads #SBATCH lines as shell words: a value with a space stays one word when quoted
    return [f"#SBATCH {shlex.quote(option)}" for option in options]


# ------------------------------------------------------------------------------- script text
_RUNTIME = re.compile(r"@([A-Z_]+)@")
_SAFE = re.compile(r"[\w@%+=:,./-]*")


def shell_words(argv: Sequence[str]) -> str:
    """`argv` as one shell line; `@NAME@` in a word becomes the variable `$NAME`, read when the script runs.

    Words with a placeholder are double-quoted (and must hold nothing else a shell reads specially); every
    other word is `shlex.quote`d, so config values never reach the shell as code.
    """
    words = []
    for word in argv:
        if _RUNTIME.search(word):
            if not _SAFE.fullmatch(word):
                raise ValueError(f"a word with a runtime value holds shell characters: {word!r}")
            words.append('"' + _RUNTIME.sub(r"${\1}", word) + '"')
        else:
            words.append(shlex.quote(word))
    return " ".join(words)


def exports(env: Mapping[str, str]) -> list[str]:
    return [f"export {name}={shlex.quote(value)}" for name, value in env.items()]


def per_host_exports(node_envs: Mapping[str, Mapping[str, str]], host_variable: str = "SLURMD_NODENAME") -> list[str]:
    """A `case` on the node's Slurm name that exports each host's own variables (empty without any)."""
    if not node_envs:
        return []
    lines = [f'case "${{{host_variable}}}" in']
    for host, env in node_envs.items():
        lines.append(f"  {shlex.quote(host)})")
        lines += [f"    {line}" for line in exports(env)]
        lines.append("    ;;")
    return [*lines, "esac"]


# ------------------------------------------------------------------------------- commands
def require(*commands: str, why: str) -> None:
    """Fail with one line when a Slurm command is not on PATH (before anything is written or submitted)."""
    missing = [c for c in commands if shutil.which(c) is None]
    if missing:
        raise LaunchError(
            f"{' and '.join(missing)} not found on PATH ({why}): install Slurm's client commands "
            "(e.g. apt-get install slurm-client)"
        )


def _run(argv: list[str], env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise LaunchError(f"{argv[0]} did not answer within {COMMAND_TIMEOUT} s: is slurmctld up?") from None
    except OSError as exc:
        raise LaunchError(f"cannot run {argv[0]}: {exc}") from None


def _last_line(result: subprocess.CompletedProcess) -> str:
    return (result.stderr.strip().splitlines() or result.stdout.strip().splitlines() or [f"exit {result.returncode}"])[
        -1
    ]


def submit(script: str, env: Mapping[str, str] | None = None) -> str:
    """Submit a batch script file with sbatch; its job id."""
    result = _run(["sbatch", "--parsable", script], env)
    job_id = result.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"
    if result.returncode != 0 or not job_id.isdigit():
        raise LaunchError(f"sbatch {script}: {_last_line(result)}")
    return job_id


def show_job(job_id: str) -> dict[str, str] | None:
    """`scontrol show job -o`'s fields of a job (JobState, Reason, NodeList, RunTime, ExitCode, ...), or None
    when the controller no longer knows it (it ended more than MinJobAge seconds ago)."""
    result = _run(["scontrol", "show", "job", "-o", job_id])
    if result.returncode != 0:
        if "Invalid job id" in result.stderr:
            return None
        raise LaunchError(f"scontrol show job {job_id}: {_last_line(result)}")
    line = result.stdout.strip().splitlines()[0] if result.stdout.strip() else ""
    # key=value words; a value may hold spaces only in a few free-text fields (Command, WorkDir, Comment),
    # which are read as far as the next ` Key=`
    fields = dict(re.findall(r"(?:^|\s)([A-Za-z][\w:/]*)=(.*?)(?=\s+[A-Za-z][\w:/]*=|$)", line))
    return fields if fields.get("JobId") == job_id else None


def state(job_id: str) -> str | None:
    """The job's state (RUNNING, PENDING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ...), None when unknown."""
    fields = show_job(job_id)
    return fields.get("JobState") if fields else None


def cancel(job_id: str) -> None:
    """scancel exactly this job (every step and the batch script); a job that already ended is no error."""
    result = _run(["scancel", job_id])
    if result.returncode != 0 and "already completing or completed" not in result.stderr:
        raise LaunchError(f"scancel {job_id}: {_last_line(result)}")
