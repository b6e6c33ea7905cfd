"""`flagscale checkpoint import | export`: Hugging Face folders <-> Megatron distributed checkpoints.

Import checks everything it can before a process starts (the architecture, config.json against every tensor's
shape in the safetensors headers, the shards the index names, whether TP and PP divide heads, query groups and
layers), then runs one process per rank of the TP x PP layout under torchrun (gloo, on the CPU; a layout of one
rank runs its one process alone). Every rank builds its stage of the model with megatron.core on the meta device
and the ranks save one distributed checkpoint together, in the layout `flagscale train` writes and resumes from
(`OUT/iter_0000000/` and the tracker file), in the HF tensors' dtype: each tensor is read from the rank's own
rows of the safetensors files when the checkpoint writer asks for it, so a rank holds about one tensor at a time,
not its stage. It holds model weights only; `train.system.checkpoint.finetune=true` starts a run from it.

Export streams: one process plans the output files from the HF shapes (a new file above --max-shard-size, with
an index) and writes them tensor by tensor, loading the Megatron parameters each needs from the checkpoint a
layer at a time at TP=1, PP=1 (distributed checkpointing reshards any layout); then config.json and the source's
tokenizer files. Memory: about a layer, or the embedding, whatever the model's size (see the worker).

Both write into a temporary folder beside the destination and rename it at the end: on any error nothing is
left behind. Only the standard library loads here; torch and megatron load in `flagscale.checkpoint.worker`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flagscale.checkpoint import hf, lora, mapping
from flagscale.errors import ConfigError, ConversionError
from flagscale.settings import convert
from flagscale.train import checkpoint as train_checkpoint
from flagscale.train import families
from flagscale.train.settings import ModelSettings
from flagscale.train.tokenizer import padded_vocab_size

WORKER = "flagscale.checkpoint.worker"
LORA_MODES = lora.MODES  # how a LoRA run exports: merged weights or a PEFT adapter folder
MODEL_YAML = "flagscale_model.yaml"
# Conversion runs on the CPU over gloo, whatever device this build targets: it needs no accelerator.
WORKER_ENV = {"MEGATRON_DEVICE_TYPE": "cpu", "MEGATRON_COLLECTIVE_BACKEND": "gloo"}
_INHERITED_DROP = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Imported:
    out: Path
    family: str
    model: dict[str, Any]  # the train.model settings of the imported model (also in OUT/flagscale_model.yaml)
    tensors: int
    layout: str


@dataclass(frozen=True)
class Exported:
    out: Path
    family: str
    files: tuple[str, ...]
    tokenizer_from: str | None  # the folder tokenizer files were copied from, if any


# ------------------------------------------------------------------------------------------- import
def import_checkpoint(
    hf_dir: Path,
    out_dir: Path,
    tp: int = 1,
    pp: int = 1,
    family: str | None = None,
    make_vocab_size_divisible_by: int = 64,
    ep: int = 1,
) -> Imported:
    """`ep`: expert parallelism of a MoE model (experts split over EP ranks); the import runs TP x PP x EP ranks,
    the smallest world megatron.core builds that layout in (data-parallel size EP)."""
    hf_dir, out_dir = hf_dir.resolve(), out_dir.resolve()
    config = hf.read_config(hf_dir)
    where = str(hf_dir / hf.CONFIG)
    fam = hf.family_of(config, where, family)
    plain = {**hf.model_settings(config, fam, where), "make_vocab_size_divisible_by": make_vocab_size_divisible_by}
    model = convert(ModelSettings, plain, where)
    _check_layout(model, tp, pp)
    _check_experts(model, tp, ep)
    arch, vocab = families.architecture(model), plain["vocab_size"]
    tensors = hf.check_tensors(hf_dir, hf.read_tensors(hf_dir), mapping.hf_shapes(arch, vocab), fam)
    _check_destination(out_dir)
    _needs_backend()
    info = {
        "family": fam,
        "architecture": arch,
        "vocab_size": vocab,
        "padded_vocab_size": padded_vocab_size(vocab, make_vocab_size_divisible_by, tp),
        "max_position_embeddings": plain["max_position_embeddings"],
        "hf": {"source": str(hf_dir), "config": config, "dtype": hf.torch_dtype_name(tensors)},
    }
    plan = {
        "model": plain,
        "tp": tp,
        "pp": pp,
        "ep": ep,
        "info": info,
        "files": {name: str(t.file) for name, t in tensors.items()},
    }
    with _staged(out_dir) as staging, tempfile.TemporaryDirectory(prefix="flagscale-import-") as scratch:
        plan["out"] = str(staging)
        plan_file = Path(scratch) / "plan.json"
        plan_file.write_text(json.dumps(plan))
        _run_worker(["--nproc-per-node", str(tp * pp * ep)], ["import", str(plan_file)], f"import of {hf_dir}")
        (staging / MODEL_YAML).write_text(model_yaml(plain, hf_dir))
    return Imported(out_dir, fam, plain, len(tensors), f"TP={tp} PP={pp}" + (f" EP={ep}" if ep > 1 else ""))


def _check_layout(m: ModelSettings, tp: int, pp: int) -> None:
    groups = families.query_groups(m)
    dense = m.moe is None or m.moe.dense_layers > 0  # a dense MLP somewhere
    for value, name, size, flag in (
        (m.num_attention_heads, "num_attention_heads", tp, "--tp"),
        (groups, "num_key_value_heads", tp, "--tp"),
        (families.ffn_size(m) if dense else 0, "intermediate_size", tp, "--tp"),
        (m.num_layers, "num_hidden_layers", pp, "--pp"),
    ):
        if value % size:
            raise ConfigError(f"{flag} {size} does not divide {name}={value} of the model")


def _check_experts(m: ModelSettings, tp: int, ep: int) -> None:
    """What expert parallelism, and tensor parallelism of the experts and of multi-latent attention, divide."""
    if m.moe is None:
        if ep > 1:
            raise ConfigError(f"--ep {ep}: family {m.family} has no experts (expert parallelism is for MoE models)")
        return
    if m.moe.dense_layers >= m.num_layers:
        raise ConfigError(f"the model has no MoE layer ({m.moe.dense_layers} dense first layers of {m.num_layers})")
    checks = [
        (m.moe.num_experts, "the number of experts", ep, "--ep"),
        (m.moe.ffn_hidden_size or families.ffn_size(m), "the expert MLP size", tp, "--tp"),
        (m.moe.shared_expert_ffn_hidden_size or 0, "the shared experts' MLP size", tp, "--tp"),
    ]
    if m.mla is not None:
        checks += [
            (m.mla.q_lora_rank or 0, "q_lora_rank", tp, "--tp"),
            (m.mla.kv_lora_rank + m.mla.qk_pos_emb_head_dim, "kv_lora_rank + qk_rope_head_dim", tp, "--tp"),
        ]
    for value, name, size, flag in checks:
        if value % size:
            raise ConfigError(f"{flag} {size} does not divide {name} ({value}) of the model")


def model_yaml(model: dict[str, Any], source: Path) -> str:
    """The `train.model` settings of an imported model, for a task YAML."""
    lines = [f"# train.model settings of {source} (flagscale checkpoint import): put them in your task YAML's model:"]
    for key, value in model.items():
        lines.append(f"{key}: {_yaml_scalar(value)}")
    return "\n".join(lines) + "\n"


def _yaml_scalar(value: Any) -> str:
    text = json.dumps(value)
    if isinstance(value, float) and "e" in text and "." not in text:
        text = text.replace("e", ".0e")  # YAML 1.1 reads 1e-06 as a string, 1.0e-06 as a number
    return text


# ------------------------------------------------------------------------------------------- export
def export_checkpoint(
    ckpt_dir: Path, out_dir: Path, max_shard_size: int = 5 * 10**9, lora: str | None = None
) -> Exported:
    """`lora` (a LoRA run's checkpoint): merged (the default) or adapter (a PEFT folder; flagscale.checkpoint.lora)."""
    ckpt_dir, out_dir = ckpt_dir.resolve(), out_dir.resolve()
    if lora is not None and lora not in LORA_MODES:
        raise ConfigError(f"--lora {lora}: use one of {', '.join(LORA_MODES)}")
    if not ckpt_dir.is_dir():
        raise ConfigError(f"{ckpt_dir}: no such folder (expected a checkpoint folder with iter_NNNNNNN/)")
    train_checkpoint.latest_dir(ckpt_dir)  # a clear error when it holds no complete checkpoint
    if max_shard_size < 1:
        raise ConfigError(f"--max-shard-size {max_shard_size}: must be at least 1 byte")
    _check_destination(out_dir)
    _needs_backend()
    with _staged(out_dir) as staging, tempfile.TemporaryDirectory(prefix="flagscale-export-") as scratch:
        plan_file, result_file = Path(scratch) / "plan.json", Path(scratch) / "result.json"
        plan_file.write_text(
            json.dumps(
                {
                    "checkpoint": str(ckpt_dir),
                    "out": str(staging),
                    "max_shard_size": max_shard_size,
                    "result": str(result_file),
                    "lora": lora,
                }
            )
        )
        _run_worker(["--nproc-per-node", "1"], ["export", str(plan_file)], f"export of {ckpt_dir}")
        result = json.loads(result_file.read_text())
    return Exported(out_dir, result["family"], tuple(result["files"]), result["tokenizer_from"])


# ------------------------------------------------------------------------------------------- shared
def _check_destination(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not empty: name a new folder")


def _needs_backend() -> None:
    for module, what in (("megatron.core", "megatron-core"), ("safetensors", "safetensors"), ("torch", "torch")):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            raise ConfigError(
                f"flagscale checkpoint needs {what}: `flagscale install --backend megatron` and "
                "`pip install 'flagscale[models]'` (with -c constraints.txt)"
            )


@contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out`, renamed to `out` when the block succeeds and removed when it fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # as mkdir would make it (mkdtemp's is private)
    try:
        yield staging
        if out.exists():
            out.rmdir()  # empty (checked before): the rename replaces it
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _INHERITED_DROP and not k.startswith("TORCHELASTIC_")}
    env.update(WORKER_ENV)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def _run_worker(torchrun_args: list[str], worker_args: list[str], what: str) -> None:
    """torchrun (standalone: one node, a free port) with the worker module; its `error:` line becomes ours. A world
    of one runs the worker alone (it starts its own process group): no agent process beside it, less memory."""
    if torchrun_args == ["--nproc-per-node", "1"]:
        cmd = [sys.executable, "-m", WORKER, *worker_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", *torchrun_args]
        cmd += ["--max-restarts=0", "-m", WORKER, *worker_args]
    result = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True)
    if result.returncode == 0:
        return
    output = result.stdout + result.stderr
    errors = [line[len("error: ") :] for line in output.splitlines() if line.startswith("error: ")]
    if errors:
        raise ConversionError(errors[0])
    tail = "\n".join(output.strip().splitlines()[-15:])
    raise ConversionError(f"{what} failed (exit status {result.returncode}):\n{tail}")
