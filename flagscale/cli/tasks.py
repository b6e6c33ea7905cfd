"""`flagscale train | serve | infer | compress`: compose the Hydra config and hand it to the task (runner.task)."""

from __future__ import annotations

from pathlib import Path

import typer

from flagscale.cli.app import app, reported

TaskArgs = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command("train")
def train_cmd(
    config_dir: Path = typer.Argument(..., help="Folder of the experiment YAML, e.g. examples/tiny_gpt/conf."),
    overrides: list[str] | None = typer.Argument(
        None, help="Hydra overrides: action=run|dryrun|stop|status|auto_tune, train.model.num_layers=4, ..."
    ),
    config_name: str = typer.Option("train", "--config-name", "-c", help="Experiment YAML (without .yaml)."),
    foreground: bool = typer.Option(False, "--foreground", help="Run attached (schedulers, containers)."),
    json_status: bool = typer.Option(False, "--json", help="action=status: print the status record as JSON."),
) -> None:
    """Train with Megatron on this device: launch, dry-run, stop, query or auto-tune a job (action=...)."""
    with reported():
        from flagscale.runner.config import compose
        from flagscale.train import main as train_main

        extra = ["++experiment.runner.foreground=true"] if foreground else []  # also where the YAML omits it
        extra += ["++experiment.runner.json=true"] if json_status else []
        code = train_main(compose(config_dir, config_name, [*(overrides or []), *extra]))
    raise typer.Exit(code)


@app.command("serve", context_settings=TaskArgs)
def serve_cmd(
    config: str = typer.Argument(
        ...,
        help="Experiment: a conf folder, a YAML file, or a model name under examples/ (one-click, e.g. tiny_llama).",
    ),
    overrides: list[str] | None = typer.Argument(
        None,
        help="[MODEL_CONFIG_YAML] then Hydra overrides: action=run|dryrun|stop|status|auto_tune, "
        "experiment.runner.port=8001, serve.0.engine_args.threads=2, ...",
    ),
    config_name: str = typer.Option("serve", "--config-name", "-c", help="Experiment YAML (without .yaml)."),
) -> None:
    """Serve models with an OpenAI-compatible API (llama.cpp, vLLM, SGLang; direct or on Ray)."""
    with reported():
        from flagscale.serve import main as serve_main
        from flagscale.serve.oneclick import compose_for

        code = serve_main(compose_for(config, config_name, list(overrides or []), task="serve"))
    raise typer.Exit(code)


@app.command("infer", context_settings=TaskArgs)
def infer_cmd(
    config: str = typer.Argument(
        ..., help="Experiment: a conf folder, a YAML file, or a model name under examples/ (e.g. tiny_llama)."
    ),
    overrides: list[str] | None = typer.Argument(
        None, help="Hydra overrides: action=run|dryrun, infer.generate.max_tokens=32, ..."
    ),
    config_name: str = typer.Option("infer", "--config-name", "-c", help="Experiment YAML (without .yaml)."),
) -> None:
    """Offline batch generation: a prompts file in, a JSONL of completions out (llama.cpp, vLLM, SGLang)."""
    with reported():
        from flagscale.infer import main as infer_main
        from flagscale.serve.oneclick import compose_for

        code = infer_main(compose_for(config, config_name, list(overrides or []), task="infer"))
    raise typer.Exit(code)


@app.command("compress", context_settings=TaskArgs)
def compress_cmd(
    config: str = typer.Argument(
        ..., help="Experiment: a conf folder, a YAML file, or a model name under examples/ (e.g. tiny_llama)."
    ),
    overrides: list[str] | None = typer.Argument(
        None, help="Hydra overrides: action=run|dryrun, compress=w4a16, compress.scheme=Q8_0, ..."
    ),
    config_name: str = typer.Option("compress", "--config-name", "-c", help="Experiment YAML (without .yaml)."),
) -> None:
    """Quantize an HF causal LM (llm-compressor W8A8/W4A16/FP8, GGUF Q8_0/Q4_K_M) and report size and perplexity."""
    with reported():
        from flagscale.compress import main as compress_main
        from flagscale.serve.oneclick import compose_for

        code = compress_main(compose_for(config, config_name, list(overrides or []), task="compress"))
    raise typer.Exit(code)
