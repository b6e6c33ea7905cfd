"""Hostfiles: `host slots=N [type=device]` per line, strictly parsed."""

from __future__ import annotations

import pytest

from flagscale.errors import ConfigError
from flagscale.runner.hostfile import Node, parse_hostfile, read_hostfile


def test_hosts_slots_types_and_comments():
    text = "# cluster\n10.0.0.1 slots=8 type=A800\n\n node-b   slots=4   # no type\nfe80::1 slots=2\n"
    assert parse_hostfile(text) == [Node("10.0.0.1", 8, "A800"), Node("node-b", 4, None), Node("fe80::1", 2, None)]


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "no hosts"),
        ("# only a comment\n", "no hosts"),
        ("node-a\n", "has no slots=N"),
        ("node-a slots=0\n", "expected a positive integer"),
        ("node-a slots=two\n", "expected a positive integer"),
        ("node-a slots=2 gpus=2\n", "expected slots=N or type=NAME"),
        ("node-a slots=2 slots=3\n", "slots given twice"),
        ("node-a slots=2\nnode-a slots=2\n", "listed twice"),
        ("-oProxyCommand=x slots=1\n", "not a host name"),
        ("a;rm slots=1\n", "not a host name"),
        ("node-a slots=1 type=$(x)\n", "not a device type name"),
    ],
)
def test_bad_hostfiles_name_the_line(text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        parse_hostfile(text, "hosts.txt")
    assert str(info.value).startswith("hosts.txt")


def test_missing_hostfile(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_hostfile(tmp_path / "nope")
