"""Issue 14's tiny random-weight models, made once by tools/make_tiny_media.py and shared by every test.

Each builder takes the session's `mm_env` (tests/multimodal_env.py) and returns the model's folder. The folders
live in $FLAGSCALE_TEST_CACHE/media-models/<hash of tools/make_tiny_media.py>/, so editing the tool remakes
them; a file lock lets parallel sessions share one build, and a folder is renamed into place only once complete.

    from media_models import tiny_vlm, tiny_flux
    def test_x(mm_env):
        folder = tiny_vlm(mm_env)       # LLaVA: AutoProcessor + AutoModelForImageTextToText
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import filelock
from conftest import REPO_ROOT, real_cache_dir

TOOL = REPO_ROOT / "tools" / "make_tiny_media.py"


def _root() -> Path:
    key = hashlib.sha256(TOOL.read_bytes()).hexdigest()[:16]
    return real_cache_dir() / "media-models" / key


def tiny_model(mm_env, kind: str, *args: str) -> Path:
    """The folder of `tools/make_tiny_media.py KIND OUT ARGS`, built on first use."""
    name = "-".join([kind, *(a.lstrip("-") for a in args)])
    out = _root() / name
    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(out) + ".lock"):
        if out.is_dir():  # another session built it while this one waited
            return out
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        result = mm_env.run(["python", TOOL, kind, partial, *args], timeout=600)
        assert result.returncode == 0, f"make_tiny_media.py {kind} failed:\n{result.stderr[-4000:]}"
        partial.rename(out)
    return out


def tiny_vlm(mm_env) -> Path:
    """LLaVA (CLIP vision, Qwen2 text, 64 hidden): images become 16 tokens."""
    return tiny_model(mm_env, "vlm")


def tiny_llm(mm_env) -> Path:
    """Qwen2 causal LM (64 hidden, 2 layers) with a ChatML chat template."""
    return tiny_model(mm_env, "llm")


def tiny_flux(mm_env, *args: str) -> Path:
    """FluxPipeline (1 + 1 blocks, 2 heads x 16); `args` are the tool's flux options (--layers 4 ...)."""
    return tiny_model(mm_env, "flux", *args)


def tiny_sd(mm_env) -> Path:
    """StableDiffusionPipeline with a two-level UNet (8, 16 channels)."""
    return tiny_model(mm_env, "sd")


def tiny_wan(mm_env) -> Path:
    """WanPipeline (2 layers, 2 heads x 12): 4k+1 frames, sides multiples of 16."""
    return tiny_model(mm_env, "wan")
