"""`python -m flagscale.runner.reap -- CMD...`: run CMD; when it ends, end whatever it left behind.

torchrun starts every rank in a session of its own, and a rank killed by a signal leaves its helpers running
(megatron's checkpoint writer starts a multiprocessing manager): they hold the node's output open (srun then
waits 60 s for them before the step can end) and live on after the job. Here this process is a child
subreaper (Linux `PR_SET_CHILD_SUBREAPER`): what is orphaned below it becomes its child instead of init's, and
once CMD has exited every such process is SIGKILLed and reaped. SIGTERM, SIGINT and SIGHUP are passed to CMD.
It leads a process group of its own (CMD in it): a stop is the caller's to pass on (SIGTERM), and a SIGKILL of the
caller's group (Slurm sends one once a task's shell exits) cannot end it before it has ended what CMD left.
A caller that dies (even by SIGKILL) counts as a stop (`PR_SET_PDEATHSIG`), and CMD still running `GRACE_S`
after a stop is SIGKILLed, with what it leaves: nothing of the job outlives a stop.
The exit status is CMD's (128 + N for a signal N, as a shell reports it).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1
# After a stop signal CMD gets this long to end by itself (torchrun gives its ranks 30 s), then SIGKILL.
GRACE_S = 45.0
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def become_subreaper() -> bool:
    """Make orphaned descendants this process's children; False where the kernel does not offer it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def children(pid: int) -> list[int]:
    """The live processes whose parent is `pid` (read from /proc/<pid>/stat of every process)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ...
        if len(fields) > 1 and fields[0] != "Z" and int(fields[1]) == pid:
            found.append(int(name))
    return found


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        found += kids
        todo += kids
    return found


def _reap_zombies() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def end_leftovers(timeout: float = 10.0) -> list[int]:
    """SIGKILL and reap every child left (and theirs, which become ours as they are orphaned); their pids."""
    ended: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap_zombies()
        left = children(os.getpid())
        if not left:
            break
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
                ended.append(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    return ended


def _parent_death_signal(sig: int) -> None:
    """Ask the kernel for `sig` when our parent exits (Linux PR_SET_PDEATHSIG); nothing elsewhere."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "--":
        print("usage: python -m flagscale.runner.reap -- CMD...", file=sys.stderr)
        return 2
    parent = os.getppid()
    become_subreaper()  # without it (not Linux) nothing is adopted, and nothing is left to end: CMD still runs
    os.setpgid(0, 0)  # a SIGKILL of the caller's process group (Slurm's, at a stop) must not end us before CMD
    _parent_death_signal(signal.SIGTERM)  # a caller killed outright (SIGKILL) still stops CMD
    try:
        child = subprocess.Popen(argv[1:])
    except OSError as exc:
        print(f"flagscale: could not start {argv[1]}: {exc}", file=sys.stderr, flush=True)
        return 127
    stopping: list[float] = []

    def forward(signum, frame):
        child.send_signal(signum)
        for pid in descendants(child.pid):  # a stopped (SIGSTOP) rank acts on torchrun's SIGTERM only once continued
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        stopping.append(time.monotonic())

    for sig in FORWARDED:
        signal.signal(sig, forward)
    if os.getppid() != parent:  # the caller was gone before the death signal was asked for
        forward(signal.SIGTERM, None)
    while True:
        try:
            code = child.wait(timeout=1.0)
            break
        except subprocess.TimeoutExpired:
            if stopping and time.monotonic() - stopping[0] > GRACE_S:  # CMD does not end: its processes go too
                child.kill()
        except InterruptedError:
            continue
    ended = end_leftovers()
    if ended and code != 0:  # a clean exit's helpers were about to end anyway
        print(f"flagscale: ended {len(ended)} process(es) the job left behind", file=sys.stderr, flush=True)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
