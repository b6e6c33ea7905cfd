"""The Hugging Face <-> Megatron checkpoint bridge (flagscale/checkpoint/): tiny random-weight HF models of every
family, built offline from transformers' config classes (hidden 64, 4 layers, GQA, vocabulary 300, fp32).

Without megatron (the test process): the tensor maps (every TP rank's rows, and fill/scatter undoing each other),
config.json <-> settings, and bad input refused with one line before anything is written.

With the patched megatron-core (integration, the venv of tests/megatron_env.py), for real under torchrun and gloo:
* numerical equivalence: an imported model's logits in megatron.core equal transformers' on the same batch
  (fp32, max abs diff <= 1e-4) at TP=1 and TP=2;
* round trip: HF -> Megatron (TP=2, PP=2) -> HF gives every tensor bit-identical and the same config.json, and
  export from a TP=1 import equals export from a TP=2 one, byte for byte;
* `flagscale train` starts from an import (finetune), and its checkpoint exports to a folder transformers loads;
* a failing conversion leaves nothing behind.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("safetensors")
pytest.importorskip("transformers")

import torch  # noqa: E402

from flagscale.checkpoint import bridge, hf, mapping  # noqa: E402
from flagscale.errors import ConfigError  # noqa: E402

FAMILIES = ("llama", "qwen2", "qwen3")
VOCAB = 300
TOLERANCE = 1e-4  # max abs logit difference, fp32
SEQ = 200  # positions far enough for Llama 3 RoPE scaling (low frequencies) to change the logits
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


# ----------------------------------------------------------------------------------- tiny HF models
def hf_config(family: str, **changes):
    """The tiny model of a family: llama with Llama 3 RoPE scaling, qwen2 with tied embeddings and qkv biases,
    qwen3 with QK-norm and a head dim (32) that is not hidden / heads (16)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        initializer_range=0.1,  # larger than real models: logits of a few units, so a wrong row shows
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "llama":
        config = LlamaConfig(**common, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)
    elif family == "qwen2":
        config = Qwen2Config(**{**common, "tie_word_embeddings": True}, rope_theta=1000000.0)
    else:
        config = Qwen3Config(**common, head_dim=32, rope_theta=1000000.0)
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def config_json(family: str, **changes) -> dict:
    """The tiny model's config.json as save_pretrained writes it."""
    return {**hf_config(family).to_dict(), "architectures": [hf.HF_NAMES[family][0]], **changes}


def save_tiny(family: str, folder: Path, seed: int = 0, shard: str = "5GB", **changes) -> Path:
    """A random-weight model saved with save_pretrained (norms and biases random too, so a swapped one shows)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, **changes), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder, max_shard_size=shard)
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 256}\n')  # a file export copies back
    return folder


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118 (safe_open has no __iter__)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """One tiny model per family; qwen3's in 10 shards with an index (save_pretrained's max_shard_size)."""
    base = tmp_path_factory.mktemp("hf")
    return {f: save_tiny(f, base / f, shard="100KB" if f == "qwen3" else "5GB") for f in FAMILIES}


def arch_of(family: str) -> tuple[dict, int]:
    settings = hf.model_settings(config_json(family), family, "config.json")
    from flagscale.settings import convert
    from flagscale.train import families
    from flagscale.train.settings import ModelSettings

    return families.architecture(convert(ModelSettings, settings, "t")), settings["vocab_size"]


# ------------------------------------------------------------------------------------- tensor maps
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tp", [1, 2])
def test_every_rank_holds_what_megatron_shards_it(family, tp):
    """Filling each TP rank from its pieces gives the TP=1 tensor split the way megatron.core splits it:
    column-parallel rows (qkv by whole query groups; fc1 as [gate part; up part]), row-parallel columns,
    vocab-parallel rows of the padded vocabulary, replicated norms."""
    arch, vocab = arch_of(family)
    padded = 384
    shapes = mapping.hf_shapes(arch, vocab)
    torch.manual_seed(0)
    source = {name: torch.randn(shape) for name, shape in shapes.items()}

    def read(piece, dim):
        return source[piece.source].narrow(dim, piece.start, piece.size)

    for tmap in mapping.model_maps(arch, vocab, padded, 0, arch["num_layers"], True, True):
        whole_pieces = tmap.shard(0, 1)
        rows = sum(p.size for p in whole_pieces)
        other = next(source[p.source] for p in whole_pieces if p.source).shape
        shape = list(other)
        shape[tmap.dim] = rows
        whole = torch.empty(shape)
        mapping.fill(whole, whole_pieces, tmap.dim, read)
        if not tmap.parallel:
            assert tmap.shard(1, tp) == whole_pieces
            continue
        parts = []
        for rank in range(tp):
            pieces = tmap.shard(rank, tp)
            shape[tmap.dim] = rows // tp
            part = torch.empty(shape)
            mapping.fill(part, pieces, tmap.dim, read)
            parts.append(part)
        if tmap.megatron.endswith("linear_fc1.weight"):  # [gate; up], each split: rank r = [gate_r; up_r]
            gate, up = whole.chunk(2)
            expected = [torch.cat([g, u]) for g, u in zip(gate.chunk(tp), up.chunk(tp), strict=True)]
        else:
            expected = list(whole.chunk(tp, dim=tmap.dim))
        assert all(torch.equal(a, b) for a, b in zip(parts, expected, strict=True)), tmap.megatron


def test_qkv_is_laid_out_by_query_group():
    """Megatron's fused QKV: per query group, its query heads, then its key head, then its value head."""
    arch, _ = arch_of("llama")  # 4 heads, 2 groups, head dim 16
    (qkv,) = [m for m in mapping.layer_maps(mapping.Sizes.of(arch), 3, 1) if m.megatron.endswith("linear_qkv.weight")]
    assert qkv.megatron == "decoder.layers.1.self_attention.linear_qkv.weight"
    names = [(p.source.rsplit(".", 2)[-2], p.start, p.stop) for p in qkv.shard(0, 1)]
    assert names == [("q_proj", 0, 32), ("k_proj", 0, 16), ("v_proj", 0, 16)] + [
        ("q_proj", 32, 64),
        ("k_proj", 16, 32),
        ("v_proj", 16, 32),
    ]
    assert {p.source.split(".")[2] for p in qkv.shard(0, 1)} == {"3"}  # HF layer 3 is this stage's layer 1


@pytest.mark.parametrize("family", FAMILIES)
def test_scatter_undoes_fill(family):
    arch, vocab = arch_of(family)
    shapes = mapping.hf_shapes(arch, vocab)
    torch.manual_seed(1)
    source = {name: torch.randn(shape) for name, shape in shapes.items()}
    back = {name: torch.full(shape, math.nan) for name, shape in shapes.items()}
    covered: dict[str, int] = {}
    for tmap in mapping.model_maps(arch, vocab, 320, 0, arch["num_layers"], True, True):
        pieces = tmap.shard(0, 1)
        shape = list(next(source[p.source] for p in pieces if p.source).shape)
        shape[tmap.dim] = sum(p.size for p in pieces)
        megatron = torch.empty(shape)
        mapping.fill(megatron, pieces, tmap.dim, lambda p, d: source[p.source].narrow(d, p.start, p.size))
        if tmap.megatron.endswith("word_embeddings.weight") or tmap.megatron == "output_layer.weight":
            assert megatron[vocab:].abs().sum() == 0 and megatron.shape[0] == 320  # zero padding rows
        mapping.scatter(megatron, pieces, tmap.dim, back, covered)
    assert all(torch.equal(source[n], back[n]) for n in shapes)
    assert ("lm_head.weight" in shapes) is (family != "qwen2")  # qwen2's tiny model ties it


# ------------------------------------------------------------------------------------- config.json
@pytest.mark.parametrize("family", FAMILIES)
def test_config_json_survives_settings_and_back(family):
    config = config_json(family)
    settings = hf.model_settings(config, family, "config.json")
    arch, vocab = arch_of(family)
    info = {"architecture": arch, "vocab_size": vocab, "hf": {"config": config}}
    assert hf.hf_config(info) == config
    assert settings["num_query_groups"] == 2 and settings["kv_channels"] == (32 if family == "qwen3" else 16)
    assert settings["rotary_scaling_factor"] == (8.0 if family == "llama" else None)
    assert settings["share_embeddings_and_output_weights"] is (family == "qwen2")
    # without a recorded source: a config.json transformers reads back to the same architecture
    from transformers import AutoConfig

    fresh = hf.hf_config({"architecture": arch, "vocab_size": vocab, "max_position_embeddings": 256})
    back = AutoConfig.for_model(**fresh).to_dict()
    assert hf.model_settings(back, family, "config.json") == settings


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"architectures": ["MistralForCausalLM"]}, "architecture MistralForCausalLM is not supported; supported: "),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        ({"attention_bias": True}, "attention_bias=true"),
        ({"mlp_bias": True}, "mlp_bias=true is not supported"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling .* is not supported"),
        ({"rope_scaling": {**LLAMA3_SCALING, "high_freq_factor": 2.0}}, "high_freq_factor 4"),
        ({"num_hidden_layers": 0}, "num_hidden_layers=0, expected a positive integer"),
    ],
)
def test_unsupported_configs_are_refused(changes, message):
    config = config_json("llama", **changes)
    with pytest.raises(ConfigError, match=message):
        hf.model_settings(config, hf.family_of(config, "config.json"), "config.json")


def test_family_option_imports_a_renamed_architecture():
    config = config_json("llama", architectures=["MyLlama"])
    assert hf.family_of(config, "c", "llama") == "llama"
    with pytest.raises(ConfigError, match="--family gemma: use one of llama, qwen2, qwen3"):
        hf.family_of(config, "c", "gemma")


# ---------------------------------------------------------------- bad input: one line, nothing written
def _refused(tmp_path: Path, hf_dir: Path, message: str, **kwargs) -> None:
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=message):
        bridge.import_checkpoint(hf_dir, out, **kwargs)
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_import_refuses_an_unsupported_architecture(tmp_path):
    src = save_tiny("llama", tmp_path / "hf")
    (src / "config.json").write_text(json.dumps(config_json("llama", architectures=["GPTNeoXForCausalLM"])))
    _refused(tmp_path, src, r"GPTNeoXForCausalLM is not supported; supported: LlamaForCausalLM \(llama\), Qwen2")


def test_import_refuses_shapes_that_disagree_with_config_json(tmp_path):
    src = save_tiny("llama", tmp_path / "hf")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    shape = r"model.layers.0.mlp.gate_proj.weight has shape \[96, 64\], config.json implies \[128, 64\]"
    _refused(tmp_path, src, shape)


def test_import_refuses_a_missing_shard(tmp_path):
    src = save_tiny("qwen3", tmp_path / "hf", shard="100KB")
    (src / "model-00003-of-00010.safetensors").unlink()
    _refused(tmp_path, src, "names the shard model-00003-of-00010.safetensors, which is missing")


def test_import_refuses_a_missing_tensor_and_a_stray_one(tmp_path):
    from safetensors.torch import save_file

    src = save_tiny("llama", tmp_path / "hf")
    weights = tensors_of(src)
    save_file({k: v for k, v in weights.items() if k != "model.norm.weight"}, str(src / "model.safetensors"))
    _refused(tmp_path, src, "no tensor model.norm.weight, which a llama model as config.json describes it has")
    save_file({**weights, "model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}, str(src / "model.safetensors"))
    _refused(tmp_path, src, "o_proj.bias is not part of a llama model as config.json describes it")


@pytest.mark.parametrize(
    "family, layout, message",
    [
        ("llama", {"tp": 3}, "--tp 3 does not divide num_attention_heads=4 of the model"),
        ("llama", {"tp": 4}, "--tp 4 does not divide num_key_value_heads=2 of the model"),
        ("llama", {"pp": 3}, "--pp 3 does not divide num_hidden_layers=4 of the model"),
    ],
)
def test_import_refuses_a_layout_that_does_not_divide_the_model(tmp_path, family, layout, message):
    _refused(tmp_path, save_tiny(family, tmp_path / "hf"), message, **layout)


def test_import_refuses_a_folder_that_is_not_a_model_and_a_used_destination(tmp_path):
    _refused(tmp_path, tmp_path / "nowhere", "no such folder")
    (tmp_path / "empty").mkdir()
    _refused(tmp_path, tmp_path / "empty", "no config.json")
    src = save_tiny("llama", tmp_path / "hf")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    _refused(tmp_path, src, "model.safetensors: truncated: its header describes 647424 bytes of tensors")
    (src / "model.safetensors").write_bytes(b"not a safetensors file")
    _refused(tmp_path, src, "model.safetensors: not a safetensors file")
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep").write_text("mine")
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        bridge.import_checkpoint(save_tiny("llama", tmp_path / "hf2"), used)
    assert [p.name for p in used.iterdir()] == ["keep"]


def test_export_refuses_a_folder_without_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="no such folder"):
        bridge.export_checkpoint(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ConfigError, match="no checkpoint there"):
        bridge.export_checkpoint(tmp_path / "ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ with megatron.core (integration)
HELPER = Path(__file__).parent / "megatron_cpu" / "logits_of_checkpoint.py"
CONVERT = """
import sys
from pathlib import Path
from flagscale.checkpoint import bridge
from flagscale.errors import reported
action, source, out, *rest = sys.argv[1:]
with reported():
    if action == "import":
        tp, pp, ep = [*map(int, rest), 1][:3]  # EP: the MoE families' (tests/test_checkpoint_moe.py)
        bridge.import_checkpoint(Path(source), Path(out), tp=tp, pp=pp, ep=ep)
    else:
        bridge.export_checkpoint(Path(source), Path(out), max_shard_size=int(rest[0]))
"""


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    from megatron_env import megatron_env

    return megatron_env(tmp_path_factory)


@pytest.fixture(scope="module")
def imports(venv, models):
    """Imported checkpoints by (family, TP, PP), made once per module."""
    made: dict[tuple[str, int, int], Path] = {}

    def get(family: str, tp: int, pp: int) -> Path:
        key = (family, tp, pp)
        if key not in made:
            out = venv.work / "imports" / f"{family}-tp{tp}-pp{pp}"
            result = venv.run(
                [venv.python, "-c", CONVERT, "import", models[family], out, tp, pp], label=f"import {key}"
            )
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            made[key] = out
        return made[key]

    return get


def export(venv, ckpt: Path, out: Path, max_shard_size: int = 5 * 10**9) -> Path:
    result = venv.run([venv.python, "-c", CONVERT, "export", ckpt, out, max_shard_size], label=f"export {ckpt.name}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


# The layout the round trip goes through: TP=2, PP=2 (qwen2's tied output layer is a copy on the last stage).
ROUND_TRIP = (2, 2)


@pytest.fixture(scope="module")
def batch(venv) -> Path:
    torch.manual_seed(7)
    path = venv.work / "tokens.json"
    path.write_text(json.dumps(torch.randint(0, VOCAB, (2, SEQ)).tolist()))
    return path


def hf_logits(folder: Path, tokens: Path, **changes) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **changes).eval()
    with torch.no_grad():
        return model(torch.tensor(json.loads(tokens.read_text()))).logits


@pytest.mark.integration
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tp", [1, 2])
def test_imported_model_computes_transformers_logits(venv, models, imports, batch, family, tp):
    """TP=1: a TP=1 import; TP=2 (2 processes): the round-trip import (TP=2, PP=2), loaded at TP=2, PP=1, which
    distributed checkpointing reshards."""
    ckpt = imports(family, 1, 1) if tp == 1 else imports(family, *ROUND_TRIP)
    out = venv.work / f"logits-{family}-tp{tp}.pt"
    args = [ckpt, batch, out, "--tp", tp]
    result = venv.run([venv.python, HELPER, *args]) if tp == 1 else venv.torchrun(tp, HELPER, *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ours, theirs = torch.load(out), hf_logits(models[family], batch)
    diff = (ours - theirs).abs().max().item()
    print(f"\n{family} TP={tp}: max abs logit diff {diff:.2e} (logits up to {theirs.abs().max().item():.2f})")
    assert ours.shape == theirs.shape == (2, SEQ, VOCAB)
    assert theirs.std() > 0.5  # logits that tell rows apart: a misplaced row would show
    assert diff <= TOLERANCE
    if family == "llama":  # the comparison would see RoPE scaling missing
        unscaled = (ours - hf_logits(models[family], batch, rope_scaling=None)).abs().max().item()
        assert unscaled > 100 * TOLERANCE, unscaled


@pytest.mark.integration
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_identical(venv, models, imports, family):
    tp, pp = ROUND_TRIP
    ckpt = imports(family, tp, pp)
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    assert (ckpt / "iter_0000000" / "metadata.json").is_file() and (ckpt / "flagscale_model.yaml").is_file()
    back = export(venv, ckpt, venv.work / "exports" / f"{family}-tp{tp}-pp{pp}", max_shard_size=300_000)
    source, result = tensors_of(models[family]), tensors_of(back)
    assert sorted(source) == sorted(result)
    different = [n for n in source if not (source[n].dtype == result[n].dtype and torch.equal(source[n], result[n]))]
    assert not different, different
    assert json.loads((back / "config.json").read_text()) == json.loads((models[family] / "config.json").read_text())
    assert (back / "model.safetensors.index.json").is_file() and len(list(back.glob("model-*.safetensors"))) > 1
    assert (back / "tokenizer_config.json").read_text() == (models[family] / "tokenizer_config.json").read_text()
    assert (back / "generation_config.json").is_file()
    print(f"\n{family}: {len(source)} tensors bit-identical after HF -> TP={tp} PP={pp} -> HF")


@pytest.mark.integration
@pytest.mark.parametrize("family", FAMILIES)
def test_export_does_not_depend_on_the_layout(venv, imports, family):
    one = export(venv, imports(family, 1, 1), venv.work / "exports" / f"{family}-tp1")
    two = export(venv, imports(family, *ROUND_TRIP), venv.work / "exports" / f"{family}-tp2-whole")
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())
    assert all((one / n).read_bytes() == (two / n).read_bytes() for n in names), names


# A shard vanishes after the checks passed (as if deleted meanwhile): the ranks fail while reading.
VANISHING = """
import sys
from pathlib import Path
from flagscale.checkpoint import bridge
from flagscale.errors import reported
source, out, shard = sys.argv[1:]
checked = bridge._needs_backend
bridge._needs_backend = lambda: (checked(), Path(source, shard).unlink())
with reported():
    bridge.import_checkpoint(Path(source), Path(out), tp=2, pp=1)
"""


@pytest.mark.integration
def test_a_failing_conversion_leaves_nothing_behind(venv, tmp_path):
    """The ranks fail after they started: the import reports one line naming the file, and neither the
    destination nor a staging folder is left."""
    src = save_tiny("qwen3", tmp_path / "hf", shard="100KB")
    out = venv.work / "broken"
    result = venv.run([venv.python, "-c", VANISHING, src, out, "model-00004-of-00010.safetensors"])
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model-00004-of-00010.safetensors: cannot read model.layers." in errors[0], errors
    assert not out.exists() and not list(out.parent.glob(".broken.partial-*"))


@pytest.mark.integration
def test_train_starts_from_an_import_and_its_checkpoint_exports(venv, models, imports):
    """The lifecycle: import (TP=1), `flagscale train` at TP=2 from its weights (finetune; the padded vocabulary
    of the import is kept), then export of the trained checkpoint, which transformers loads."""
    from conftest import REPO_ROOT

    ckpt = imports("llama", 1, 1)
    corpus = venv.corpus()
    model = [line.split(": ", 1) for line in (ckpt / "flagscale_model.yaml").read_text().splitlines() if ": " in line]
    exp = venv.work / "finetune"

    def train(*extra: str):
        return venv.run(
            [
                venv.flagscale,
                "train",
                REPO_ROOT / "examples/tiny_gpt/conf",
                "--config-name",
                "tp2",
                "--foreground",
                f"experiment.exp_dir={exp}",
                f"train.data.data_path={corpus}",
                f"++train.system.checkpoint.load={ckpt}",
                "train.model.train_iters=10",
                *(f"++train.model.{k}={v.strip(chr(34))}" for k, v in model if not k.startswith("#")),
                *extra,
            ],
            label="finetune",
        )

    refused = train()  # weights only: a resume needs finetune
    assert refused.returncode != 0
    assert "holds model weights only" in refused.stdout + refused.stderr
    # a configuration error is not restarted (a restart would repeat it): one attempt, no backoff
    assert "a restart would repeat this config error" in refused.stdout and "restarting in" not in refused.stdout
    other = train("++train.system.checkpoint.finetune=true", "train.model.hidden_size=128")
    assert "holds another model: hidden_size=64 (this run: 128)" in other.stdout + other.stderr
    shutil.rmtree(exp)
    result = train("++train.system.checkpoint.finetune=true")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"finetuning from the model weights of {ckpt / 'iter_0000000'}" in result.stdout
    curve = [json.loads(line)["loss"] for line in (exp / "logs" / "metrics.jsonl").read_text().splitlines()]
    print(f"\nllama finetuned at TP=2 from an import: loss {curve[0]:.3f} -> {curve[-1]:.3f}")
    assert len(curve) == 10 and curve[-1] < curve[0]

    back = export(venv, exp / "checkpoints", venv.work / "exports" / "finetuned")
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32)
    assert type(trained).__name__ == "LlamaForCausalLM"
    before, after = tensors_of(models["llama"]), tensors_of(back)
    assert sorted(before) == sorted(after)
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])


# ------------------------------------------------------------------------------- flagscale checkpoint
FLAGSCALE = [sys.executable, "-m", "flagscale.cli"]


def test_checkpoint_commands_load_nothing_heavy():
    code = (
        "import sys; from flagscale.cli import app; from typer.testing import CliRunner; "
        "r = CliRunner().invoke(app, ['checkpoint', 'import', '--help']); assert r.exit_code == 0, r.output; "
        "assert '--tp' in r.output and '--family' in r.output, r.output; "
        "r = CliRunner().invoke(app, ['checkpoint', 'export', '--help']); assert r.exit_code == 0, r.output; "
        "heavy = [m for m in ('torch', 'megatron', 'safetensors', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tp", "3"], "error: --tp 3 does not divide num_attention_heads=4 of the model"),
        (
            ["--family", "gemma"],
            "error: --family gemma: use one of llama, qwen2, qwen3, qwen3_moe, mixtral, deepseek_v3",
        ),
        (["--pp", "0"], "Invalid value for '--pp'"),
    ],
)
def test_cli_refuses_bad_input_with_one_line(tmp_path, models, args, message):
    out = tmp_path / "out"
    result = subprocess.run(
        [*FLAGSCALE, "checkpoint", "import", str(models["llama"]), str(out), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr
    if message.startswith("error:"):
        assert result.stderr.strip().splitlines() == [message], result.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.integration
def test_cli_import_then_export(venv, models):
    ckpt, back = venv.work / "cli" / "ckpt", venv.work / "cli" / "hf"
    imported = venv.run([venv.flagscale, "checkpoint", "import", models["qwen3"], ckpt, "--tp", "2", "--pp", "2"])
    assert imported.returncode == 0, imported.stdout[-3000:] + imported.stderr[-3000:]
    assert f"imported {models['qwen3']} (qwen3, 47 tensors) into {ckpt} (TP=2 PP=2)" in imported.stdout
    assert f"train.system.checkpoint.load={ckpt} train.system.checkpoint.finetune=true" in imported.stdout
    exported = venv.run([venv.flagscale, "checkpoint", "export", ckpt, back])
    assert exported.returncode == 0, exported.stdout[-3000:] + exported.stderr[-3000:]
    assert f"exported {ckpt} (qwen3) to {back}: config.json, model.safetensors, " in exported.stdout
    source, result = tensors_of(models["qwen3"]), tensors_of(back)
    assert sorted(source) == sorted(result) and all(torch.equal(source[n], result[n]) for n in source)
    again = venv.run([venv.flagscale, "checkpoint", "export", ckpt, back])
    assert again.returncode == 2 and f"error: {back} already exists and is not empty" in again.stderr
