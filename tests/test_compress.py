"""`flagscale compress` for real: llm-compressor recipes and GGUF quantization of a tiny random Llama.

Compression runs in issue 14's Hugging Face 5.x venv (tests/multimodal_env.py: transformers 5.17, llmcompressor
0.14) as users run it, `python -m flagscale compress CONF`; GGUF uses the llama.cpp pin's converter and the cpu
backend wheel's llama-quantize / llama-perplexity (tests/llama_cpp_support.py), and the Q8_0 file is served by
`flagscale serve` (llama-server). W8A8 calibrates on the pre-training data (the tiny_gpt corpus, Megatron's
.bin/.idx with the byte tokenizer), W4A16 on the example's JSONL, FP8_DYNAMIC needs no data.
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import REPO_ROOT, real_cache_dir
from llama_cpp_support import backend_env, flagscale, free_port, installed_backend, post, work_root

CONF = REPO_ROOT / "examples" / "tiny_llama" / "conf"
CALIBRATION = CONF / "compress" / "calibration.jsonl"
LLMC = ("w8a8", "w4a16", "fp8_dynamic")
# Relative L2 error of the compressed checkpoint's logits against the source model's (transformers, same input):
# int8 weights+activations ~1.4e-2, fp8 ~6e-2, int4 weights ~0.16 measured on this tiny random model.
LOGITS_TOLERANCE = {"w8a8": 0.05, "fp8_dynamic": 0.15, "w4a16": 0.35}
# The dtype each scheme stores its quantized Linear weights in (compressed-tensors formats).
STORED = {"w8a8": "I8", "w4a16": "I32", "fp8_dynamic": "F8_E4M3"}

CHECK = """
import json, sys, torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM
src, outs = sys.argv[1], sys.argv[2:]
ids = torch.tensor([[1, 5, 77, 300, 12, 9, 400, 33, 250, 100, 3, 17]])
with torch.no_grad():
    ref = AutoModelForCausalLM.from_pretrained(src).eval()(ids).logits
result = {}
for out in outs:
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(ids).logits
        new = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False).shape[1] - ids.shape[1]
    with safe_open(f"{out}/model.safetensors", "pt") as f:
        names = [k for k in f.keys() if k.endswith(("q_proj.weight", "q_proj.weight_packed"))]
        stored = {f.get_slice(k).get_dtype() for k in names}
    result[out] = {
        "rel": float((logits - ref).norm() / ref.norm()),
        "new_tokens": int(new),
        "quant_method": model.config.quantization_config.to_dict()["quant_method"],
        "stored": sorted(stored),
    }
print(json.dumps(result))
"""


@pytest.fixture(scope="session")
def tiny_hf(mm_env, tmp_path_factory):
    """A tiny random Llama made in the transformers 5 venv (hidden 128: W4A16's groups of 128 columns divide)."""
    out = tmp_path_factory.mktemp("compress") / "tiny-hf"
    made = mm_env.run(["python", REPO_ROOT / "tools" / "make_tiny_model.py", out, "--hidden", "128"])
    assert made.returncode == 0, made.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def llama_env():
    """The cpu wheel's tools for llama-quantize/llama-perplexity (FLAGSCALE_LLAMA_CPP_BIN) and serving."""
    site = installed_backend(work_root())
    return {**backend_env(site), "FLAGSCALE_CACHE_DIR": str(real_cache_dir() / "build-cache")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The tiny_gpt pre-training corpus (.bin/.idx made by megatron's builder, byte tokenizer), shared per session."""
    from megatron_env import megatron_env

    return megatron_env(tmp_path_factory).corpus()


def compress(mm_env, tiny_hf, exp_dir, *overrides, **env):
    args = ["python", "-m", "flagscale", "compress", CONF, f"experiment.exp_dir={exp_dir}", *overrides]
    return mm_env.run(args, cwd=REPO_ROOT, TINY_LLAMA_HF=str(tiny_hf), **env)


@pytest.fixture(scope="module")
def llmc_runs(mm_env, tiny_hf, corpus, tmp_path_factory):
    """The three llm-compressor schemes: {scheme: (exp_dir, report)}."""
    runs = {}
    for scheme in LLMC:
        exp_dir = tmp_path_factory.mktemp(scheme)
        extra = []
        if scheme == "w8a8":  # calibrate on the pre-training data; hold out the example's JSONL
            extra = [
                "compress.calibration.jsonl=null",
                f"compress.calibration.data_path={corpus}",
                "compress.calibration.tokenizer=byte",
                f"compress.evaluation.jsonl={CALIBRATION}",
            ]
        result = compress(mm_env, tiny_hf, exp_dir, f"compress={scheme}", *extra)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        assert "perplexity delta" in result.stdout and "size ratio" in result.stdout  # the printed table
        runs[scheme] = (exp_dir, json.loads((exp_dir / f"report-{scheme}.json").read_text()))
    return runs


READ_BACK = """
import json, sys
from flagscale.compress.data import documents
from flagscale.compress.settings import Data
docs = documents(Data(data_path=sys.argv[1], tokenizer="byte"))
print(json.dumps([next(docs) for _ in range(20)]))
"""


@pytest.mark.integration
def test_pretraining_data_reads_back_its_documents(mm_env, corpus):
    """The .bin/.idx reader (no megatron) decodes exactly the texts tools/preprocess_data.py tokenized."""
    result = mm_env.run(["python", "-c", READ_BACK, corpus])
    assert result.returncode == 0, result.stderr[-3000:]
    source = [json.loads(line)["text"] for line in (corpus.parent / "corpus.jsonl").read_text().splitlines()]
    assert json.loads(result.stdout) == source[:20]


@pytest.mark.integration
@pytest.mark.parametrize("scheme", LLMC)
def test_llmcompressor_report(llmc_runs, scheme):
    exp_dir, report = llmc_runs[scheme]
    assert report["scheme"] == scheme.upper() and report["output"] == str(exp_dir / f"tiny-{scheme}")
    size, ppl = report["size"], report["perplexity"]
    assert size["after_bytes"] < 0.6 * size["before_bytes"] and size["ratio"] == pytest.approx(
        size["after_bytes"] / size["before_bytes"], abs=1e-4
    )
    # random weights: perplexity near the 512-token vocabulary, and quantization moves it by well under 5%
    assert 100 < ppl["before"] < 2000 and abs(ppl["delta_pct"]) < 5 and ppl["method"].startswith("transformers")
    assert report["held_out"]["samples"] == 8 and report["held_out"]["tokens"] == 8 * 64
    if scheme == "fp8_dynamic":
        assert report["calibration"] is None  # data-free
    else:
        assert report["calibration"]["samples"] == 16 and report["calibration"]["tokens"] == 16 * 64
    if scheme == "w8a8":
        assert report["calibration"]["source"].endswith("corpus_text_document")
    else:  # the held-out slice starts after the documents calibration used
        assert report["held_out"]["source"] == str(CALIBRATION)


@pytest.mark.integration
def test_transformers_loads_and_runs_each_checkpoint(mm_env, tiny_hf, llmc_runs):
    outs = [str(llmc_runs[s][0] / f"tiny-{s}") for s in LLMC]
    result = mm_env.run(["python", "-c", CHECK, tiny_hf, *outs])
    assert result.returncode == 0, result.stderr[-3000:]
    checked = json.loads(result.stdout.splitlines()[-1])
    for scheme, out in zip(LLMC, outs, strict=True):
        got = checked[out]
        assert got["quant_method"] == "compressed-tensors" and got["new_tokens"] == 4
        assert got["stored"] == [STORED[scheme]], got
        assert got["rel"] < LOGITS_TOLERANCE[scheme], (scheme, got["rel"])


@pytest.mark.integration
def test_gguf_q8_0_and_q4_k_m_then_serve_q8_0(mm_env, tiny_hf, llama_env, tmp_path):
    reports = {}
    for scheme in ("q8_0", "q4_k_m"):
        result = compress(mm_env, tiny_hf, tmp_path, f"compress={scheme}", **llama_env)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        reports[scheme] = json.loads((tmp_path / f"report-{scheme}.json").read_text())
        gguf = tmp_path / f"tiny-{scheme}.gguf"
        assert gguf.read_bytes()[:4] == b"GGUF" and reports[scheme]["size"]["after_bytes"] == gguf.stat().st_size
        ppl = reports[scheme]["perplexity"]
        assert ppl["method"].startswith("llama.cpp llama-perplexity") and abs(ppl["delta_pct"]) < 5
        assert reports[scheme]["held_out"]["chunks"] == 8 and reports[scheme]["held_out"]["seq_len"] == 64
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    q8, q4 = (reports[s]["size"]["after_bytes"] for s in ("q8_0", "q4_k_m"))
    assert q4 < q8 < 0.5 * reports["q8_0"]["size"]["before_bytes"]
    assert reports["q8_0"]["perplexity"]["before"] == reports["q4_k_m"]["perplexity"]["before"]  # same f32 GGUF

    port = free_port()
    serve_dir = tmp_path / "serve"
    args = [
        str(CONF),
        f"experiment.exp_dir={serve_dir}",
        f"experiment.runner.port={port}",
        f"serve.0.engine_args.model={tmp_path / 'tiny-q8_0.gguf'}",
    ]
    env = {k: v for k, v in llama_env.items() if k != "FLAGSCALE_CACHE_DIR"}
    started = flagscale("serve", *args, env=env, cwd=tmp_path)
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        code, body = post(
            f"http://127.0.0.1:{port}/v1/completions",
            {"model": "tiny", "prompt": "Once upon", "max_tokens": 6, "temperature": 0, "ignore_eos": True},
        )
        assert code == 200 and body["usage"]["completion_tokens"] == 6 and body["choices"][0]["text"]
    finally:
        flagscale("serve", *args, "action=stop", env=env, cwd=tmp_path)


def checked_model(folder):
    """A causal LM as far as the config checks read it (they never load weights)."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "tokenizer.json").write_text("{}")
    return folder


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["compress.scheme=W8A9"], "compress.scheme=W8A9: unknown scheme (did you mean W8A8?)"),
        (["compress.model={tmp}/none"], "compress.model={tmp}/none: no such folder"),
        (["compress.model={tmp}/encoder"], "not a causal LM (architectures: BertModel)"),
        (["compress.calibration.jsonl={tmp}/empty.jsonl"], "the set is empty"),
        ([], "flagscale compress needs llmcompressor, missing for"),  # the test venv has transformers 4.57 only
    ],
    ids=["unknown-scheme", "missing-model", "not-causal-lm", "empty-calibration", "no-llmcompressor"],
)
def test_bad_config_is_one_line_and_writes_nothing(tmp_path, overrides, message):
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    (tmp_path / "empty.jsonl").write_text('\n{"text": "  "}\n')
    model = checked_model(tmp_path / "model")
    exp_dir = tmp_path / "run"
    args = ["compress", str(CONF), f"experiment.exp_dir={exp_dir}", *(o.format(tmp=tmp_path) for o in overrides)]
    result = flagscale(*args, env={"TINY_LLAMA_HF": str(model)}, cwd=REPO_ROOT)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message.format(tmp=tmp_path) in lines[0], lines
    assert not exp_dir.exists() and sorted(os.listdir(tmp_path)) == ["empty.jsonl", "encoder", "model"]


def settings_of(tmp_path, *overrides):
    from flagscale.compress.settings import from_config
    from flagscale.runner.config import compose

    model = tmp_path / "model" if (tmp_path / "model").exists() else checked_model(tmp_path / "model")
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)  # the example's calibration path is relative to the checkout, as for a user there
    try:
        return from_config(
            compose(CONF, "compress", [f"compress.model={model}", f"experiment.exp_dir={tmp_path}", *overrides])
        )
    finally:
        os.chdir(cwd)


def test_settings_resolve_scheme_output_and_held_out_slice(tmp_path):
    s = settings_of(tmp_path, "compress=q4_k_m", "compress.scheme=q4-k-m", "compress.output=null")
    assert (s.scheme, s.tool) == ("Q4_K_M", "gguf") and s.output == str(tmp_path / "model-q4_k_m.gguf")
    assert s.held_out and s.evaluation.jsonl == s.calibration.jsonl == str(CALIBRATION)
    assert (s.evaluation.num_samples, s.evaluation.seq_len) == (8, 64)
    s = settings_of(
        tmp_path, "compress=fp8_dynamic", "compress.calibration.jsonl=null", f"compress.evaluation.jsonl={CALIBRATION}"
    )
    assert s.calibration is None and not s.held_out and s.output == str(tmp_path / "tiny-fp8_dynamic")
    s = settings_of(tmp_path, "compress.report=null", "compress.output=null")
    assert s.report == str(tmp_path / "report.json") and s.output == str(tmp_path / "model-w8a8")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["compress.calibration.jsonl=null"],
            "W8A8 calibrates on data; give calibration.jsonl or calibration.data_path",
        ),
        (["compress=q8_0", "compress.output=x.bin"], "a GGUF scheme writes one file; name it *.gguf"),
        (["compress.output=x.gguf"], "W8A8 writes a checkpoint folder, not a .gguf file"),
        (["compress.calibration.data_path={tmp}/none"], "give jsonl or data_path, not both"),
        (["compress.calibration.jsonl=null", "compress.calibration.data_path={tmp}/none"], "none.bin does not exist"),
        (["compress.calibration.seq_len=4"], "compress.calibration.seq_len=4: expected a number >= 8"),
        (["compress.recipe.ignroe=[]"], "did you mean"),
    ],
)
def test_settings_refuse(tmp_path, overrides, message):
    from flagscale.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        settings_of(tmp_path, *(o.format(tmp=tmp_path) for o in overrides))
    assert message.format(tmp=tmp_path) in str(caught.value)
