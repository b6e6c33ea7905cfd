"""The transformers and diffusers engines of `flagscale infer`, in its worker process (flagscale.infer.batch).

transformers: prompts (with images) in batches through `hf_models.ChatModel` -> one JSONL record per prompt, as
the other engines write (prompt, completion, tokens, latency) plus the images and finish reason.

diffusers: prompts in batches through `hf_models.DiffusionModel` -> a folder of PNG files (text-to-image) or MP4
files (text-to-video), named by prompt number and seed, and its `index.jsonl` (prompt, seed, file, timings).
Everything is written to a temporary folder beside the output and moved in when the run succeeded: a failed run
leaves no half-written files.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flagscale.errors import ConfigError
from flagscale.infer.settings import InferSettings


# ---------------------------------------------------------------------------------------------- prompts
def read_records(path: str, engine: str) -> list[dict]:
    """The prompts file as records: a text line is {"prompt": line}; a JSON line needs "prompt" (or, for the
    transformers engine, "messages") and may carry "images" (transformers) or "seed" / "negative_prompt"
    (diffusers)."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if not line.lstrip().startswith("{"):
            records.append({"prompt": line})
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise ConfigError(f"{path}:{number}: not a JSON object") from None
        records.append(_checked(record, engine, f"{path}:{number}"))
    if not records:
        raise ConfigError(f"{path} holds no prompts")
    return records


def _checked(record: Any, engine: str, where: str) -> dict:
    wanted = '"prompt" or "messages"' if engine == "transformers" else '"prompt"'
    has_messages = engine == "transformers" and isinstance(record.get("messages"), list)
    if not isinstance(record, dict) or not (isinstance(record.get("prompt"), str) or has_messages):
        raise ConfigError(f"{where}: a JSON line needs a {wanted} field")
    images = record.get("images", [])
    if isinstance(images, str):
        images = [images]
    if engine != "transformers" and images:
        raise ConfigError(f'{where}: "images" are for the transformers engine (a vision-language model)')
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise ConfigError(f'{where}: "images" is a path or URL, or a list of them')
    seed = record.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ConfigError(f'{where}: "seed" is an integer >= 0')
    return {**record, "images": images} if images else record


def messages_of(record: dict) -> list[dict]:
    """OpenAI messages: the record's own, or one user message of its images and its prompt."""
    if "messages" in record:
        return record["messages"]
    parts: list[dict] = [{"type": "image_url", "image_url": {"url": url}} for url in record.get("images", [])]
    text = record["prompt"]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}] if parts else text}]


def batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def progress(total: int, what: str) -> Any:
    """A rich progress bar on stderr (stdout stays for results)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    bar.add_task(what, total=total)
    return bar


# ---------------------------------------------------------------------------------------------- transformers
def chat(settings: InferSettings, records: list[dict]) -> Iterator[dict]:
    from flagscale.infer import hf_models

    hf_models.quiet_loading()
    model = hf_models.load_chat_model(
        settings.model, dtype=settings.dtype, device=settings.device, model_args=settings.engine_args
    )
    base_dir = Path(settings.prompts).parent  # relative image paths are relative to the prompts file
    with progress(len(records), "generating") as bar:
        for batch in batches(records, settings.batch_size):
            try:
                results = model.chat_batch(
                    [messages_of(r) for r in batch],
                    max_tokens=settings.max_tokens,
                    temperature=settings.temperature,
                    top_p=settings.top_p,
                    seed=settings.seed,
                    stop=settings.stop,
                    base_dir=base_dir,
                )
            except hf_models.ImageInputError as exc:
                raise ConfigError(f"{settings.prompts}: {exc}") from None
            for record, result in zip(batch, results, strict=True):
                yield _chat_record(record, result)
            bar.advance(0, len(batch))


def _chat_record(record: dict, result: Any) -> dict:
    generate_s = result.timings["generate_s"]
    out = {
        "prompt": record.get("prompt", ""),
        "completion": result.text,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "finish_reason": result.finish_reason,
        "latency_s": result.timings["total_s"],
        "tokens_per_s": round(result.completion_tokens / generate_s, 3) if generate_s > 0 else None,
        "timings": result.timings,
    }
    if record.get("images"):
        out["images"] = record["images"]
    if "messages" in record:
        out["messages"] = record["messages"]
    return out


# ---------------------------------------------------------------------------------------------- diffusers
def load_pipeline(settings: InferSettings) -> Any:
    from flagscale.infer import hf_models

    hf_models.quiet_loading()
    model = hf_models.load_pipeline(
        settings.model,
        pipeline=settings.pipeline,
        dtype=settings.dtype,
        device=settings.device,
        components=settings.components,
        fps=settings.fps,
        load_args=settings.engine_args,
    )
    if settings.transformations:
        model.transform(settings.transformations, "infer.transformations")
    return model


def _steps(model: Any, settings: InferSettings) -> int:
    """The denoising steps of one batch: the configured ones, or the pipeline call's default."""
    import inspect

    if settings.steps:
        return settings.steps
    default = inspect.signature(model.pipe.__call__).parameters["num_inference_steps"].default
    return int(default) if isinstance(default, int) else 1


def diffuse(settings: InferSettings, records: list[dict]) -> int:
    """Generate every prompt's image or video into settings.output (a folder); returns how many were written."""
    model = load_pipeline(settings)
    out = Path(settings.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        index = list(_diffuse_into(tmp, model, settings, records))
        (tmp / "index.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in index))
        out.mkdir(exist_ok=True)
        for path in sorted(tmp.iterdir()):  # the files first, the index last: it names only files that exist
            if path.name != "index.jsonl":
                os.replace(path, out / path.name)
        os.replace(tmp / "index.jsonl", out / "index.jsonl")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return len(index)


def _diffuse_into(folder: Path, model: Any, settings: InferSettings, records: list[dict]) -> Iterator[dict]:
    from flagscale.infer import hf_models

    seeds = [r.get("seed", settings.seed + i) for i, r in enumerate(records)]
    numbered = list(enumerate(zip(records, seeds, strict=True)))
    call = {
        "width": settings.width,
        "height": settings.height,
        "steps": settings.steps,
        "guidance": settings.guidance,
        "num_frames": settings.num_frames,
        "extra": settings.call_args,
    }
    model.call_args(negative_prompt=settings.negative_prompt, **call)  # a key it does not take: before any work
    steps = _steps(model, settings)
    what = "video" if model.kind == "video" else "image"
    with progress(len(records) * steps, f"generating {len(records)} {what}s") as bar:
        # prompts with their own negative prompt go in batches of their own kind
        for batch in batches(numbered, settings.batch_size):
            groups: dict[str | None, list] = {}
            for item in batch:
                groups.setdefault(item[1][0].get("negative_prompt", settings.negative_prompt), []).append(item)
            for negative, group in groups.items():
                advance = _advancer(bar, len(group))
                try:
                    outputs = model.generate(
                        [r["prompt"] for _, (r, _) in group],
                        seeds=[s for _, (_, s) in group],
                        negative_prompt=negative,
                        on_step=advance,
                        **call,
                    )
                except ValueError as exc:  # the pipeline's own input checks (sizes, frames, lengths)
                    raise ConfigError(f"{model.class_name}: {str(exc).strip().splitlines()[0]}") from None
                for (number, (record, seed)), generation in zip(group, outputs, strict=True):
                    yield _save(folder, number, record, seed, generation, model, hf_models)


def _advancer(bar: Any, prompts: int) -> Any:
    """on_step of a batch: each denoising step moves the bar by the batch's prompts."""
    return lambda _step: bar.advance(0, prompts)


def _save(folder: Path, number: int, record: dict, seed: int, generation: Any, model: Any, hf_models: Any) -> dict:
    start = time.perf_counter()
    if model.kind == "video":
        name, data = f"{number:04d}-seed{seed}.mp4", hf_models.mp4_bytes(generation.images, model.fps)
    else:
        name, data = f"{number:04d}-seed{seed}.png", hf_models.png_bytes(generation.images[0])
    (folder / name).write_bytes(data)
    width, height = generation.images[0].size
    entry = {"prompt": record["prompt"], "seed": seed, "file": name, "width": width, "height": height}
    if model.kind == "video":
        entry.update(frames=len(generation.images), fps=model.fps)
    encode_s = round(time.perf_counter() - start, 6)
    entry["latency_s"] = generation.seconds
    entry["timings"] = {"generate_s": generation.seconds, "encode_s": encode_s}
    return entry
