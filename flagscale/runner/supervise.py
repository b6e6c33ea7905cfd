"""`python -m flagscale.runner.supervise EXIT_FILE -- CMD...`: run CMD, then record its exit status.

It leads the session `flagscale.runner.process` started, so a stop signals CMD and its children as one
group. A SIGTERM to the group reaches CMD directly; the supervisor waits for CMD rather than dying first,
so the exit status is still written.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m flagscale.runner.supervise EXIT_FILE -- CMD...", file=sys.stderr)
        return 2
    exit_file, cmd = argv[0], argv[2:]
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)  # CMD got the same signal (one group); outlive it to record
    code: int
    try:
        child = subprocess.Popen(cmd)  # exec resets caught signals: CMD gets the defaults
    except OSError as exc:
        print(f"flagscale: could not start {cmd[0]}: {exc}", file=sys.stderr, flush=True)
        code = 127
    else:
        while True:
            try:
                code = child.wait()
                break
            except InterruptedError:
                continue
        if code < 0:
            code = 128 - code  # as a shell reports a signal: 143 for SIGTERM
    tmp = f"{exit_file}.{os.getpid()}.tmp"
    with open(tmp, "w") as out:
        out.write(f"{code}\n")
    os.replace(tmp, exit_file)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
