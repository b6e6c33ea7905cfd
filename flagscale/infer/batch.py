"""`python -m flagscale.infer.batch SPEC.json`: the worker process of `flagscale infer`.

Reads the prompts, generates with the configured engine, and writes the output JSONL atomically (a
failed run leaves no half-written file).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

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
    from flagscale.infer.engines import generate

    settings = InferSettings.from_json(json.loads(Path(argv[0]).read_text()))
    prompts = read_prompts(settings.prompts)
    out = Path(settings.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            for record in generate(settings, prompts):
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {count} completions to {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
