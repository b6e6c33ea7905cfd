"""Engine arguments checked against what the installed engine accepts, without importing it."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

from flagscale.errors import ConfigError, LaunchError
from flagscale.settings import closest

# engine -> (package, file, class, method): the keyword arguments of that method are the engine's arguments
CONSTRUCTORS = {
    "llama.cpp": ("llama_cpp", "llama.py", "Llama", "__init__"),
    "vllm": ("vllm", "engine/arg_utils.py", "EngineArgs", None),  # LLM(**kwargs) -> EngineArgs(**kwargs)
    "sglang": ("sglang", "srt/server_args.py", "ServerArgs", None),  # Engine(**kwargs) -> ServerArgs(**kwargs)
}


def accepted(engine: str) -> set[str]:
    package, relative, cls, method = CONSTRUCTORS[engine]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LaunchError(f"{engine} is not installed here: flagscale install --backend={engine}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if method is None and isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
                elif method and isinstance(item, ast.FunctionDef) and item.name == method:
                    names |= {a.arg for a in item.args.args + item.args.kwonlyargs if a.arg != "self"}
    if engine == "vllm":
        names |= {"tokenizer", "trust_remote_code", "seed"}  # LLM's own keywords
    return names


def check_engine_args(engine: str, args: dict) -> None:
    if engine not in CONSTRUCTORS:  # transformers, diffusers: from_pretrained takes **kwargs, checked when loading
        return
    known = accepted(engine)
    for key in args:
        if key not in known:
            near = closest(key, sorted(known), cutoff=0.75)
            raise ConfigError(
                f"infer.engine_args.{key}: {engine} takes no such argument"
                + (f" (did you mean {near}?)" if near else "")
            )
