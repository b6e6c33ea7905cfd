"""LoRA (`train.model.lora`, flagscale/train/lora.py) and its export (flagscale/checkpoint/lora.py).

Fast (the test process): target names (megatron's, or HF names covering a fused layer whole) and the refusals;
a target that matches no module refused by `flagscale train` in one line before anything is written; the PEFT
mapping of megatron's fused adapters is exact: for every HF projection, PEFT's lora_B @ lora_A equals the rows
(columns) of megatron's B @ A that the weight mapping gives that projection.

Integration (megatron.core under torchrun, tests/megatron_env.py's venv), on the tiny llama of tests/test_sft.py
imported with `flagscale checkpoint import` (fp32), fine-tuned with LoRA on padded chat records at TP=2 (adapters
sharded: column-parallel B and row-parallel A split over the two ranks):
* the loss falls; in the saved checkpoint every base tensor is bit-identical to the import's, and only adapters
  were added and changed;
* resumed from its iteration-5 checkpoint, a run ends with the uninterrupted run's adapters, bit for bit;
* `flagscale checkpoint export` merged: transformers' logits of the merged HF folder equal the adapted Megatron
  model's (TP=1 and TP=2) within 1e-5; `--lora adapter`: peft.PeftModel.from_pretrained(base, folder) loads it
  and its logits match too.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import REPO_ROOT, flagscale_cli

from flagscale.errors import ConfigError
from flagscale.train import lora
from flagscale.train.settings import train_settings

CONF = REPO_ROOT / "examples" / "tiny_gpt" / "conf"
TOLERANCE = 1e-5  # max abs logit difference, fp32
LORA = ("++train.model.lora.rank=8", "++train.model.lora.alpha=16")


# ------------------------------------------------------------------------------------------- targets
def test_targets_take_megatron_names_or_whole_groups_of_hf_names():
    assert lora.megatron_targets(("linear_fc2", "linear_qkv")) == ("linear_qkv", "linear_fc2")
    hf = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert lora.megatron_targets(hf) == lora.TARGETS
    assert lora.megatron_targets(("o_proj", "down_proj")) == ("linear_proj", "linear_fc2")
    with pytest.raises(ConfigError, match=r"q_proj, v_proj without k_proj: megatron fuses q_proj \+ k_proj \+ v_proj"):
        lora.megatron_targets(("q_proj", "v_proj"))
    with pytest.raises(ConfigError, match="gate_proj without up_proj"):
        lora.megatron_targets(("gate_proj",))


def test_a_target_that_matches_no_module_names_the_available_ones():
    with pytest.raises(ConfigError) as err:
        lora_model = {"family": "llama", "lora": {"target_modules": ["linear_qkv", "attn_out"]}}
        train_settings({"model": lora_model, "data": {"data_path": "d"}})
    assert str(err.value) == (
        "train.model.lora.target_modules: attn_out matches no module; available: linear_qkv, linear_proj, "
        "linear_fc1, linear_fc2, q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
    )


def test_lora_settings_parse_and_refuse_moe_families():
    t = train_settings(
        {"model": {"family": "llama", "lora": {"rank": 4, "alpha": 8, "dropout": 0.1}}, "data": {"data_path": "d"}}
    )
    assert t.model.lora is not None and (t.model.lora.rank, t.model.lora.alpha, t.model.lora.dropout) == (4, 8.0, 0.1)
    assert lora.record(t.model.lora)["target_modules"] == list(lora.TARGETS)
    with pytest.raises(ConfigError, match=r"train.model.lora.rank=0: must be at least 1"):
        train_settings({"model": {"lora": {"rank": 0}}, "data": {"data_path": "d"}})
    with pytest.raises(ConfigError, match=r"lora.dropout=1.0: must be in \[0, 1\)"):
        train_settings({"model": {"lora": {"dropout": 1.0}}, "data": {"data_path": "d"}})
    moe = {"family": "mixtral", "moe": {"num_experts": 4}, "lora": {}}
    with pytest.raises(ConfigError, match="LoRA adapts the dense families .*family mixtral is not one of them"):
        train_settings({"model": moe, "data": {"data_path": "d"}})


def test_flagscale_train_refuses_an_unknown_target_in_one_line_writing_nothing(tmp_path):
    data = tmp_path / "corpus"
    for suffix in (".bin", ".idx"):
        Path(f"{data}{suffix}").write_bytes(b"")
    exp_dir = tmp_path / "exp"
    result = flagscale_cli(
        "train",
        str(CONF),
        f"experiment.exp_dir={exp_dir}",
        f"train.data.data_path={data}",
        "++train.model.family=llama",
        "++train.model.lora.target_modules=[linear_qkv,dense_h_to_4h]",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert re.match(
        r"error: train.model.lora.target_modules: dense_h_to_4h matches no module; available: linear_qkv", lines[0]
    )
    assert not exp_dir.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["corpus.bin", "corpus.idx"]


# ------------------------------------------------------------------------------------- PEFT mapping
def test_fused_adapters_map_exactly_onto_peft_projections():
    """linear_qkv's A is q/k/v's lora_A alike and its B's rows split by query group; fc1's B splits into gate and
    up; linear_proj's and fc2's A are o_proj's and down_proj's lora_A (row-parallel: columns)."""
    torch = pytest.importorskip("torch")
    from flagscale.checkpoint import lora as export_lora
    from flagscale.checkpoint import mapping
    from flagscale.settings import convert
    from flagscale.train import families
    from flagscale.train.settings import ModelSettings

    model = {
        "family": "llama",
        "num_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_query_groups": 2,
        "ffn_hidden_size": 96,
    }
    arch, vocab, rank = families.architecture(convert(ModelSettings, model, "m")), 300, 3
    info = {"architecture": arch, "vocab_size": vocab, "padded_vocab_size": 320}
    maps = {m.megatron: m for m in mapping.model_maps(arch, vocab, 320, 0, 2, True, True)}
    shapes = mapping.hf_shapes(arch, vocab)
    torch.manual_seed(0)
    adapters, deltas = {}, {}
    for layer in range(2):
        for target in lora.TARGETS:
            part = "self_attention" if target in ("linear_qkv", "linear_proj") else "mlp"
            name = f"decoder.layers.{layer}.{part}.{target}"
            tmap = maps[f"{name}.weight"]
            pieces = tmap.shard(0, 1)
            rows = sum(p.size for p in pieces)
            other = shapes[next(p.source for p in pieces)][1 - tmap.dim]
            out_f, in_f = (rows, other) if tmap.dim == 0 else (other, rows)
            a, b = torch.randn(rank, in_f, dtype=torch.float64), torch.randn(out_f, rank, dtype=torch.float64)
            adapters[f"{name}.lora_A"], adapters[f"{name}.lora_B"] = a, b
            full = {p.source: torch.zeros(shapes[p.source], dtype=torch.float64) for p in pieces}
            mapping.scatter(b @ a, pieces, tmap.dim, full, {})  # megatron's delta, as the HF weights it makes
            deltas.update(full)
    peft = export_lora.adapter_tensors(adapters, info)
    assert len(peft) == 2 * 2 * 7
    for source, delta in deltas.items():
        a, b = peft[export_lora.peft_name(source, "lora_A")], peft[export_lora.peft_name(source, "lora_B")]
        assert torch.allclose(b @ a, delta, rtol=0, atol=1e-12), source
    q = "base_model.model.model.layers.1.self_attn.{}_proj.lora_A.weight"
    assert torch.equal(peft[q.format("q")], peft[q.format("k")]) and torch.equal(
        peft[q.format("q")], peft[q.format("v")]
    )
    assert peft[q.format("q").replace("lora_A", "lora_B")].shape == (64, rank)
    assert peft[q.format("k").replace("lora_B", "lora_A").replace("lora_A", "lora_B")].shape == (32, rank)
    assert export_lora.hf_targets(["linear_qkv", "linear_fc2"]) == ["q_proj", "k_proj", "v_proj", "down_proj"]


# ---------------------------------------------------------------------------------------- integration
@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    from megatron_env import megatron_env

    return megatron_env(tmp_path_factory)


# Megatron tensors of two checkpoints (load_plain_tensors: whole tensors, any layout), compared in the venv.
COMPARE = """
import json, sys
import torch
from megatron.core.dist_checkpointing.serialization import load_plain_tensors
torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
tensors = lambda p: {k: v for k, v in load_plain_tensors(p).items() if isinstance(v, torch.Tensor)}
before, after = (tensors(p) for p in sys.argv[1:3])
model = {k: v for k, v in after.items() if not k.startswith("optimizer.")}
adapter = lambda k: k.rsplit(".", 1)[-1] in ("lora_A", "lora_B")
print(json.dumps({
    "base": sorted(before),
    "base_changed": sorted(k for k in before if not torch.equal(before[k], after[k])),
    "added": sorted(set(model) - set(before)),
    "adapters_nonzero_B": sorted(k for k in model if k.endswith("lora_B") and model[k].abs().sum() > 0),
}))
"""

# Logits of transformers (the merged folder) and of peft (the base model + the adapter folder), in the venv.
HF_LOGITS = """
import sys, json
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
merged, base, adapter, tokens, out = sys.argv[1:]
batch = torch.tensor(json.loads(open(tokens).read()))
with torch.no_grad():
    m = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()(batch).logits
    b = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    plain = b(batch).logits
    p = PeftModel.from_pretrained(b, adapter).eval()
    adapted = sum(n.endswith("lora_A") for n, _ in p.named_modules())
    print(json.dumps({"peft_class": type(p).__name__, "lora_modules": adapted}))
    torch.save({"merged": m, "peft": p(batch).logits, "base": plain}, out)
"""


@pytest.fixture(scope="module")
def lora_run(venv):
    """LoRA at TP=2 on padded chat records, 10 iterations, checkpoints at 5 and 10."""
    from test_sft import chat_records, finetune, write_jsonl

    data = write_jsonl(venv.work / "lora-chat.jsonl", chat_records(64, seed=1))
    exp = venv.work / "lora-tp2"
    extra = (
        *LORA,
        "++train.data.sft.packing=padded",
        "train.model.optimizer.lr=0.01",
        "train.system.checkpoint.save_interval=5",
    )
    result = finetune(venv, exp, data, *extra, config="tp2", iters=10)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return exp, data, extra, result


@pytest.mark.integration
def test_lora_loss_falls_and_only_adapters_change(venv, lora_run):
    from test_sft import losses, tiny_llama

    exp, _, _, result = lora_run
    assert "padded sequences of 128 tokens" in result.stdout
    curve = losses(exp)
    first, last = sum(curve[:3]) / 3, sum(curve[-3:]) / 3
    print(
        f"\nLoRA (rank 8, TP=2, padded SFT): loss {curve[0]:.3f} -> {curve[-1]:.3f} "
        f"(means of the first/last 3: {first:.3f}/{last:.3f})"
    )
    # the frozen random embedding and output layer leave the adapters less to gain than a full fine-tune
    assert len(curve) == 10 and last < first - 0.15, curve
    _, imported = tiny_llama(venv)
    compared = venv.run([venv.python, "-c", COMPARE, imported / "iter_0000000", exp / "checkpoints" / "iter_0000010"])
    assert compared.returncode == 0, compared.stderr[-3000:]
    report = json.loads(compared.stdout.strip().splitlines()[-1])
    # plain tensors: megatron stacks the layers, one key per kind of tensor
    assert len(report["base"]) == 9 and report["base_changed"] == [], report["base_changed"]
    kinds = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
    assert report["added"] == sorted(f"decoder.layers.{k}.lora_{ab}" for k in kinds for ab in "AB"), report["added"]
    assert len(report["adapters_nonzero_B"]) == 4
    print(f"{len(report['base'])} base tensors bit-identical, {len(report['added'])} adapter tensors added and trained")


@pytest.mark.integration
def test_lora_resumes_its_adapters(venv, lora_run):
    """A run started from the iteration-5 checkpoint ends with the uninterrupted run's weights and adapters."""
    from test_sft import finetune

    exp, data, extra, _ = lora_run
    resumed = venv.work / "lora-tp2-resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(exp / "checkpoints" / "iter_0000005", resumed / "checkpoints" / "iter_0000005")
    (resumed / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("5\n")
    result = finetune(venv, resumed, data, *extra, config="tp2", iters=10)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resumed from" in result.stdout and "iteration 5" in result.stdout
    compared = venv.run(
        [venv.python, "-c", COMPARE, exp / "checkpoints" / "iter_0000010", resumed / "checkpoints" / "iter_0000010"]
    )
    assert compared.returncode == 0, compared.stderr[-3000:]
    report = json.loads(compared.stdout.strip().splitlines()[-1])
    assert any(k.endswith("lora_B") for k in report["base"]) and report["base_changed"] == [], report["base_changed"]


@pytest.mark.integration
def test_merged_and_peft_exports_compute_the_adapted_logits(venv, lora_run):
    import torch
    from test_sft import tiny_llama

    exp, _, _, _ = lora_run
    model, _ = tiny_llama(venv)
    ckpt = exp / "checkpoints"
    merged, adapter = venv.work / "lora-merged", venv.work / "lora-adapter"
    done = venv.run([venv.flagscale, "checkpoint", "export", ckpt, merged], label="export merged")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    done = venv.run(
        [venv.flagscale, "checkpoint", "export", ckpt, adapter, "--lora", "adapter"], label="export adapter"
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"to {adapter}: adapter_config.json, adapter_model.safetensors, tokenizer_config.json" in done.stdout
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (
        "LORA",
        8,
        16,
        str(model),
    )
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    torch.manual_seed(7)
    tokens = venv.work / "lora-tokens.json"
    tokens.write_text(json.dumps(torch.randint(0, 512, (2, 64)).tolist()))
    helper = REPO_ROOT / "tests" / "megatron_cpu" / "logits_of_checkpoint.py"
    ours = {}
    for tp in (1, 2):
        out = venv.work / f"lora-logits-tp{tp}.pt"
        args = [ckpt, tokens, out, "--tp", tp]
        ran = venv.run([venv.python, helper, *args]) if tp == 1 else venv.torchrun(2, helper, *args)
        assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
        ours[tp] = torch.load(out)
    theirs_file = venv.work / "lora-hf-logits.pt"
    ran = venv.run(
        [venv.python, "-c", HF_LOGITS, merged, model, adapter, tokens, theirs_file], label="transformers+peft"
    )
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    loaded = json.loads(ran.stdout.strip().splitlines()[-1])
    assert loaded == {"peft_class": "PeftModelForCausalLM", "lora_modules": 4 * 7}, loaded
    theirs = torch.load(theirs_file)
    diffs = {
        "merged TP=1": (ours[1] - theirs["merged"]).abs().max().item(),
        "merged TP=2": (ours[2] - theirs["merged"]).abs().max().item(),
        "peft TP=1": (ours[1] - theirs["peft"]).abs().max().item(),
        "peft TP=2": (ours[2] - theirs["peft"]).abs().max().item(),
    }
    adapted = (ours[1] - theirs["base"]).abs().max().item()
    print(
        f"\nmax abs logit diff vs the adapted Megatron model: {diffs}; the adapters move logits by {adapted:.3f}; "
        f"{venv.timings}"
    )
    assert all(d <= TOLERANCE for d in diffs.values()), diffs
    assert adapted > 1000 * TOLERANCE  # the adapters matter: a dropped one would show


@pytest.mark.integration
def test_adapter_export_of_a_checkpoint_without_lora_is_refused(venv):
    from test_sft import tiny_llama

    _, imported = tiny_llama(venv)
    out = venv.work / "no-lora-adapter"
    result = venv.run([venv.flagscale, "checkpoint", "export", imported, out, "--lora", "adapter"])
    assert result.returncode == 2, result.stdout + result.stderr
    assert "the checkpoint has no LoRA adapters (not a train.model.lora run): drop --lora" in result.stderr
    assert not out.exists() and not list(out.parent.glob(".no-lora-adapter.partial-*"))
