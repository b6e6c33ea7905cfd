"""The per-chip CI matrix: one cell per (device, backend) of the hardware registry.

`flagscale ci matrix` prints it as the JSON a GitHub Actions `strategy.matrix` takes through
`fromJSON(...)`: an object with an `include` list. Every cell is patch-checked and built; a cell whose
device names runners (`[ci] runs_on`) is also run there, if its backend is one CI runs on the device.
"""

from __future__ import annotations

import json
import shlex

from flagscale.hardware.registry import PLAIN_RUNNER, Device, load_devices, resolve_device
from flagscale.upstream.project import Project


def cell(device: Device, backend: str) -> dict:
    build = device.build_for(backend)
    run = backend in device.run_backends
    return {
        "name": f"{device.name}/{backend}",
        "device": device.name,
        "backend": backend,
        "vendor": device.vendor,
        "torch_device": device.torch_device,
        "torch_extension": device.torch_extension,
        "collective": device.collective,
        "visible_devices_env": device.visible_devices_env,
        "platform_plugin": build.platform_plugin,
        "toolchain": build.toolchain,
        # A patch check needs only Python: any plain runner. A build that compiles device code needs
        # the vendor's toolchain, so it runs where the chip is.
        "check_on": list(PLAIN_RUNNER),
        "build_on": list(device.ci.runs_on) if build.toolchain and device.ci.runs_on else list(PLAIN_RUNNER),
        "buildable_here": build.toolchain is None,
        "runs_on": list(device.ci.runs_on),
        "run": run,
        # Runs end to end on a plain machine (no chip): the CPU device's run cells.
        "runnable_here": run and device.runs_anywhere,
        "smoke": smoke_command(device, backend),
    }


def smoke_command(device: Device, backend: str) -> str:
    """A one-line check, run after installing the cell's wheels, that the device's code path is the one
    the manifest names (for Megatron: the device accessor's device type and collective backend)."""
    if backend == "megatron" and device.torch_device and device.collective:
        expected = f"({json.dumps(device.torch_device)}, {json.dumps(device.collective)})"
        code = (
            "from megatron.core import device_utils as d; "
            "got = (d.get_device_type(), d.default_collective_backend()); "
            f"assert got == {expected}, got; print(*got)"
        )
    elif backend == "vllm":
        code = "import vllm; from vllm.platforms import current_platform as p; print(vllm.__version__, p.device_type)"
    elif backend == "sglang":
        code = "import sglang; print(sglang.__version__)"
    elif backend == "llama.cpp":
        code = "import llama_cpp; print(llama_cpp.__version__, llama_cpp.llama_supports_gpu_offload())"
    else:
        code = f"import importlib.metadata as m; print(m.version({json.dumps(backend)}))"
    return f"python -c {shlex.quote(code)}"


def matrix(project: Project, device: str | None = None, backend: str | None = None, only_run: bool = False) -> dict:
    """`{"include": [cell, ...]}` over the registry, in device then backend order."""
    devices = load_devices(project) if device is None else {(d := resolve_device(project, device)).name: d}
    wanted = project.pins.resolve(backend).backend if backend else None
    cells = [cell(dev, b) for dev in devices.values() for b in dev.backends if wanted in (None, b)]
    if only_run:
        cells = [c for c in cells if c["run"]]
    return {"include": cells}


def github_outputs(project: Project, device: str | None = None, backend: str | None = None) -> str:
    """`name=value` lines for `$GITHUB_OUTPUT`: the full matrix, the run matrix and their sizes."""
    full = matrix(project, device, backend)
    run = {"include": [c for c in full["include"] if c["run"]]}

    def compact(value: dict) -> str:
        return json.dumps(value, separators=(",", ":"), sort_keys=True)

    return (
        f"matrix={compact(full)}\n"
        f"count={len(full['include'])}\n"
        f"run_matrix={compact(run)}\n"
        f"run_count={len(run['include'])}\n"
    )
