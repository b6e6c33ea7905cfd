"""ssh to the nodes of a hostfile: one argv builder for `flagscale train` and `flagscale serve`.

The remote side gets exactly one string, the `shlex.join` of the remote argv, so every word arrives intact
whatever it holds (`$`, quotes, spaces). BatchMode: a node that would ask for a password fails at once
instead of hanging. `experiment.runner.ssh_port` and `experiment.runner.ssh_options` (`Key=Value` strings,
passed as `-o Key=Value`) apply to every connection; `--` ends ssh's options, so a host never reads as one.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Sequence

from flagscale.errors import ConfigError

OPTIONS_KEY = "experiment.runner.ssh_options"


def check_options(options: Iterable[str], key: str = OPTIONS_KEY) -> tuple[str, ...]:
    """`Key=Value` ssh options; anything that could read as a command-line flag is refused."""
    checked = []
    for option in options:
        if not isinstance(option, str) or option.startswith("-") or "=" not in option:
            raise ConfigError(f"{key}: {option!r} is not an ssh option (Key=Value)")
        checked.append(option)
    return tuple(checked)


def ssh_command(
    host: str, remote_argv: Sequence[str], *, port: int = 22, options: Iterable[str] = (), tty: bool = False
) -> list[str]:
    """ssh argv running `remote_argv` on `host`: the remote shell sees one string of quoted words.

    `tty=True` (`-tt`) gives the remote command a terminal even when ours is none: when this ssh ends (it is
    stopped, killed, or its connection drops) sshd hangs the terminal up, and the kernel sends SIGHUP to the
    remote command's foreground process group. Without a terminal a remote command outlives its ssh.
    """
    cmd = ["ssh", *(["-tt"] if tty else []), "-o", "BatchMode=yes", "-p", str(port)]
    for option in check_options(options):
        cmd += ["-o", option]
    return cmd + ["--", host, shlex.join(remote_argv)]
