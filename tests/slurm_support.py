"""A real Slurm cluster of one node for the tests: this machine, its own config, ports and folders.

`slurm` (a session fixture) writes a private slurm.conf under a temporary folder (this host as the only node
on 127.0.0.1 with all its CPUs, private controller and node ports, state, spool, log and pid paths, a munge
socket and key of its own), starts `munged`, `slurmctld` and `slurmd` from Debian's `slurm-wlm` and `munge`
packages, and waits until the node is idle. At the end it stops the three daemons by the pids they wrote, and
nothing else. Clients reach it through `SLURM_CONF` (`Slurm.env`), so a system Slurm, if any, is not touched.

Runs as root (slurmd starts jobs as their users). Skipped, with the reason, where the binaries are missing or
the user is not root, except on CI (`CI` set), where `.ci/run` installs the packages and a skip would hide a
broken setup: there it fails.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import pid_alive, wait_until

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
PARTITION = "flagscale"


@dataclass(frozen=True)
class Slurm:
    root: Path
    conf: Path
    node: str
    cpus: int

    @property
    def env(self) -> dict[str, str]:
        """What a Slurm client (and every job, which inherits it from sbatch) needs to reach this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(argv), env={**os.environ, **self.env}, capture_output=True, text=True, timeout=timeout
        )

    def job_state(self, job_id: str) -> str | None:
        out = self.run("scontrol", "show", "job", "-o", job_id)
        for word in out.stdout.split():
            if word.startswith("JobState="):
                return word.split("=", 1)[1]
        return None


def _unavailable() -> str | None:
    missing = [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name) is None]
    if missing:
        return f"Slurm is not installed here (no {', '.join(missing)}): apt-get install slurm-wlm munge"
    if os.geteuid() != 0:
        return "the local Slurm needs root (slurmd starts jobs as their users)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(d: Path, node: str, cpus: int) -> str:
    return "\n".join(
        [
            "ClusterName=flagscale-test",
            f"SlurmctldHost={node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={d / 'munge' / 'munge.socket'}",
            f"StateSaveLocation={d / 'state'}",
            f"SlurmdSpoolDir={d / 'spool'}",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}",
            f"SlurmdPidFile={d / 'slurmd.pid'}",
            f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={d / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/pgid",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "ReturnToService=2",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "InactiveLimit=0",
            "MinJobAge=600",  # finished jobs stay visible to scontrol for the whole session
            "KillWait=10",  # seconds between a cancel's SIGTERM and SIGKILL
            f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


def _stop(pid_files: list[Path]) -> None:
    pids = []
    for path in pid_files:
        try:
            pids.append(int(path.read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            continue
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    if not wait_until(lambda: not any(pid_alive(p) for p in pids), 30, interval=0.2):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    reason = _unavailable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI installs it in .ci/run)")
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("munge", "state", "spool", "log"):
        (d / sub).mkdir()
    node, cpus = socket.gethostname().split(".")[0], os.cpu_count() or 1
    key = d / "munge" / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o400)
    conf = d / "slurm.conf"
    conf.write_text(_config(d, node, cpus))
    cluster = Slurm(d, conf, node, cpus)
    pid_files = [d / "munge" / "munged.pid", d / "slurmctld.pid", d / "slurmd.pid"]
    try:
        # munged checks its folders' owners and modes; --force lets root run it in a private folder
        munge = d / "munge"
        _start(
            ["munged", "--force", f"--socket={munge / 'munge.socket'}", f"--key-file={key}"]
            + [f"--pid-file={pid_files[0]}", f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'seed'}"],
            d,
        )
        _start(["slurmctld", "-c", "-f", str(conf)], d)
        _start(["slurmd", "-c", "-f", str(conf)], d)
        started = time.monotonic()

        def idle() -> bool:
            out = cluster.run("sinfo", "-h", "-N", "-o", "%t")
            return out.returncode == 0 and out.stdout.strip() == "idle"

        if not wait_until(idle, 60, interval=0.5):
            logs = {p.name: p.read_text()[-1500:] for p in (d / "log").glob("*.log")}
            pytest.fail(f"the local Slurm node did not become idle within 60 s: {logs}")
        print(f"\nlocal Slurm up in {time.monotonic() - started:.1f} s ({node}, {cpus} CPUs, {conf})")
        yield cluster
    finally:
        leftover = cluster.run("squeue", "-h", "-o", "%i").stdout.split()
        if leftover:  # a failed test's jobs: cancel them so slurmd's steps end before slurmd does
            cluster.run("scancel", *leftover)
            wait_until(lambda: not cluster.run("squeue", "-h", "-o", "%i").stdout.split(), 30, interval=0.5)
        _stop(pid_files[::-1])


def _start(argv: list[str], d: Path) -> None:
    """Start a daemon (each forks into the background once it is set up) and fail with its log if it cannot."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=d)
    if result.returncode != 0:
        logs = {p.name: p.read_text()[-1500:] for p in (d / "log").glob("*.log")}
        pytest.fail(f"{argv[0]} did not start: {result.stdout}{result.stderr} {logs}")
