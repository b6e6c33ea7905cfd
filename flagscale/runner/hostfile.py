"""Hostfiles as FlagScale (and DeepSpeed) users write them: one node per line.

    # comment
    10.0.0.1 slots=8 type=A800
    node-b   slots=8            # type is optional

`host` is a name or address ssh can reach; `slots` is how many processes the node runs; `type` names
the node's device type (for per-device-type environment variables). Anything else is an error, with
the file and line, so a typo cannot silently launch the wrong job.

The one parser of `experiment.runner.hostfile`: `flagscale train` runs torchrun on its nodes, and
`flagscale serve` (Ray mode) joins each line as a Ray worker node with `slots` CPUs (`type` unused there).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from flagscale.errors import ConfigError

_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]*")  # names, IPv4, IPv6; never an option or shell syntax
_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]*")


@dataclass(frozen=True)
class Node:
    host: str
    slots: int
    type: str | None = None


def parse_hostfile(text: str, source: str = "hostfile") -> list[Node]:
    nodes: list[Node] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{lineno}"
        host, *fields = line.split()
        if not _HOST.fullmatch(host):
            raise ConfigError(f"{where}: {host!r} is not a host name or address")
        values: dict[str, str] = {}
        for item in fields:
            key, sep, value = item.partition("=")
            if not sep or key not in ("slots", "type"):
                raise ConfigError(f"{where}: {item!r}: expected slots=N or type=NAME")
            if key in values:
                raise ConfigError(f"{where}: {key} given twice")
            values[key] = value
        if "slots" not in values:
            raise ConfigError(f"{where}: {host} has no slots=N")
        if not values["slots"].isdigit() or int(values["slots"]) < 1:
            raise ConfigError(f"{where}: slots={values['slots']}: expected a positive integer")
        if "type" in values and not _TYPE.fullmatch(values["type"]):
            raise ConfigError(f"{where}: type={values['type']!r} is not a device type name")
        if any(n.host == host for n in nodes):
            raise ConfigError(f"{where}: {host} is listed twice")
        nodes.append(Node(host, int(values["slots"]), values.get("type")))
    if not nodes:
        raise ConfigError(f"{source}: no hosts (expected lines of `host slots=N [type=device]`)")
    return nodes


def read_hostfile(path: str | Path) -> list[Node]:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"hostfile {path} does not exist (experiment.runner.hostfile)") from None
    except OSError as exc:
        raise ConfigError(f"hostfile {path}: {exc.strerror}") from None
    return parse_hostfile(text, str(path))
