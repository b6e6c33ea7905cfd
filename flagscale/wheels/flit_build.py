"""FlagScale's own wheel, sdist and metadata, built by flit_core from `pyproject.toml`.

`[project]` declares `version` and `dependencies` dynamic (PEP 621): a device build adds a `+<device>` label
and Requires-Dist lines (the patched backend wheels, the device's runtime requirements), and frontends that
read static metadata (uv) must not trust a list the backend changes. flit_core takes a dynamic version from
`flagscale.__version__` but cannot make dependencies dynamic, so the base list lives in
`[tool.flagscale] dependencies` and is handed to flit here, as if it were static.
"""

from __future__ import annotations

import io
import os
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from flagscale.errors import BuildError

PYPROJECT = "pyproject.toml"


def pyproject(root: Path) -> dict[str, Any]:
    return tomllib.loads((root / PYPROJECT).read_text(encoding="utf-8"))


def tool_settings(root: Path) -> dict[str, Any]:
    """`[tool.flagscale]` of the project's pyproject.toml (the base dependencies)."""
    return pyproject(root).get("tool", {}).get("flagscale", {})


def _flit_config(root: Path):
    """flit's view of pyproject.toml: the base dependencies as a static list."""
    from flit_core.config import prep_toml_config

    data = pyproject(root)
    project = dict(data["project"])
    if "dependencies" in project.get("dynamic", ()):
        project["dynamic"] = [f for f in project["dynamic"] if f != "dependencies"]
        project["dependencies"] = tool_settings(root).get("dependencies", [])
    return prep_toml_config({**data, "project": project}, root / PYPROJECT)


def flit_wheel(root: Path, wheel_directory: str, *, editable: bool = False) -> str:
    """Build FlagScale's plain wheel (editable: a .pth to `root`) into `wheel_directory`; its file name."""
    from flit_core import common
    from flit_core.wheel import WheelBuilder

    config = _flit_config(root)
    module = common.Module(config.module, root)
    metadata = common.make_metadata(module, config)
    fd, tmp = tempfile.mkstemp(suffix=".whl", dir=wheel_directory)
    try:
        with os.fdopen(fd, "w+b") as fp:
            builder = WheelBuilder(root, module, metadata, config.entrypoints, fp, config.data_directory)
            builder.build(editable)
        os.replace(tmp, Path(wheel_directory) / builder.wheel_filename)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return builder.wheel_filename


def flit_sdist(root: Path, sdist_directory: str, version: str | None = None) -> str:
    """FlagScale's sdist: the checkout's package, backend, pins, patches and device manifests.

    `version` (`0.1.0+cpu` for -C device=cpu) is the version the wheel built from this sdist with the same
    settings will have: frontends that build the wheel from the sdist (uv build, python -m build) may check."""
    from flit_core import common
    from flit_core.sdist import SdistBuilder

    config = _flit_config(root)
    module = common.Module(config.module, root)
    metadata = common.make_metadata(module, config)
    metadata.version = version or metadata.version
    builder = SdistBuilder(
        module,
        _dynamic_requires(common.Metadata)(dict(vars(metadata))),
        root,
        config.reqs_by_extra,
        config.entrypoints,
        [PYPROJECT, *config.referenced_files],
        config.data_directory,
        config.sdist_include_patterns,
        config.sdist_exclude_patterns,
    )
    return builder.build(Path(sdist_directory)).name


def _dynamic_requires(base: type) -> type:
    """flit's metadata, saying `Dynamic: Requires-Dist` (core metadata 2.2): a wheel built from the sdist
    with a device adds requirements, so a frontend must not take the sdist's PKG-INFO list as final."""

    class Metadata(base):
        def write_metadata_file(self, fp) -> None:
            out = io.StringIO()
            super().write_metadata_file(out)
            head, sep, body = out.getvalue().partition("\n\n")
            head = head.rstrip("\n") + "\nDynamic: Requires-Dist\n"
            fp.write(head + ("\n" + body if sep else ""))

    return Metadata


def dist_info_of(wheel: Path, metadata_directory: Path) -> str:
    """Unpack a wheel's .dist-info folder into `metadata_directory` (PEP 517 prepare_metadata); its name."""
    import zipfile

    with zipfile.ZipFile(wheel) as zin:
        names = [n for n in zin.namelist() if n.split("/")[0].endswith(".dist-info")]
        if not names:
            raise BuildError(f"{wheel.name} has no .dist-info folder")
        for name in names:
            zin.extract(name, metadata_directory)
    return names[0].split("/")[0]
