"""Train -> serve in one pipeline, all real: a tiny Llama made offline (random weights, a SentencePiece
tokenizer trained offline by tools/make_tiny_model.py) trains with `flagscale train` starting from its HF
folder (`train.system.checkpoint.hf_model`), is exported with `flagscale checkpoint export`, loads in
`transformers` with the loss megatron.core computes on a held-out batch (within 1e-4), and `flagscale serve`
(llama.cpp) given the exported folder converts it to GGUF itself and answers the greedy 16-token completion
`transformers`' `generate` makes, token for token. The GGUF is cached by content: a second serve converts
nothing, a changed weight file converts again.

The corpus repeats one story, and the run uses a high learning rate: the trained model's greedy choices are
well separated (random tiny models have near-tied logits that fp32 rounding could flip).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

import torch  # noqa: E402
from llama_cpp_support import (  # noqa: E402
    REPO_ROOT,
    backend_env,
    flagscale,
    free_port,
    installed_backend,
    post,
    real_cache_dir,
    work_root,
)

sys.path.insert(0, str(REPO_ROOT / "tools"))
import make_tiny_model  # noqa: E402

HELPER = REPO_ROOT / "tests" / "megatron_cpu" / "logits_of_checkpoint.py"
SERVE_CONF = REPO_ROOT / "examples" / "tiny_llama" / "conf"
TRAIN_ITERS = 200
SEQ = 64
NEW_TOKENS = 16
LOSS_TOLERANCE = 1e-4
TRAIN_YAML = """
defaults:
  - _self_
  - train: hf
experiment:
  exp_name: train_to_serve
  exp_dir: {exp}
  runner: {{nproc_per_node: 1, foreground: true}}
  envs: {{OMP_NUM_THREADS: 1, PYTHONWARNINGS: ignore}}
action: run
"""
TASK_YAML = """
system:
  precision: fp32
  deterministic: true
  checkpoint: {{hf_model: {hf}, save: {exp}/checkpoints}}
model:
  seq_length: {seq}
  micro_batch_size: 4
  global_batch_size: 8
  train_iters: {iters}
  optimizer: {{name: adam, lr: 0.01, min_lr: 0.001, warmup_iters: 2, decay_style: cosine}}
data:
  data_path: {data}
  split: 100,0,0
"""


# ------------------------------------------------------------------ fast: no megatron, no llama.cpp
def test_hf_model_takes_the_architecture_and_tokenizer_from_config_json(hf_model):
    from flagscale.train import hf_start
    from flagscale.train.settings import train_settings

    raw = {
        "system": {"checkpoint": {"hf_model": str(hf_model)}},
        "model": {"seq_length": 32, "num_layers": 2, "norm_epsilon": 1e-5},  # agreeing keys may stay
        "data": {"data_path": "x"},
    }
    merged = hf_start.merge(raw)
    t = train_settings(merged)
    m = t.model
    assert (m.family, m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups) == ("llama", 2, 64, 4, 2)
    assert (m.ffn_hidden_size, m.vocab_size, m.seq_length, m.share_embeddings_and_output_weights) == (
        128,
        512,
        32,
        False,
    )
    assert t.data.tokenizer.type == "hf" and t.data.tokenizer.path == str(hf_model)
    assert hf_start.merge({"model": {"hidden_size": 8}}) == {"model": {"hidden_size": 8}}  # no hf_model: unchanged


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"model": {"hidden_size": 128, "num_layers": 3}},
            "train.model: num_layers=3 (config.json: 2), hidden_size=128",
        ),
        ({"data": {"tokenizer": {"type": "byte"}}}, "train.data.tokenizer.type=byte: "),
        ({"system": {"checkpoint": {"load": "ckpt"}}}, "train.system.checkpoint: set load or hf_model, not both"),
    ],
)
def test_hf_model_refuses_what_contradicts_the_folder(hf_model, changes, message):
    from flagscale.errors import ConfigError
    from flagscale.train import hf_start
    from flagscale.train.settings import train_settings

    raw = {"system": {"checkpoint": {"hf_model": str(hf_model)}}, "data": {"data_path": "x"}}
    for part, values in changes.items():
        raw[part] = {**raw.get(part, {}), **values}
        if part == "system":
            raw["system"]["checkpoint"] = {**values["checkpoint"], "hf_model": str(hf_model)}
    with pytest.raises(ConfigError) as caught:
        train_settings(hf_start.merge(raw))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_content_hash_follows_the_bytes_not_the_path(hf_model, tmp_path):
    from flagscale.checkpoint.fingerprint import content_hash

    copy = tmp_path / "copy"
    copy.mkdir()
    for f in hf_model.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    (copy / "README.md").write_text("not part of the model")
    assert content_hash(copy) == content_hash(hf_model)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(data))
    assert content_hash(copy) != content_hash(hf_model)
    (copy / "tokenizer.model").unlink()
    assert content_hash(copy) != content_hash(hf_model)


def test_gguf_checks_the_folder_and_picks_the_source_dtype(hf_model, tmp_path):
    from flagscale.errors import ConfigError
    from flagscale.serve import gguf

    gguf.check_folder(hf_model, "m")
    assert gguf.outtype_of(hf_model, gguf.Options()) == "f32"  # make_tiny_model saves fp32
    assert gguf.outtype_of(hf_model, gguf.Options(outtype="q8_0")) == "q8_0"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ConfigError, match="no weight files"):
        gguf.check_folder(bad, "m")
    (bad / "config.json").write_text("{")
    with pytest.raises(ConfigError, match="config.json is not JSON"):
        gguf.check_folder(bad, "m")


# ----------------------------------------------------------------------------------------- integration
def story() -> str:
    """One fixed ~150-token text: the whole corpus repeats it."""
    return " ".join(make_tiny_model.corpus(seed=1, lines=12))


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    from megatron_env import megatron_env

    return megatron_env(tmp_path_factory)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A fresh flagscale cache (GGUFs, imports) that reuses the test cache's llama.cpp source and patched trees."""
    root = tmp_path_factory.mktemp("flagscale-cache")
    build = real_cache_dir() / "build-cache"
    for kind in ("sdists", "sources", "trees"):
        (build / kind).mkdir(parents=True, exist_ok=True)
        (root / kind).symlink_to(build / kind)
    return root


def _env(venv, cache: Path) -> dict[str, str]:
    from megatron_env import run_env

    return {**run_env(), "FLAGSCALE_CACHE_DIR": str(cache)}


def _run(args: list, env: dict, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> Path:
    return make_tiny_model.make(tmp_path_factory.mktemp("models") / "tiny-llama-hf", seed=0)


@pytest.fixture(scope="module")
def trained(venv, cache, hf_model) -> dict:
    """`flagscale train` from the HF folder, then `flagscale checkpoint export` of its checkpoint."""
    work, env = venv.work, _env(venv, cache)
    text = work / "story.txt"
    text.write_text("\n".join([story()] * 64) + "\n")
    data = work / "data" / "story"
    made = _run(
        [venv.python, REPO_ROOT / "tools/preprocess_data.py", "--input", text, "--output-prefix", data]
        + ["--tokenizer", "hf", "--tokenizer-path", hf_model],
        env,
        work,
    )
    assert made.returncode == 0, made.stderr[-3000:]
    exp, conf = work / "train", work / "conf"
    (conf / "train").mkdir(parents=True)
    (conf / "train.yaml").write_text(TRAIN_YAML.format(exp=exp))
    (conf / "train" / "hf.yaml").write_text(
        TASK_YAML.format(hf=hf_model, exp=exp, seq=SEQ, iters=TRAIN_ITERS, data=data)
    )
    start = time.perf_counter()
    result = _run([venv.flagscale, "train", conf], env, work)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "importing it at TP=1 PP=1 into the flagscale cache" in result.stderr
    assert "finetuning from the model weights of" in result.stdout
    curve = [json.loads(line)["loss"] for line in (exp / "logs" / "metrics.jsonl").read_text().splitlines()]
    export = work / "exported"
    exported = _run([venv.flagscale, "checkpoint", "export", exp / "checkpoints", export], env, work)
    assert exported.returncode == 0, exported.stdout[-3000:] + exported.stderr[-3000:]
    return {"conf": conf, "exp": exp, "curve": curve, "export": export, "seconds": seconds, "env": env}


@pytest.mark.integration
def test_training_from_the_hf_folder_lowers_the_loss_and_reuses_its_import(venv, trained):
    curve = trained["curve"]
    print(f"\ntrained from the HF folder in {trained['seconds']:.0f} s: loss {curve[0]:.3f} -> {curve[-1]:.3f}")
    assert len(curve) == TRAIN_ITERS and curve[-1] < 0.5 * curve[0]
    dry = _run([venv.flagscale, "train", trained["conf"], "action=dryrun"], trained["env"], venv.work)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert re.search(r"# starts from .*tiny-llama-hf: its import .*hf-imports/\w+/checkpoint \(cached\)", dry.stdout)
    assert "llama, vocabulary 512, TP=1 PP=1" in dry.stdout  # the architecture and vocabulary of config.json


@pytest.mark.integration
def test_conflicting_model_settings_and_a_foreign_folder_are_refused(venv, trained, hf_model, tmp_path):
    conflict = _run(
        [venv.flagscale, "train", trained["conf"], "action=dryrun", "++train.model.hidden_size=128"],
        trained["env"],
        venv.work,
    )
    assert conflict.returncode != 0
    assert f"train.model: hidden_size=128 (config.json: 64) disagree with {hf_model}/config.json" in conflict.stderr
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "hidden_size": 8}))
    foreign = _run(
        [venv.flagscale, "train", trained["conf"], "action=dryrun", f"train.system.checkpoint.hf_model={tmp_path}"],
        trained["env"],
        venv.work,
    )
    assert foreign.returncode != 0 and "architecture BertModel is not supported" in foreign.stderr
    assert "Traceback" not in conflict.stderr + foreign.stderr


def _held_out(hf_model: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_model, local_files_only=True)
    ids = tokenizer.encode(" ".join(make_tiny_model.corpus(seed=5, lines=40)), add_special_tokens=False)
    return [ids[:SEQ], ids[SEQ : 2 * SEQ]]


@pytest.mark.integration
def test_the_export_loads_in_transformers_with_megatrons_loss(venv, trained, hf_model):
    from transformers import AutoModelForCausalLM

    batch = _held_out(hf_model)
    tokens, out = venv.work / "held_out.json", venv.work / "held_out_logits.pt"
    tokens.write_text(json.dumps(batch))
    result = _run([venv.python, HELPER, trained["exp"] / "checkpoints", tokens, out], trained["env"], venv.work)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ids = torch.tensor(batch)
    ours = torch.load(out)
    megatron_loss = torch.nn.functional.cross_entropy(ours[:, :-1].reshape(-1, ours.shape[-1]), ids[:, 1:].reshape(-1))
    model = AutoModelForCausalLM.from_pretrained(trained["export"], dtype=torch.float32).eval()
    with torch.no_grad():
        output = model(ids, labels=ids)
    diff = abs(output.loss.item() - megatron_loss.item())
    logit_diff = (output.logits - ours).abs().max().item()
    print(
        f"\nheld-out loss: transformers {output.loss.item():.6f}, megatron {megatron_loss.item():.6f}, "
        f"|diff| {diff:.1e} (max abs logit diff {logit_diff:.1e})"
    )
    assert type(model).__name__ == "LlamaForCausalLM"
    assert diff <= LOSS_TOLERANCE


# ----------------------------------------------------------------------------------------------- serve
@pytest.fixture(scope="module")
def serve_env(cache) -> dict[str, str]:
    site = installed_backend(work_root())
    return {**backend_env(site), "FLAGSCALE_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _serve(model: Path, env: dict, run_dir: Path) -> tuple[subprocess.CompletedProcess, int, float]:
    port = free_port()
    args = [f"experiment.exp_dir={run_dir}", f"experiment.runner.port={port}", f"serve.0.engine_args.model={model}"]
    start = time.perf_counter()
    result = flagscale("serve", str(SERVE_CONF), *args, env=env, cwd=run_dir.parent)
    return result, port, time.perf_counter() - start


def _stop(env: dict, run_dir: Path) -> None:
    flagscale("serve", str(SERVE_CONF), f"experiment.exp_dir={run_dir}", "action=stop", env=env, cwd=run_dir.parent)


@pytest.fixture(scope="module")
def served(trained, serve_env, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("serve") / "first"
    result, port, seconds = _serve(trained["export"], serve_env, run_dir)
    try:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        yield {"url": f"http://127.0.0.1:{port}", "result": result, "seconds": seconds}
    finally:
        _stop(serve_env, run_dir)


@pytest.mark.integration
def test_serve_converts_the_exported_folder_and_completes_as_transformers(trained, served, hf_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stderr = served["result"].stderr
    assert f"converting {trained['export']} to GGUF (f32)" in stderr, stderr[-3000:]
    converted = re.search(r"converted .* in ([0-9.]+) s: (.*model\.gguf)", stderr)
    assert converted and Path(converted.group(2)).read_bytes()[:4] == b"GGUF"
    tokenizer = AutoTokenizer.from_pretrained(trained["export"], local_files_only=True)
    prompt = tokenizer.encode(story(), add_special_tokens=False)[:8]
    model = AutoModelForCausalLM.from_pretrained(trained["export"], dtype=torch.float32).eval()
    with torch.no_grad():
        generated = model.generate(
            torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )[0, len(prompt) :].tolist()
        logits = model(torch.tensor([prompt + generated])).logits[0, len(prompt) - 1 : -1]
    top2 = logits.topk(2).values
    margin = (top2[:, 0] - top2[:, 1]).min().item()
    code, body = post(
        served["url"] + "/v1/completions",
        {"model": "tiny", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "n_probs": 1},
    )
    assert code == 200, body
    served_ids = [entry["id"] for entry in body["choices"][0]["logprobs"]["content"]]
    print(
        f"\nGGUF conversion {float(converted.group(1)):.1f} s (serve up in {served['seconds']:.1f} s); greedy "
        f"{NEW_TOKENS} tokens (smallest top-1 margin {margin:.2f}): {served_ids}"
    )
    assert len(generated) == NEW_TOKENS and margin > 0.05
    assert served_ids == generated


@pytest.mark.integration
def test_a_second_serve_hits_the_gguf_cache_and_a_changed_weight_converts_again(trained, served, serve_env, tmp_path):
    again, port, seconds = _serve(trained["export"], serve_env, tmp_path / "again")
    try:
        assert again.returncode == 0, again.stderr[-3000:]
        assert "using the cached GGUF" in again.stderr and "converting" not in again.stderr
        code, _ = post(f"http://127.0.0.1:{port}/v1/completions", {"prompt": [1, 5], "max_tokens": 2})
        assert code == 200
    finally:
        _stop(serve_env, tmp_path / "again")
    print(f"\nsecond serve of the same folder: cache hit, up in {seconds:.1f} s")
    changed = tmp_path / "changed"
    changed.mkdir()
    for f in trained["export"].iterdir():
        (changed / f.name).write_bytes(f.read_bytes())
    from safetensors.torch import load_file, save_file

    weights = load_file(changed / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.5
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    # two servers of the changed folder start at once: one converts, the other waits for it (or finds it done)
    runs = [tmp_path / "third", tmp_path / "fourth"]
    starts = [_start_serve(changed, serve_env, run) for run in runs]
    try:
        results = [(p.wait(timeout=300), p.stderr.read()) for p in starts]
    finally:
        for run in runs:
            _stop(serve_env, run)
    assert all(code == 0 for code, _ in results), [err[-2000:] for _, err in results]
    converted = [err for _, err in results if re.search(r"^converted .* in [0-9.]+ s", err, re.M)]
    assert len(converted) == 1 and f"converting {changed} to GGUF" in converted[0]
    other = next(err for _, err in results if err is not converted[0])
    assert "another process converted" in other or "using the cached GGUF" in other, other[-2000:]


def _start_serve(model: Path, env: dict, run_dir: Path) -> subprocess.Popen:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    args = [
        f"experiment.exp_dir={run_dir}",
        f"experiment.runner.port={free_port()}",
        f"serve.0.engine_args.model={model}",
    ]
    return subprocess.Popen(
        [sys.executable, "-m", "flagscale.cli", "serve", str(SERVE_CONF), *args],
        env={**os.environ, **env},
        cwd=run_dir.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.integration
def test_a_folder_that_is_not_a_model_is_refused_with_one_line(serve_env, tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    result, _, _ = _serve(tmp_path, serve_env, tmp_path / "run")
    assert result.returncode == 2
    assert f"serve[0].engine_args.model={tmp_path}: a folder without config.json" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "pids").exists()
