"""The job monitor: runs a training job's nodes, notices crashes and hangs, diagnoses them and restarts.

Entry point (what `flagscale train` runs detached, and what a Slurm batch script runs on the first node):

    python -m flagscale.runner.monitor --exp-dir D [--foreground] [-- CMD...]

* Without CMD: the job `flagscale train action=run` prepared in D (D/config/train.json and
  D/scripts/node<i>.sh): one node here, or every node of the hostfile over ssh.
* With CMD: CMD is one attempt of the whole job, started here as the process `job` (a Slurm batch script
  passes `srun ... bash D/scripts/node.sh`, so one srun is one attempt on every node). The ranks must write
  their heartbeats under D/run/heartbeats (the training driver does, with `exp_dir` = D) on a folder this
  node sees, and their logs under D/logs/node<N>/rank<R>.log; CMD's own output goes to D/logs/job.log.
* The policy comes from D/config/train.json's `experiment.runner.fault_tolerance`; `--max-restarts`,
  `--hang-timeout`, `--restart-backoff` override it. Exit status: 0 finished, 1 failed, 130 stopped.
* `--foreground`: prints the nodes' output and a progress line; otherwise quiet (its own log is the caller's).
* SIGTERM or SIGINT to the monitor stops the job's processes (only those it started) and ends it `stopped`.

For a Slurm batch script (flagscale/train/slurm.py): write D/config/train.json as `flagscale train` does
(`exp_name`, `world_size`, `train`, `experiment` with `runner.fault_tolerance` and `runner.stop_timeout`), then
in the batch script itself (not inside an srun step) run
`python -m flagscale.runner.monitor --exp-dir D --foreground -- srun --kill-on-bad-exit=1 ... bash node.sh`.
Each attempt is one srun (its process group is what a restart stops: SIGTERM, which srun forwards to its
tasks, then SIGKILL after stop_timeout); `--kill-on-bad-exit` makes one node's failure end the srun non-zero.
`read_status(D)` gives the status record for `action=status`.

The policy: a *crash* is a node (torchrun) ending non-zero; a *hang* is a rank whose heartbeat made no progress
for `hang_timeout` s, or for `start_timeout` s (default: hang_timeout) before its first training iteration (no
heartbeat at all that long after a start counts too). Each gets a diagnosis
(flagscale.runner.diagnose); the job's processes are stopped, the monitor waits `restart_backoff` s (doubled
after each restart, at most 300 s) and starts the job again: the driver resumes from the latest complete
checkpoint. After `max_restarts` restarts the next fault ends the job `failed`; a configuration error raised in
a rank (diagnosis `config`) ends it `failed` at once, as a restart would only repeat it.

The status record, `D/run/status.json`, is rewritten (atomically) at every poll (0.5 s; 2 s over ssh):
state (starting | running | restarting | finished | failed | stopped), nodes, ranks, iteration, last loss,
tokens/s, restarts and every diagnosis. `action=status` shows it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TextIO

from flagscale.runner import heartbeat, process, reap
from flagscale.runner.diagnose import (
    NOT_RESTARTABLE,
    Diagnosis,
    diagnose_crash,
    diagnose_hang,
    most_likely,
    process_state,
)

STATUS_FILE = Path("run") / "status.json"
MONITOR_NAME = "monitor"
MAX_BACKOFF = 300.0
ACTIVE = ("starting", "running", "restarting")
SETTLE = 10.0  # seconds the other nodes get to end after one failed, before the diagnosis


STARTUP_PHASES = ("init", "start")  # a rank's heartbeat phases before its first training iteration


@dataclass(frozen=True)
class Policy:
    max_restarts: int = 3
    hang_timeout: float = 1800.0
    restart_backoff: float = 10.0
    start_timeout: float | None = None  # None: hang_timeout

    @property
    def startup(self) -> float:
        return self.hang_timeout if self.start_timeout is None else self.start_timeout

    def backoff(self, restarts_so_far: int) -> float:
        return min(self.restart_backoff * 2**restarts_so_far, MAX_BACKOFF)


class NodeGroup(Protocol):
    """The processes of one attempt of a job: local torchrun, ssh'd node agents, or one srun."""

    names: list[str]
    hosts: dict[str, str]

    def start(self) -> None: ...

    def states(self) -> dict[str, str]: ...  # flagscale.runner.process.STATES per name

    def heartbeats(self) -> list[dict]: ...

    def stop(self) -> None: ...

    def diagnose(self, name: str, iterations: dict[int, int]) -> Diagnosis: ...


def rank_logs(exp_dir: Path) -> dict[int, Path]:
    """The driver's per-rank logs, logs/node<N>/rank<R>.log, by global rank."""
    found = {}
    for path in (Path(exp_dir) / "logs").glob("node*/rank*.log"):
        try:
            found[int(path.stem[4:])] = path
        except ValueError:
            continue
    return found


class LocalGroup:
    """Commands started here under flagscale.runner.process (a local node's script, or a Slurm srun)."""

    def __init__(
        self, exp_dir: Path, commands: dict[str, list[str]], env: dict[str, str] | None, stop_timeout: float = 15.0
    ):
        self.exp_dir, self.commands, self.env, self.stop_timeout = exp_dir, commands, env, stop_timeout
        self.names = list(commands)
        self.hosts = {n: "localhost" for n in self.names}
        self.log_start: dict[str, int] = {}  # logs are appended to: a diagnosis reads this attempt's part
        self.rank_log_start: dict[int, int] = {}

    def _log(self, name: str) -> Path:
        return self.exp_dir / "logs" / f"{name}.log"

    def start(self) -> None:
        for name in self.commands:
            self.log_start[name] = self._log(name).stat().st_size if self._log(name).exists() else 0
        self.rank_log_start = {rank: path.stat().st_size for rank, path in rank_logs(self.exp_dir).items()}
        for name, cmd in self.commands.items():
            process.start(cmd, name=name, run_dir=self.exp_dir, env=self.env)

    def states(self) -> dict[str, str]:
        return {n: process.state(self.exp_dir, n) for n in self.names}

    def heartbeats(self) -> list[dict]:
        return heartbeat.read_all(self.exp_dir)

    def stop(self) -> None:
        known = {r.name for r in process.records(self.exp_dir)}
        process.stop(self.exp_dir, [n for n in self.names if n in known], timeout=self.stop_timeout)

    def diagnose(self, name: str, iterations: dict[int, int]) -> Diagnosis:
        code = process.exit_status(self.exp_dir, name)
        start = self.log_start.get(name, 0)
        logs = rank_logs(self.exp_dir)
        return diagnose_crash(name, self._log(name), code, logs, iterations, start, self.rank_log_start)


# ------------------------------------------------------------------------------------------ status
def status_path(exp_dir: Path | str) -> Path:
    return Path(exp_dir) / STATUS_FILE


def read_status(exp_dir: Path | str) -> dict | None:
    try:
        return json.loads(status_path(exp_dir).read_text())
    except (OSError, ValueError):
        return None


@dataclass
class StatusRecord:
    exp_name: str
    exp_dir: Path
    nodes: dict[str, str]  # name -> host
    world_size: int | None
    train_iters: int | None
    max_restarts: int
    state: str = "starting"
    restarts: int = 0
    diagnoses: list[dict] = field(default_factory=list)
    node_states: dict[str, str] = field(default_factory=dict)
    ranks: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    attempt_started: float = field(default_factory=time.time)

    def as_dict(self) -> dict:
        iterations = [r["iteration"] for r in self.ranks]
        with_loss = [r for r in self.ranks if r.get("loss") is not None]
        return {
            "exp_name": self.exp_name,
            "exp_dir": str(self.exp_dir),
            "state": self.state,
            "monitor": {"pid": os.getpid(), "host": socket.gethostname()},
            "nodes": [
                {"name": n, "host": h, "state": self.node_states.get(n, "unknown")} for n, h in self.nodes.items()
            ],
            "world_size": self.world_size,
            "ranks": self.ranks,
            # every rank has finished this iteration (DP ranks step together; a straggler shows in `ranks`)
            "iteration": min(iterations) if iterations else None,
            "train_iters": self.train_iters,
            "loss": with_loss[0]["loss"] if with_loss else None,
            "tokens_per_sec": with_loss[0].get("tokens_per_sec") if with_loss else None,
            "restarts": self.restarts,
            "max_restarts": self.max_restarts,
            "diagnoses": self.diagnoses,
            "started": self.started,
            "attempt_started": self.attempt_started,
            "updated": time.time(),
        }

    def write(self) -> dict:
        data = self.as_dict()
        path = status_path(self.exp_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
        return data


def summary(data: dict, loss_digits: int = 4) -> list[str]:
    """A status record's iteration, loss, tokens/s and restarts, as the progress line and action=status show them."""
    it, total = data.get("iteration"), data.get("train_iters")
    parts = []
    if it is not None:
        parts.append(f"iteration {it}/{total if total is not None else '?'}")
    if data.get("loss") is not None:
        parts.append(f"loss {data['loss']:.{loss_digits}f}")
    if data.get("tokens_per_sec") is not None:
        parts.append(f"{data['tokens_per_sec']:.0f} tokens/s")
    parts.append(f"restarts {data.get('restarts', 0)}/{data.get('max_restarts', '?')}")
    return parts


def progress_line(data: dict) -> str:
    return " | ".join([f"[flagscale] {data['exp_name']}: {data['state']}", *summary(data)])


# ------------------------------------------------------------------------------------------ the loop
class Monitor:
    def __init__(
        self,
        group: NodeGroup,
        record: StatusRecord,
        policy: Policy,
        out: TextIO | None = None,
        poll: float = 0.5,
        follow_logs: list[Path] | None = None,
    ) -> None:
        self.group, self.record, self.policy, self.out, self.poll = group, record, policy, out, poll
        self.stopping = False
        self.follow = {p: 0 for p in follow_logs or []}
        self.last_progress = ("", 0.0)
        # called once an attempt's processes are gone; `main` ends what they orphaned (see flagscale.runner.reap)
        self.after_attempt: Callable[[], object] = lambda: None

    # ---- output (foreground)
    def say(self, line: str) -> None:
        if self.out is not None:
            print(line, file=self.out, flush=True)

    def _relay_logs(self) -> None:
        for path, offset in self.follow.items():
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
            except OSError:
                continue
            if chunk and self.out is not None:
                self.follow[path] = offset + len(chunk)
                self.out.write(chunk.decode("utf-8", "replace"))
                self.out.flush()

    def _publish(self) -> None:
        data = self.record.write()
        if self.out is None:
            return
        self._relay_logs()
        line, when = self.last_progress
        new = progress_line(data)
        if new != line and (time.monotonic() - when >= 5 or data["state"] not in ("running",)):
            self.say(new)
            self.last_progress = (new, time.monotonic())

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < end:
            time.sleep(min(self.poll, max(0.0, end - time.monotonic())))

    # ---- one attempt
    def watch(self) -> str | Diagnosis:
        """Until the attempt ends: "finished", "stopped", or the Diagnosis of a crash or hang."""
        started = time.monotonic()
        seen: dict[int, tuple[tuple, float]] = {}  # rank -> (last heartbeat content, when it changed)
        while True:
            if self.stopping:
                return "stopped"
            states = self.group.states()
            beats = self.group.heartbeats()
            now = time.monotonic()
            for h in beats:
                key = (h.get("iteration"), h.get("phase"), h.get("pid"))
                if seen.get(h["rank"], ((), 0.0))[0] != key:
                    seen[h["rank"]] = (key, now)
            self.record.node_states = states
            self.record.ranks = [{**h, "age": round(time.time() - h.get("time", time.time()), 1)} for h in beats]
            if self.record.state == "starting" and beats:
                self.record.state = "running"
            self._publish()
            iterations = {h["rank"]: h["iteration"] for h in beats}
            failed = [n for n, s in states.items() if s == "failed"]
            if failed:  # one node's failure fails the others: let them end, then pick the one that names the cause
                settle = time.monotonic() + SETTLE
                while "running" in states.values() and time.monotonic() < settle:
                    time.sleep(self.poll)
                    states = self.group.states()
                failed = [n for n, s in states.items() if s == "failed"]
                return most_likely([self.group.diagnose(n, iterations) for n in failed])
            lost = [n for n, s in states.items() if s == "unknown"]
            if lost:  # its record vanished (the run folder was removed or rewritten): nothing left to watch
                return Diagnosis(kind="lost", event="crash", message=f"{lost[0]}: its process record is gone")
            if any(s == "stopped" for s in states.values()):
                return "stopped"  # action=stop marked the nodes (or a person stopped one): not a fault
            if states and all(s == "finished" for s in states.values()):
                return "finished"
            idle = {r: now - when for r, (key, when) in seen.items() if key[1] != "done"}
            limits = {
                r: self.policy.startup if key[1] in STARTUP_PHASES else self.policy.hang_timeout
                for r, (key, when) in seen.items()
            }
            overdue = [limits[r] for r, seconds in idle.items() if seconds > limits[r]]
            expected = self.record.world_size or len(beats)
            if len(seen) < expected and now - started > self.policy.startup:
                overdue.append(self.policy.startup)  # a rank never wrote a heartbeat
            if overdue:
                limit = min(overdue)
                starting = limit == self.policy.startup != self.policy.hang_timeout
                setting = "start_timeout" if starting else "hang_timeout"
                return diagnose_hang(beats, idle, limit, socket.gethostname(), setting=setting)
            time.sleep(self.poll)

    # ---- the policy
    def run(self) -> int:
        rec = self.record
        while True:
            heartbeat.clear(rec.exp_dir)
            rec.attempt_started = time.time()
            rec.state = "starting"
            rec.ranks = []
            self._publish()
            try:
                self.group.start()
                outcome = self.watch()
            except Exception as exc:  # a node that cannot be started or asked (ssh down) is a fault like any other
                outcome = Diagnosis(kind="launcher", event="crash", message=f"{type(exc).__name__}: {exc}")
            if outcome == "finished":
                self.after_attempt()
                rec.state = "finished"
                self._publish()
                return 0
            self._stop_all()
            self.after_attempt()
            if outcome == "stopped" or self.stopping:
                rec.state = "stopped"
                self._publish()
                return 130
            assert isinstance(outcome, Diagnosis)
            rec.diagnoses.append({**outcome.as_dict(), "attempt": rec.restarts + 1})
            self.say(f"[flagscale] {outcome.event}: {outcome.message}")
            if outcome.kind in NOT_RESTARTABLE:
                rec.state = "failed"
                self._publish()
                self.say(
                    f"[flagscale] failed: a restart would repeat this {outcome.kind} error; fix it, then start again"
                )
                return 1
            if rec.restarts >= self.policy.max_restarts:
                rec.state = "failed"
                self._publish()
                self.say(f"[flagscale] failed after {rec.restarts} restart(s); see {status_path(rec.exp_dir)}")
                return 1
            wait = self.policy.backoff(rec.restarts)
            rec.state = "restarting"
            self._publish()
            self.say(f"[flagscale] restarting in {wait:g} s (restart {rec.restarts + 1} of {self.policy.max_restarts})")
            self._sleep(wait)
            if self.stopping:
                rec.state = "stopped"
                self._publish()
                return 130
            rec.restarts += 1

    def _continue_stopped(self) -> None:
        """A rank stopped by a signal (SIGSTOP, state T) ignores SIGTERM until continued: continue this host's
        stopped ranks (pids from their own heartbeats), so the stop that follows ends them at once."""
        here = socket.gethostname()
        for h in self.record.ranks:
            pid = int(h.get("pid") or 0)
            if pid > 0 and h.get("host") == here and process_state(pid) == "T":
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass

    def _stop_all(self) -> None:
        self._continue_stopped()
        try:
            self.group.stop()
        except Exception as exc:  # keep going: the record must still say what happened
            self.say(f"[flagscale] stopping the job's processes failed: {exc}")
        self.record.node_states = self.group.states()
        # heartbeats of the stopped attempt stay until the next start: what the diagnosis was made from


def run_monitored(monitor: Monitor) -> int:
    """Run with SIGTERM/SIGINT turned into an orderly stop (only our processes), then the handlers back."""

    def request_stop(signum, frame):
        monitor.stopping = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return monitor.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------------------------------ entry
def _policy(ft: dict, args: argparse.Namespace) -> Policy:
    from flagscale.settings import convert
    from flagscale.train.settings import FaultToleranceSettings

    settings = convert(FaultToleranceSettings, ft, "experiment.runner.fault_tolerance", from_yaml=True)
    values: dict = {
        "max_restarts": settings.max_restarts if args.max_restarts is None else args.max_restarts,
        "hang_timeout": settings.hang_timeout if args.hang_timeout is None else args.hang_timeout,
        "restart_backoff": settings.restart_backoff if args.restart_backoff is None else args.restart_backoff,
        "start_timeout": settings.start_timeout,
    }
    # the same checks as the YAML's, for the command-line overrides
    convert(FaultToleranceSettings, values, "fault_tolerance", from_yaml=True)
    return Policy(**values)


def build(
    exp_dir: Path, args: argparse.Namespace, cmd: list[str], out: TextIO | None
) -> tuple[Monitor, Callable[[], None]]:
    """The monitor of the job prepared in exp_dir (or of CMD), and what to call before it starts."""
    config = json.loads((exp_dir / "config" / "train.json").read_text())
    exp = config.get("experiment", {})
    runner = exp.get("runner", {})
    policy = _policy(runner.get("fault_tolerance", {}) or {}, args)
    train_iters = config.get("train", {}).get("model", {}).get("train_iters")
    stop_timeout = float(runner.get("stop_timeout", 15.0))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    group: NodeGroup
    if cmd:
        group = LocalGroup(exp_dir, {"job": cmd}, env, stop_timeout)
    else:
        from flagscale.train.launcher import node_group

        group = node_group(config, exp_dir, env)
    record = StatusRecord(
        exp_name=config.get("exp_name", exp.get("exp_name", "experiment")),
        exp_dir=exp_dir,
        nodes=dict(group.hosts),
        world_size=config.get("world_size"),
        train_iters=train_iters,
        max_restarts=policy.max_restarts,
    )
    local_logs = [exp_dir / "logs" / f"{n}.log" for n in group.names if group.hosts[n] == "localhost"]
    poll = getattr(group, "poll", 0.5)  # ssh'd nodes: every poll costs an ssh per node
    monitor = Monitor(group, record, policy, out=out, poll=poll, follow_logs=local_logs if out is not None else None)
    return monitor, lambda: None


def main(argv: list[str] | None = None) -> int:
    from flagscale.errors import reported

    parser = argparse.ArgumentParser(prog="python -m flagscale.runner.monitor")
    parser.add_argument("--exp-dir", required=True, type=Path)
    parser.add_argument("--foreground", action="store_true")
    parser.add_argument("--max-restarts", type=int)
    parser.add_argument("--hang-timeout", type=float)
    parser.add_argument("--restart-backoff", type=float)
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, cmd = parser.parse_args(argv[:cut]), argv[cut + 1 :]
    with reported():
        monitor, _ = build(args.exp_dir.resolve(), args, cmd, sys.stdout if args.foreground else None)
        # A rank killed by a signal orphans its helpers (megatron's checkpoint writer starts a multiprocessing
        # manager) and they would outlive the job. As a subreaper this process adopts them, and after every
        # attempt ends them: every child left then is the attempt's. Only here, in a process of its own: a
        # --foreground monitor runs inside the caller, whose other children are not ours to end.
        if reap.become_subreaper():
            monitor.after_attempt = reap.end_leftovers
        return run_monitored(monitor)
    return 2  # reported() exits on an error; this line is for type checkers


if __name__ == "__main__":
    sys.exit(main())
