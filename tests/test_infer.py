"""`flagscale infer` with llama.cpp for real: a prompts file in, a JSONL of completions out."""

from __future__ import annotations

import json

import pytest
from llama_cpp_support import REPO_ROOT, backend_env, flagscale, installed_backend, tiny_gguf, work_root

pytestmark = pytest.mark.integration
CONF = REPO_ROOT / "examples" / "tiny_llama" / "conf"


@pytest.fixture(scope="module")
def env():
    root = work_root()
    return {
        **backend_env(installed_backend(root)),
        "TINY_LLAMA_GGUF": str(tiny_gguf(root)),
        "TINY_LLAMA_PROMPTS": str(REPO_ROOT / "examples" / "tiny_llama" / "prompts.txt"),
    }


def test_writes_one_completion_per_prompt(env, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('Once upon a time\n\n{"prompt": "Hello world"}\nThe end\n')
    out = tmp_path / "out" / "completions.jsonl"
    args = [
        f"experiment.exp_dir={tmp_path}",
        f"infer.generate.prompts={prompts}",
        f"infer.generate.output={out}",
        "infer.generate.max_tokens=7",
    ]
    result = flagscale("infer", str(CONF), *args, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["Once upon a time", "Hello world", "The end"]
    for record in records:
        # llama-cpp-python may run a token or two past max_tokens to finish a split UTF-8 character
        assert 7 <= record["completion_tokens"] <= 10 and record["prompt_tokens"] > 0 and record["completion"]
        assert record["latency_s"] > 0 and record["tokens_per_s"] > 0
    again = tmp_path / "again.jsonl"  # greedy decoding with a seed: the same completions again
    result = flagscale(
        "infer",
        str(CONF),
        *args[:-2],
        f"infer.generate.output={again}",
        "infer.generate.max_tokens=7",
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["completion"] for line in again.read_text().splitlines()] == [
        r["completion"] for r in records
    ]


def test_bad_inputs_are_one_line_errors(env, tmp_path):
    base = [f"experiment.exp_dir={tmp_path}"]
    missing = flagscale("infer", str(CONF), *base, f"infer.model={tmp_path}/none.gguf", env=env, cwd=tmp_path)
    assert missing.returncode == 2 and "none.gguf: no such GGUF file" in missing.stderr
    prompts = flagscale("infer", str(CONF), *base, f"infer.generate.prompts={tmp_path}/none.txt", env=env, cwd=tmp_path)
    assert prompts.returncode == 2 and "no such prompts file" in prompts.stderr
    unknown = flagscale("infer", str(CONF), *base, "+infer.engine_args.n_ctxx=64", env=env, cwd=tmp_path)
    assert unknown.returncode == 2 and "llama.cpp takes no such argument (did you mean n_ctx?)" in unknown.stderr
    sampling = flagscale("infer", str(CONF), *base, "infer.generate.max_tokens=0", env=env, cwd=tmp_path)
    assert sampling.returncode == 2 and "infer.generate.max_tokens=0: expected a number >= 1" in sampling.stderr
    assert "Traceback" not in missing.stderr + prompts.stderr + unknown.stderr + sampling.stderr
