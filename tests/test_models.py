"""tools/make_tiny_model.py and tools/convert_to_gguf.py: a tiny checkpoint made offline, converted with the
pinned llama.cpp converter, quantized with the wheel's llama-quantize, and loadable by llama.cpp."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
from llama_cpp_support import TOOLS, backend_env, installed_backend, real_cache_dir, tiny_gguf, work_root

pytestmark = pytest.mark.integration
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_model_is_deterministic_and_loads_with_transformers(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    for name in ("a", "b"):
        subprocess.run(
            [sys.executable, str(TOOLS / "make_tiny_model.py"), str(tmp_path / name), "--vocab", "320"],
            check=True,
            env={**os.environ, **OFFLINE},
            capture_output=True,
        )
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"} <= set(files)
    for name in files:  # same arguments, same bytes: tests and benchmarks compare like with like
        assert _sha(tmp_path / "a" / name) == _sha(tmp_path / "b" / name), name
    code = (
        "import sys; from transformers import AutoTokenizer, AutoModelForCausalLM;"
        "t = AutoTokenizer.from_pretrained(sys.argv[1]); m = AutoModelForCausalLM.from_pretrained(sys.argv[1]);"
        "ids = t('once upon a time', return_tensors='pt').input_ids;"
        "out = m.generate(ids, max_new_tokens=4, do_sample=False); print(out.shape[1] - ids.shape[1])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "a")],
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE},
        check=True,
    )
    assert result.stdout.strip() == "4"


def test_convert_and_quantize_with_the_pinned_tools(tmp_path):
    root = work_root()
    site = installed_backend(root)
    gguf = tiny_gguf(root)
    assert gguf.read_bytes()[:4] == b"GGUF"
    env = {**os.environ, **OFFLINE, **backend_env(site), "FLAGSCALE_CACHE_DIR": str(real_cache_dir() / "build-cache")}
    out = tmp_path / "tiny-q8_0.gguf"
    result = subprocess.run(
        [
            sys.executable,
            str(TOOLS / "convert_to_gguf.py"),
            str(root / "hf"),
            str(out),
            "--outtype",
            "f16",
            "--quantize",
            "Q8_0",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:4] == b"GGUF" and (tmp_path / "tiny-q8_0.f16.gguf").is_file()
    assert out.stat().st_size < (tmp_path / "tiny-q8_0.f16.gguf").stat().st_size
    # the quantized model loads and generates in llama.cpp (the wheel's Python bindings)
    code = (
        "import sys, llama_cpp; m = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=128, n_threads=1, verbose=False);"
        "print(m.create_completion('hello', max_tokens=5, temperature=0)['usage']['completion_tokens'])"
    )
    result = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "5"


def test_convert_refuses_a_folder_without_a_checkpoint(tmp_path):
    result = subprocess.run(
        [sys.executable, str(TOOLS / "convert_to_gguf.py"), str(tmp_path), str(tmp_path / "x.gguf")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "a folder without config.json" in result.stderr and "Traceback" not in result.stderr
