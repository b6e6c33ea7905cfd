"""`flagscale checkpoint import | export`: Hugging Face folders <-> Megatron distributed checkpoints
(flagscale.checkpoint.bridge does the work; this module only parses and prints)."""

from __future__ import annotations

from pathlib import Path

import typer

from flagscale.cli.app import app, reported

checkpoint_app = typer.Typer(
    help="Hugging Face <-> Megatron checkpoints: import an HF model to train it, export a checkpoint to HF.",
    no_args_is_help=True,
)
app.add_typer(checkpoint_app, name="checkpoint")


@checkpoint_app.command("import")
def import_cmd(
    hf_dir: Path = typer.Argument(..., help="Hugging Face model folder: config.json and safetensors shards."),
    out_dir: Path = typer.Argument(..., help="New folder for the Megatron checkpoint (iter_0000000/ + tracker)."),
    tp: int = typer.Option(1, "--tp", min=1, help="Tensor-parallel size of the checkpoint."),
    pp: int = typer.Option(1, "--pp", min=1, help="Pipeline-parallel size of the checkpoint."),
    ep: int = typer.Option(1, "--ep", min=1, help="Expert-parallel size (MoE models): experts split over EP ranks."),
    family: str | None = typer.Option(
        None,
        "--family",
        help="llama | qwen2 | qwen3 | qwen3_moe | mixtral | deepseek_v3 (default: from config.json's architectures).",
    ),
    divisible_by: int = typer.Option(
        64, "--make-vocab-size-divisible-by", min=1, help="Pad the vocabulary to a multiple of this x TP."
    ),
) -> None:
    """Import an HF model as a Megatron distributed checkpoint (TP x PP x EP processes, each reading its slices)."""
    with reported():
        from flagscale.checkpoint.bridge import MODEL_YAML, import_checkpoint

        done = import_checkpoint(
            hf_dir, out_dir, tp=tp, pp=pp, family=family, make_vocab_size_divisible_by=divisible_by, ep=ep
        )
    typer.echo(f"imported {hf_dir} ({done.family}, {done.tensors} tensors) into {done.out} ({done.layout})")
    typer.echo(
        f"train from it with train.system.checkpoint.load={done.out} train.system.checkpoint.finetune=true and "
        f"the train.model settings in {done.out / MODEL_YAML}"
    )


@checkpoint_app.command("export")
def export_cmd(
    ckpt_dir: Path = typer.Argument(..., help="Checkpoint folder (iter_NNNNNNN/ + tracker), any TP/PP/EP layout."),
    hf_out: Path = typer.Argument(..., help="New folder for the Hugging Face model."),
    max_shard_size: int = typer.Option(
        5 * 10**9, "--max-shard-size", min=1, help="Bytes per safetensors shard (more: an index and shards)."
    ),
    lora: str | None = typer.Option(
        None,
        "--lora",
        help="A LoRA run: merged (adapters folded into the HF weights, the default) or adapter "
        "(a PEFT adapter folder: adapter_config.json + adapter_model.safetensors).",
    ),
) -> None:
    """Export the latest checkpoint in a folder as an HF model (config.json, safetensors, tokenizer files)."""
    with reported():
        from flagscale.checkpoint.bridge import export_checkpoint

        done = export_checkpoint(ckpt_dir, hf_out, max_shard_size=max_shard_size, lora=lora)
    typer.echo(f"exported {ckpt_dir} ({done.family}) to {done.out}: {', '.join(done.files)}")
    if done.tokenizer_from is None:
        typer.echo("no tokenizer files copied: the checkpoint records no HF source folder that still exists")
