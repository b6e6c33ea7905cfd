"""The streaming data path of the checkpoint bridge (flagscale/checkpoint/worker.py).

Without megatron: export's safetensors writer (tensor by tensor) writes exactly the bytes safetensors' own
`save_file` writes; the output files are planned as the in-memory writer splits them; import's reader reads row
ranges straight into their destination and leaves conversions to safetensors.

With the patched megatron-core (integration): a bf16 HF model imports without an fp32 upcast (the checkpoint
keeps bf16), a run in fp32 loads it (the logits equal transformers' on the same weights, max abs diff <= 1e-4),
and export gives back every tensor bit-identical, from TP=1 and from TP=2 x PP=2.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("safetensors")
pytest.importorskip("transformers")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from flagscale.checkpoint import mapping, worker  # noqa: E402


def _stream(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    dtype = next(iter(tensors.values())).dtype
    kind = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    stream = worker.SafetensorsStream(path, shapes, kind, torch.empty((), dtype=dtype).element_size())
    for name in stream.order:
        stream.write(name, tensors[name])
    stream.file.close()
    stream.check()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_streamed_file_is_what_safetensors_writes(tmp_path, dtype):
    torch.manual_seed(0)
    tensors = {
        "model.layers.10.mlp.up_proj.weight": torch.randn(7, 3),
        "model.layers.2.input_layernorm.weight": torch.randn(5),
        "lm_head.weight": torch.randn(11, 3),
        "model.embed_tokens.weight": torch.randn(11, 3),
        "z": torch.randn(1),
    }
    tensors = {name: t.to(dtype) for name, t in tensors.items()}
    _stream(tmp_path / "ours.safetensors", tensors)
    save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()


def test_streamed_file_refuses_a_tensor_out_of_order(tmp_path):
    stream = worker.SafetensorsStream(tmp_path / "x.safetensors", {"a": (2,), "b": (2,)}, "F32", 4)
    with pytest.raises(Exception, match="out of order or shape"):
        stream.write("b", torch.zeros(2))
    stream.file.close()


def test_shard_plan_matches_the_in_memory_writer(tmp_path):
    """write_shards (tensors in memory) and the streamed export plan the same files and index."""
    torch.manual_seed(1)
    tensors = {f"t{i}": torch.randn(100 + 10 * i) for i in range(12)}
    files = worker.write_shards(tensors, tmp_path, max_shard_size=1500)
    sizes = {name: t.numel() * 4 for name, t in tensors.items()}
    shards = worker.plan_shards(sizes, 1500)
    assert files == [*worker.shard_names(len(shards)), "model.safetensors.index.json"]
    assert all(sum(sizes[n] for n in names) <= 1500 or len(names) == 1 for names in shards)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {n: f for f, names in zip(files, shards, strict=False) for n in names}
    assert worker.plan_shards(sizes, 10**9) == [list(tensors)] and worker.shard_names(1) == ["model.safetensors"]


def test_reader_reads_rows_in_place_and_leaves_conversions_to_safetensors(tmp_path):
    torch.manual_seed(2)
    source = {"w": torch.randn(8, 6).to(torch.bfloat16), "n": torch.randn(6).to(torch.bfloat16)}
    save_file(source, str(tmp_path / "m.safetensors"))
    files = dict.fromkeys(source, str(tmp_path / "m.safetensors"))
    with ExitStack() as stack:
        reader = worker._Reader(files, stack)
        rows = torch.empty(3, 6, dtype=torch.bfloat16)
        assert reader.read_into(mapping.Piece("w", 2, 5), 0, rows)
        assert torch.equal(rows, source["w"][2:5])
        norm = torch.empty(6, dtype=torch.bfloat16)
        assert reader.read_into(mapping.Piece("n", 0, 6), 0, norm) and torch.equal(norm, source["n"])
        columns = torch.empty(8, 2, dtype=torch.bfloat16)
        assert not reader.read_into(mapping.Piece("w", 1, 3), 1, columns)  # strided: safetensors slices
        upcast = torch.empty(3, 6)
        assert not reader.read_into(mapping.Piece("w", 2, 5), 0, upcast)  # a conversion
        target = torch.empty(8, 6)
        worker._fill(target, [mapping.Piece("w", 0, 4), mapping.Piece(None, 0, 2), mapping.Piece("w", 4, 6)], 0, reader)
        expected = torch.cat([source["w"][:4].float(), torch.zeros(2, 6), source["w"][4:6].float()])
        assert torch.equal(target, expected)


# ------------------------------------------------------------------ with megatron.core (integration)
@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    from megatron_env import megatron_env

    return megatron_env(tmp_path_factory)


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory) -> Path:
    """The bridge tests' tiny llama, saved in bf16 (in 3 shards)."""
    from test_checkpoint_bridge import save_tiny

    folder = save_tiny("llama", tmp_path_factory.mktemp("hf") / "llama-fp32", shard="200KB")
    from transformers import AutoModelForCausalLM

    out = folder.parent / "llama-bf16"
    AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).save_pretrained(out, max_shard_size="200KB")
    (out / "tokenizer_config.json").write_text((folder / "tokenizer_config.json").read_text())
    return out


@pytest.mark.integration
def test_bf16_import_keeps_bf16_and_fp32_runs_load_it(venv, bf16_model):
    from test_checkpoint_bridge import CONVERT, HELPER, hf_logits, tensors_of

    work = venv.work / "bf16"
    for layout in ((1, 1), (2, 2)):
        ckpt = work / f"ckpt-tp{layout[0]}-pp{layout[1]}"
        result = venv.run([venv.python, "-c", CONVERT, "import", bf16_model, ckpt, *layout], label=f"import {layout}")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one = work / "ckpt-tp1-pp1"
    probe = "import sys, torch.distributed.checkpoint as d; m = d.FileSystemReader(sys.argv[1]).read_metadata(); " + (
        "print({k: str(v.properties.dtype) for k, v in m.state_dict_metadata.items() if hasattr(v, 'properties')})"
    )
    dtypes = venv.run([venv.python, "-c", probe, one / "iter_0000000"])
    stored = eval(dtypes.stdout.strip().splitlines()[-1])  # noqa: S307 (our own probe's dict)
    # the weights stay bf16; megatron.core builds its norms in fp32 (the bf16 values convert exactly)
    assert {k: v for k, v in stored.items() if "norm" not in k} == dict.fromkeys(
        [k for k in stored if "norm" not in k], "torch.bfloat16"
    ), stored
    assert len(stored) >= 7

    torch.manual_seed(7)
    tokens = work / "tokens.json"
    tokens.write_text(json.dumps(torch.randint(0, 300, (2, 64)).tolist()))
    logits = work / "logits.pt"
    result = venv.run([venv.python, HELPER, one, tokens, logits, "--tp", 1])  # an fp32 model loads bf16 weights
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    diff = (torch.load(logits) - hf_logits(bf16_model, tokens)).abs().max().item()
    print(f"\nbf16 import, fp32 model: max abs logit diff {diff:.2e}")
    assert diff <= 1e-4

    source = tensors_of(bf16_model)
    for layout in ("tp1-pp1", "tp2-pp2"):
        back = work / f"export-{layout}"
        result = venv.run([venv.python, "-c", CONVERT, "export", work / f"ckpt-{layout}", back, 100_000])
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        exported = tensors_of(back)
        assert sorted(exported) == sorted(source)
        assert all(exported[n].dtype == torch.bfloat16 and torch.equal(exported[n], source[n]) for n in source)
        config = json.loads((back / "config.json").read_text())
        assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"  # transformers 4.57 writes `dtype`
