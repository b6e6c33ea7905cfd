"""Where the llama.cpp tools of the installed backend wheel live (llama-server, llama-quantize, ...).

The cpu wheel carries them in `<site-packages>/bin`, beside the `<site-packages>/lib` that holds llama.cpp's
shared libraries (RPATH `$ORIGIN/../lib`), not on PATH: the wheel is Python-version neutral and a binary in
the scripts folder could not find those libraries. So we ask the installed distribution's RECORD.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from flagscale.errors import LaunchError

DISTRIBUTION = "llama_cpp_python"
OVERRIDE_ENV = "FLAGSCALE_LLAMA_CPP_BIN"  # a folder holding the tools (a local llama.cpp build, for one)
INSTALL_HINT = "install the backend: flagscale install --backend=llama.cpp --device=cpu"


def _from_distribution(name: str) -> Path | None:
    import importlib.metadata as md

    try:
        files = md.distribution(DISTRIBUTION).files or []
    except md.PackageNotFoundError:
        return None
    for entry in files:
        if entry.parts[-2:] == ("bin", name):
            path = Path(entry.locate()).resolve()
            if path.is_file():
                return path
    return None


def llama_tool(name: str) -> Path:
    """The path of llama.cpp tool `name`: $FLAGSCALE_LLAMA_CPP_BIN, the installed wheel, then PATH."""
    folder = os.environ.get(OVERRIDE_ENV)
    if folder:
        candidate = Path(folder) / name
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            raise LaunchError(f"{OVERRIDE_ENV}={folder} has no executable {name}")
        return candidate
    found = _from_distribution(name)
    if found is not None:
        return found
    on_path = shutil.which(name)
    if on_path:
        return Path(on_path)
    raise LaunchError(f"{name} not found (not in the installed {DISTRIBUTION} wheel, not on PATH): {INSTALL_HINT}")
