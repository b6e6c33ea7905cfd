"""What went wrong, in one line: a crash or hang of a training job matched against known failure signatures.

`diagnose_crash` reads the end of the node's log (torchrun's own output and its workers' stderr) and each
rank's log; `diagnose_hang` looks at the ranks' last heartbeats. Both give a `Diagnosis` with the kind, the
rank, node, iteration and log where it was seen, and a message for people. Signatures, first match wins:

    config              a FlagScale configuration error raised in a rank (ConfigError): restarting cannot fix it
    oom                 CUDA/NPU/HIP out of memory, torch.OutOfMemoryError, std::bad_alloc
    collective_timeout  NCCL/HCCL/gloo watchdog or collective timeouts
    rendezvous          torchrun's rendezvous errors, a store that cannot be reached
    device_error        CUDA/NCCL/HCCL/XID/ECC errors, device-side asserts
    missing_file        FileNotFoundError, "No such file or directory"
    signal              a rank or torchrun killed by a signal (torchrun's "Signal N (SIGX) received")
    traceback           otherwise: the last line of the last Python traceback
    exit                otherwise: the exit status alone
    hang                no heartbeat progress for hang_timeout seconds
"""

from __future__ import annotations

import re
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

TAIL_BYTES = 256 * 1024  # the end of a log holds the failure; a multi-GB log is never read whole

# (kind, pattern, what it means): checked in this order on each log.
SIGNATURES: tuple[tuple[str, str, str], ...] = (
    ("config", r"flagscale\.errors\.(Config|Settings)Error: ", "a configuration error"),
    (
        "oom",
        r"(CUDA|NPU|HIP|XPU|MLU)?\s*out of memory|OutOfMemoryError|std::bad_alloc|Cannot allocate memory",
        "out of memory",
    ),
    (
        "collective_timeout",
        r"Watchdog caught collective operation timeout|collective operation timeout|"
        r"(NCCL|HCCL|gloo|Gloo).{0,80}[Tt]imed? ?out|Timed out waiting .{0,40}for (send|recv|the collective)",
        "a collective operation timed out",
    ),
    (
        "rendezvous",
        r"Rendezvous\w*Error|RendezvousTimeout|rendezvous .{0,40}(timed out|failed|closed)|DistNetworkError|"
        r"DistStoreError|The client socket has failed to connect",
        "the rendezvous failed",
    ),
    (
        "device_error",
        r"CUDA error|NCCL error|ncclInternalError|ncclSystemError|HCCL error|ACL error|Xid|ECC error|"
        r"uncorrectable|device-side assert|CUBLAS_STATUS_\w+|CUDNN_STATUS_\w+",
        "a device error",
    ),
    ("missing_file", r"FileNotFoundError|No such file or directory", "a file is missing"),
)


@dataclass(frozen=True)
class Diagnosis:
    kind: str  # one of the kinds in the module docstring
    event: str  # crash | hang
    message: str  # one line for people
    rank: int | None = None
    node: str | None = None
    iteration: int | None = None
    log: str | None = None
    exit_status: int | None = None
    time: float = field(default_factory=time.time)

    def as_dict(self) -> dict:
        return asdict(self)


def tail(path: Path | str, size: int = TAIL_BYTES, start: int = 0) -> str:
    """The end of a log, from `start` on (where this attempt began writing: logs are appended to)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(start, f.tell() - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def root_cause(log_text: str) -> str:
    """torchrun's "Root Cause (first observed failure)" section ("" when it printed none)."""
    cause = log_text.rfind("Root Cause")
    return log_text[cause : cause + 2000] if cause >= 0 else ""


def failed_rank(log_text: str) -> tuple[int | None, int | None]:
    """The global rank of torchrun's root cause and its exit code, when it says."""
    section = root_cause(log_text)
    rank = re.search(r"rank\s*:\s*(\d+)", section)
    code = re.search(r"exitcode\s*:\s*(-?\d+)", section)
    return (int(rank.group(1)) if rank else None, int(code.group(1)) if code else None)


def last_traceback(text: str) -> str | None:
    """The exception line ending the last Python traceback in `text`."""
    start = text.rfind("Traceback (most recent call last)")
    if start < 0:
        return None
    for line in text[start:].splitlines()[1:]:
        stripped = re.sub(r"^\[[^\]]*\]:?\s*", "", line).strip()  # torchrun's "[rank1]:" prefix
        if stripped and not line.startswith((" ", "\t")) and not stripped.startswith(("File ", "^", "~")):
            if re.match(r"[\w.]+(Error|Exception|Interrupt|Exit)\b|[\w.]+: ", stripped):
                return stripped[:300]
    return None


def match_signature(text: str) -> tuple[str, str, str] | None:
    """(kind, meaning, the matching line) of the first known signature found in `text`."""
    for kind, pattern, meaning in SIGNATURES:
        matches = list(re.finditer(pattern, text))
        if matches:
            found = matches[-1]  # the last occurrence: closest to the failure
            start = text.rfind("\n", 0, found.start()) + 1
            end = text.find("\n", found.end())
            line = text[start : end if end >= 0 else len(text)].strip()
            return kind, meaning, line[:300]
    return None


def diagnose_crash(
    node: str,
    node_log: Path | str,
    exit_status: int | None,
    rank_logs: dict[int, Path],
    iterations: dict[int, int],
    log_start: int = 0,
    rank_log_start: dict[int, int] | None = None,
) -> Diagnosis:
    """A node ended non-zero: why, from its log (from `log_start`: this attempt's part) and its ranks' logs.
    `iterations`: rank -> its last heartbeat's iteration."""
    text = tail(node_log, start=log_start)
    rank, code = failed_rank(text)
    rank_text = ""
    if rank is not None and rank in rank_logs:
        rank_text = tail(rank_logs[rank], start=(rank_log_start or {}).get(rank, 0))

    def where(r: int | None) -> str:
        at = f" at iteration {iterations[r]}" if r is not None and r in iterations else ""
        return (f"rank {r} on {node}" if r is not None else node) + at

    log = str(rank_logs[rank]) if rank is not None and rank in rank_logs else str(node_log)
    iteration = iterations.get(rank) if rank is not None else None
    if iteration is None and iterations:
        iteration = min(iterations.values())

    def found(kind: str, what: str) -> Diagnosis:
        return Diagnosis(
            kind=kind,
            event="crash",
            message=f"{where(rank)}: {what}",
            rank=rank,
            node=node,
            iteration=iteration,
            log=log,
            exit_status=exit_status,
        )

    # torchrun's root cause killed by a signal is the first failure; what other ranks print after is fallout
    sig = re.search(r"Signal (\d+) \((SIG\w+)\) received", root_cause(text))
    if sig or (code is not None and code < 0):
        return found("signal", f"killed by {sig.group(2) if sig else _signal_name(-(code or 0))}")
    for source in (rank_text, text):
        match = match_signature(source)
        if match:
            return found(match[0], f"{match[1]}: {match[2]}")
    if exit_status is not None and exit_status > 128 and rank is None:
        return found("signal", f"torchrun killed by {_signal_name(exit_status - 128)}")
    line = last_traceback(rank_text) or last_traceback(text)
    if line:
        return found("traceback", line)
    detail = next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), "no output")
    return found("exit", f"exit status {exit_status} ({detail[:200]})")


# When several nodes failed, these kinds name the cause; the others (a peer's lost connection, a collective
# that timed out waiting for a dead rank) are usually what the cause did to the other nodes.
ROOT_CAUSES = ("config", "signal", "oom", "device_error", "missing_file")
# Faults that a restart would only repeat: the job ends failed at once.
NOT_RESTARTABLE = ("config",)


def most_likely(found: list[Diagnosis]) -> Diagnosis:
    """The diagnosis that most likely names the cause, of those of several failed nodes (in order seen)."""
    return min(found, key=lambda d: ROOT_CAUSES.index(d.kind) if d.kind in ROOT_CAUSES else len(ROOT_CAUSES))


def process_state(pid: int) -> str | None:
    """The kernel's one-letter state of a local pid (T: stopped by a signal), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[0]


def diagnose_hang(
    heartbeats: list[dict], idle: dict[int, float], hang_timeout: float, local_host: str, setting: str = "hang_timeout"
) -> Diagnosis:
    """No progress for hang_timeout (the value of `setting`: start_timeout before training): the rank behind (lowest
    iteration, then the longest idle) is the suspect; a rank of this host stopped by a signal (state T) is named
    as such."""
    if not heartbeats:
        return Diagnosis(
            kind="hang",
            event="hang",
            message=f"no rank wrote a heartbeat within {hang_timeout:g} s of the start (start-up or rendezvous hangs)",
        )
    stopped = [
        h for h in heartbeats if h.get("host") == local_host and process_state(int(h.get("pid", 0)) or -1) == "T"
    ]
    suspect = stopped[0] if stopped else min(heartbeats, key=lambda h: (h["iteration"], -idle.get(h["rank"], 0.0)))
    rank, node, it = suspect["rank"], f"node{suspect['node']}", suspect["iteration"]
    state = " is stopped by a signal (SIGSTOP/SIGTSTP)" if stopped else " made no progress"
    return Diagnosis(
        kind="hang",
        event="hang",
        message=f"rank {rank} on {node} (pid {suspect.get('pid')}){state} at iteration {it}: "
        f"no heartbeat progress for {max(idle.values(), default=hang_timeout):.0f} s "
        f"({setting} {hang_timeout:g} s), phase {suspect.get('phase')}",
        rank=rank,
        node=node,
        iteration=it,
    )
