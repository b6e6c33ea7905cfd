"""`flagscale compress`: post-training quantization of a Hugging Face causal LM, with a before/after report.

Two tools, picked by `compress.scheme` (flagscale.compress.settings): llm-compressor recipes (W8A8 = SmoothQuant +
GPTQ, W4A16 = GPTQ, FP8_DYNAMIC) calibrated on a JSONL or the pre-training data, saving a compressed-tensors
checkpoint that transformers loads; and GGUF (Q8_0, Q4_K_M, ...) through the llama.cpp pin's converter and
llama-quantize. The work runs in a worker process (`python -m flagscale.compress.worker`), recorded in the run
folder like every FlagScale job; `action=dryrun` prints that command and the resolved settings.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from flagscale.compress.settings import CompressSettings, from_config
from flagscale.errors import LaunchError
from flagscale.runner import process
from flagscale.runner.config import action_of
from flagscale.runner.task import run_action


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


class CompressTask:
    """One compression (flagscale.runner.task.Task): a worker process, run attached to this terminal."""

    def __init__(self, settings: CompressSettings):
        self.settings = settings
        self.run_dir = Path(settings.run_dir)

    def plan(self) -> tuple[list[str], dict[str, str], Path]:
        check_environment(self.settings)
        spec = self.run_dir / "compress.json"
        return [sys.executable, "-m", "flagscale.compress.worker", str(spec)], dict(self.settings.envs), spec

    def dryrun(self) -> int:
        cmd, env, _ = self.plan()
        print(json.dumps({"cmd": cmd, "env": env, "settings": self.settings.to_json()}, indent=2))
        return 0

    def run(self) -> int:
        cmd, env, spec = self.plan()
        spec.parent.mkdir(parents=True, exist_ok=True)
        spec.write_text(json.dumps(self.settings.to_json(), indent=2) + "\n")
        return process.run_foreground(cmd, name="compress", run_dir=self.run_dir, env={**os.environ, **env})

    def stop(self) -> int:
        print(", ".join(process.stop(self.run_dir, None)) or "nothing was running")
        return 0

    def status(self) -> int:
        states = process.states(self.run_dir) if (self.run_dir / "pids").is_dir() else {}
        print("\n".join(f"{k}: {v}" for k, v in states.items()) or f"nothing was started in {self.run_dir}")
        return 0 if states else 1


def make_task(cfg) -> CompressTask:
    """The config's task, validated (model folder, scheme, data sources) before anything is written."""
    return CompressTask(from_config(cfg))


def main(cfg) -> int:
    action = action_of(cfg)
    return run_action(make_task(cfg), action)
