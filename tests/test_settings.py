"""flagscale.settings: the one converter from plain data (YAML, TOML, JSON, -C settings) to typed settings."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from flagscale.errors import ConfigError
from flagscale.settings import at_least, closest, convert, data_keys, nearest, nonempty, setting


def _even(value: int) -> int:
    if value % 2:
        raise ValueError("must be even")
    return value


def _dotted(values: tuple[str, ...]) -> tuple[str, ...]:
    for index, value in enumerate(values):
        if "." not in value:
            raise ValueError(f"item {index}: {value!r} has no dot")
    return values


@dataclass(frozen=True)
class Inner:
    size: int = setting(2, check=_even)
    ratio: float = 0.5


@dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    mode: Literal["fast", "slow"] = "fast"
    debug: bool = False
    limit: int | None = None
    tags: tuple[str, ...] = ()
    inners: tuple[Inner, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    extra: dict = field(default_factory=dict)
    anything: Any = None
    upstream_source: str = setting("auto", key="upstream-source")
    hosts: tuple[str, ...] = setting((), check=_dotted)
    count: int = setting(1, check=at_least(1, "an integer"))
    label: str | None = setting(None, check=nonempty)


def outer(**data) -> Outer:
    return convert(Outer, {"name": "x", **data}, "cfg")


def fails(message: str, **data) -> None:
    with pytest.raises(ConfigError, match=message):
        outer(**data)


# ------------------------------------------------------------------------------------------- types
def test_defaults_nested_values_and_every_type():
    assert outer() == Outer("x")
    got = outer(
        inner={"size": 4, "ratio": 1},
        mode="slow",
        debug=True,
        limit=3,
        tags=["a", "b"],
        inners=[{}, {"size": 6}],
        env={"B": "2", "A": "1"},
        extra={1: [2]},
        anything=[{"x": 1}],
    )
    assert got.inner == Inner(4, 1.0) and isinstance(got.inner.ratio, float)
    assert (got.mode, got.debug, got.limit, got.tags) == ("slow", True, 3, ("a", "b"))
    assert got.inners == (Inner(), Inner(6))
    assert got.env == (("A", "1"), ("B", "2"))  # a mapping kept as sorted, hashable pairs
    assert got.extra == {"1": [2]} and got.anything == [{"x": 1}]
    assert outer(limit=None).limit is None and outer(inner=None).inner == Inner()


@pytest.mark.parametrize(
    "data, message",
    [
        ({"debug": 1}, r"cfg.debug=1: expected true or false"),
        ({"limit": True}, r"cfg.limit=True: expected an integer"),  # a bool is not an int
        ({"limit": 1.5}, r"cfg.limit=1.5: expected an integer"),
        ({"inner": {"ratio": "x"}}, r"cfg.inner.ratio='x': expected a number"),
        ({"name": 3}, r"cfg.name=3: expected a string"),  # TOML, JSON, -C: typed as written
        ({"tags": "a"}, r"cfg.tags='a': expected a list of strings"),
        ({"tags": ["a", 1]}, r"cfg.tags\[1\]=1: expected a string"),
        ({"inner": "big"}, r"cfg.inner: expected a mapping, got str 'big'"),
        ({"inners": [{"sise": 2}]}, r"cfg.inners\[0\].sise: unknown key \(did you mean 'size'\?\)"),
        ({"env": "A=1"}, r"cfg.env='A=1': expected a mapping"),
        ({"env": {"A": 1}}, r"cfg.env.A=1: expected a string"),
        ({"extra": []}, r"cfg.extra=\[\]: expected a mapping"),
    ],
)
def test_values_of_the_wrong_type_name_the_dotted_key(data, message):
    fails(message, **data)


def test_yaml_scalars_are_strings_where_a_string_is_wanted():
    # YAML and Hydra overrides type a scalar by its look: `visible_devices=3` is a number there
    assert convert(Outer, {"name": 3, "tags": [1, True]}, "cfg", from_yaml=True) == Outer("3", tags=("1", "True"))
    with pytest.raises(ConfigError, match=r"cfg.name=None: expected a string"):
        convert(Outer, {"name": None}, "cfg", from_yaml=True)


# ---------------------------------------------------------------------------------------- choices
def test_a_literal_is_a_choice_naming_the_valid_ones_and_the_nearest():
    fails(r"cfg.mode=fsat: use one of fast, slow \(did you mean 'fast'\?\)", mode="fsat")
    with pytest.raises(ConfigError) as info:
        outer(mode="turbo")
    assert str(info.value) == "cfg.mode=turbo: use one of fast, slow"


# ------------------------------------------------------------------------------------------- keys
def test_unknown_key_names_the_dotted_key_and_the_nearest_or_the_valid_keys():
    with pytest.raises(ConfigError) as info:
        outer(inner={"sizes": 2})
    assert str(info.value) == "cfg.inner.sizes: unknown key (did you mean 'size'?)"
    with pytest.raises(ConfigError) as info:
        outer(zzz=1)
    assert str(info.value).startswith("cfg.zzz: unknown key; valid keys: name, inner, mode, debug, limit, tags")


def test_a_file_format_words_unknown_keys_its_own_way():
    wording = "{where}: unknown field {key!r}; valid fields: {valid}{hint}"
    with pytest.raises(ConfigError) as info:
        convert(Inner, {"sise": 2}, "f.toml: [x]", unknown=wording)
    assert str(info.value) == "f.toml: [x]: unknown field 'sise'; valid fields: size, ratio (did you mean 'size'?)"
    with pytest.raises(ConfigError, match="cfg.inner.sise: unknown field"):  # nested tables word it alike
        convert(Outer, {"name": "x", "inner": {"sise": 2}}, "cfg", unknown="{where}.{key}: unknown field{hint}")


def test_missing_required_field_names_the_key():
    with pytest.raises(ConfigError) as info:
        convert(Outer, {}, "cfg")
    assert str(info.value) == "cfg: missing required field 'name'"
    with pytest.raises(ConfigError, match="cfg: missing required field 'name'"):
        convert(Outer, None, "cfg")


def test_a_field_read_from_another_spelling():
    assert outer(**{"upstream-source": "sdist"}).upstream_source == "sdist"
    fails(r"cfg.upstream_source: unknown key \(did you mean 'upstream-source'\?\)", upstream_source="sdist")
    assert "upstream-source" in data_keys(Outer) and "upstream_source" not in data_keys(Outer)
    with pytest.raises(ConfigError) as info:  # a top-level key without a `where` (the -C settings)
        convert(Inner, {"size": 3}, "")
    assert str(info.value) == "size=3: must be even"


def test_given_fields_come_from_the_caller_not_the_data():
    assert convert(Outer, {}, "cfg", given={"name": "from-the-caller"}).name == "from-the-caller"
    with pytest.raises(ConfigError, match=r"cfg.name: unknown key"):
        convert(Outer, {"name": "x"}, "cfg", given={"name": "y"})
    inner = Inner(8)  # a table converted on its own passes as is
    assert outer(inner=inner).inner is inner


# ----------------------------------------------------------------------------------------- checks
def test_a_check_names_the_key_and_value_or_the_key_of_a_list():
    assert outer(inner={"size": 4}, hosts=["a.b"], count=2, label="x").count == 2
    fails(r"^cfg.inner.size=3: must be even$", inner={"size": 3})
    fails(r"^cfg.count=0: expected an integer >= 1$", count=0)
    fails(r"^cfg.label='  ': must not be empty$", label="  ")
    fails(r"^cfg.hosts: item 1: 'b' has no dot$", hosts=["a.b", "b"])
    assert outer(label=None).label is None  # None is not checked: it is the absence of a value


def test_a_check_runs_after_the_type_and_returns_the_value():
    @dataclass(frozen=True)
    class Lowered:
        digest: str = setting("", check=str.lower)

    assert convert(Lowered, {"digest": "ABC"}, "cfg").digest == "abc"
    with pytest.raises(ConfigError, match=r"cfg.digest=1: expected a string"):
        convert(Lowered, {"digest": 1}, "cfg")


def test_an_unsupported_type_is_a_bug_not_a_config_error():
    @dataclass(frozen=True)
    class Odd:
        values: set = field(default_factory=set)

    with pytest.raises(TypeError, match="unsupported settings type"):
        convert(Odd, {"values": [1]}, "cfg")


# -------------------------------------------------------------------------------- did you mean ...
def test_nearest_is_the_one_did_you_mean():
    assert nearest("devise", ["device", "backend"]) == " (did you mean 'device'?)"
    assert nearest("zzz", ["device", "backend"]) == ""
    assert closest("--ctx-sise", ["--ctx-size", "--threads"], cutoff=0.75) == "--ctx-size"
    assert closest("x", []) is None


def test_the_module_imports_only_the_standard_library():
    code = (
        "import sys, flagscale.settings; "
        "print(sorted(m for m in ('omegaconf', 'hydra', 'yaml', 'packaging', 'typer', 'torch') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
