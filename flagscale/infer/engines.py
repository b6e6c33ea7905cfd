"""Offline batch generation with each engine's own Python API, through one settings schema.

Runs inside the worker process (`python -m flagscale.infer.batch`), so the engine's heavy imports and its
accelerator runtime live there, never in the `flagscale` CLI.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from flagscale.infer.settings import InferSettings


def generate(settings: InferSettings, prompts: list[str]) -> Iterator[dict]:
    """One record per prompt: prompt, completion, prompt_tokens, completion_tokens, latency_s, tokens_per_s."""
    run = {"llama.cpp": _llama_cpp, "vllm": _vllm, "sglang": _sglang}[settings.engine]
    yield from run(settings, prompts)


def _record(prompt: str, text: str, prompt_tokens: int, completion_tokens: int, seconds: float) -> dict:
    return {
        "prompt": prompt,
        "completion": text,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "latency_s": round(seconds, 6),
        "tokens_per_s": round(completion_tokens / seconds, 3) if seconds > 0 else None,
    }


def llama_kwargs(settings: InferSettings) -> dict:
    return {"model_path": settings.model, "seed": settings.seed, "verbose": False, **settings.engine_args}


def _llama_cpp(settings: InferSettings, prompts: list[str]) -> Iterator[dict]:
    from llama_cpp import Llama

    llm = Llama(**llama_kwargs(settings))
    for prompt in prompts:
        start = time.perf_counter()
        out = llm.create_completion(
            prompt,
            max_tokens=settings.max_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            seed=settings.seed,
            stop=list(settings.stop) or None,
        )
        seconds = time.perf_counter() - start
        usage = out["usage"]
        yield _record(prompt, out["choices"][0]["text"], usage["prompt_tokens"], usage["completion_tokens"], seconds)


def vllm_objects(settings: InferSettings):
    """(LLM kwargs, SamplingParams kwargs): what `vllm.LLM(...)` and `SamplingParams(...)` receive."""
    return (
        {"model": settings.model, "seed": settings.seed, **settings.engine_args},
        {
            "max_tokens": settings.max_tokens,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "seed": settings.seed,
            "stop": list(settings.stop) or None,
        },
    )


def _vllm(settings: InferSettings, prompts: list[str]) -> Iterator[dict]:
    from vllm import LLM, SamplingParams

    llm_kwargs, sampling = vllm_objects(settings)
    llm = LLM(**llm_kwargs)
    start = time.perf_counter()
    outputs = llm.generate(prompts, SamplingParams(**sampling))  # one batch: the engine schedules it
    seconds = time.perf_counter() - start
    for prompt, out in zip(prompts, outputs, strict=False):
        yield _record(
            prompt, out.outputs[0].text, len(out.prompt_token_ids or []), len(out.outputs[0].token_ids), seconds
        )


def sglang_objects(settings: InferSettings):
    """(Engine kwargs, sampling_params): what `sglang.Engine(...)` and `.generate(...)` receive."""
    return (
        {"model_path": settings.model, "random_seed": settings.seed, **settings.engine_args},
        {
            "max_new_tokens": settings.max_tokens,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "stop": list(settings.stop) or None,
        },
    )


def _sglang(settings: InferSettings, prompts: list[str]) -> Iterator[dict]:
    import sglang

    engine_kwargs, sampling = sglang_objects(settings)
    engine = sglang.Engine(**engine_kwargs)
    try:
        start = time.perf_counter()
        outputs = engine.generate(prompts, sampling_params=sampling)
        seconds = time.perf_counter() - start
        for prompt, out in zip(prompts, outputs, strict=False):
            meta = out.get("meta_info", {})
            yield _record(prompt, out["text"], meta.get("prompt_tokens", 0), meta.get("completion_tokens", 0), seconds)
    finally:
        engine.shutdown()
