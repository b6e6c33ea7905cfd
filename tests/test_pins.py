"""upstreams.toml: the real pins parse; bad pins fail naming the file and field."""

from __future__ import annotations

import pytest
from conftest import REPO_ROOT

from flagscale.errors import ConfigError
from flagscale.upstream.pins import load_pins


def test_real_pins_parse_with_the_design_facts():
    pins = load_pins(REPO_ROOT / "third_party" / "upstreams.toml")
    assert pins.names == ["megatron", "vllm", "sglang", "llama.cpp"]
    megatron = pins.resolve("Megatron-LM")
    assert megatron.commit == "55ac7082517c3878ae653c07c09c534b8aed49f6"
    assert megatron.sdist.sha256 == "86522feacfa5ef384a6ac627e7d88cf4866811aed3bc9b6c2a85cbf15cff91a3"
    assert pins.resolve("megatron_core") is megatron and pins.resolve("MCORE") is megatron
    llama = pins.resolve("llama-cpp")
    assert llama.sdist.repo_to_sdist("ggml/src/ggml.c") == "vendor/llama.cpp/ggml/src/ggml.c"
    assert llama.sdist.sdist_to_repo("llama_cpp/llama.py") is None
    sglang = pins.resolve("sglang")
    assert sglang.sdist.repo_to_sdist("python/sglang/srt/server_args.py") == "sglang/srt/server_args.py"
    assert sglang.sdist.repo_to_sdist("sgl-kernel/setup.py") is None
    assert sglang.sdist.sdist_to_repo("pyproject.toml") == "python/pyproject.toml"


def test_unknown_backend_suggests_the_nearest():
    pins = load_pins(REPO_ROOT / "third_party" / "upstreams.toml")
    with pytest.raises(
        ConfigError, match=r"valid backends: megatron, vllm, sglang, llama.cpp \(did you mean 'vllm'\?\)"
    ):
        pins.resolve("vlm")


@pytest.mark.parametrize(
    "body, message",
    [
        ('[x]\nname="X"\ngit="g"\n', "missing required field 'sdist'"),
        (
            '[x]\nname="X"\ngit="g"\ncomit="a"\n[x.sdist]\nname="x"\nversion="1"\nsha256="' + "a" * 64 + '"\n',
            "unknown field 'comit'.*did you mean 'commit'",
        ),
        (
            '[x]\nname="X"\ngit="g"\ncommit="abc"\n[x.sdist]\nname="x"\nversion="1"\nsha256="' + "a" * 64 + '"\n',
            "not a full 40-hex commit",
        ),
        ('[x]\nname="X"\ngit="g"\n[x.sdist]\nname="x"\nversion="1"\nsha256="xyz"\n', r"\[x.sdist\].sha256"),
        (
            '[x]\nname="X"\ngit="g"\n[x.sdist]\nname="x"\nversion="1"\nsha256="' + "a" * 64 + '"\npaths={"../"=""}\n',
            "relative folder",
        ),
        ("[x\n", "not valid TOML"),
    ],
)
def test_bad_pins_name_file_and_field(tmp_path, body, message):
    path = tmp_path / "upstreams.toml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=message) as info:
        load_pins(path)
    assert str(path) in str(info.value)
