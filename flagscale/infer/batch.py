"""`python -m flagscale.infer.batch SPEC.json`: the worker process of `flagscale infer`.

Reads the prompts, generates with the configured engine, and writes the output JSONL atomically (a
failed run leaves no half-written file); the diffusers engine writes a folder of images or videos
(flagscale.infer.hf_batch). A FlagScaleError is one `error:` line and exit status 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from flagscale.errors import FlagScaleError, error_line
from flagscale.infer.settings import InferSettings


def read_prompts(path: str) -> list[str]:
    prompts = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                prompts.append(str(json.loads(line)["prompt"]))
            except (ValueError, KeyError):
                raise SystemExit(f'error: {path}:{number}: a JSON line needs a "prompt" field') from None
        else:
            prompts.append(line)
    if not prompts:
        raise SystemExit(f"error: {path} holds no prompts")
    return prompts


def main(argv: list[str]) -> int:
    settings = InferSettings.from_json(json.loads(Path(argv[0]).read_text()))
    try:
        return run(settings)
    except FlagScaleError as exc:
        print(error_line(exc), file=sys.stderr, flush=True)
        return exc.exit_code


def run(settings: InferSettings) -> int:
    from flagscale.infer import hf_batch

    if settings.engine == "diffusers":
        count = hf_batch.diffuse(settings, hf_batch.read_records(settings.prompts, settings.engine))
        print(f"wrote {count} files and index.jsonl to {settings.output}", flush=True)
        return 0
    if settings.engine == "transformers":
        records = hf_batch.read_records(settings.prompts, settings.engine)
        return write_jsonl(Path(settings.output), hf_batch.chat(settings, records))
    from flagscale.infer.engines import generate

    return write_jsonl(Path(settings.output), generate(settings, read_prompts(settings.prompts)))


def write_jsonl(out: Path, records) -> int:
    """The records to `out`, atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {count} completions to {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
