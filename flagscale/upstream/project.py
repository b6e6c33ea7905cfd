"""Where a FlagScale checkout keeps its pins, patch series and device folders."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from flagscale.errors import ConfigError
from flagscale.upstream.pins import Pins, load_pins

PINS_FILE = Path("third_party") / "upstreams.toml"


@dataclass(frozen=True)
class Project:
    root: Path

    @classmethod
    def find(cls, root: Path | str | None = None) -> Project:
        """The checkout at `root`, else $FLAGSCALE_ROOT, else the nearest parent of the cwd holding the pins."""
        if root is None:
            root = os.environ.get("FLAGSCALE_ROOT")
        if root is not None:
            root = Path(root).resolve()
            if not (root / PINS_FILE).is_file():
                raise ConfigError(f"{root}: not a FlagScale checkout (no {PINS_FILE})")
            return cls(root)
        # A checkout above the cwd, the checkout this module lives in, or the data an installed wheel carries.
        package = Path(__file__).resolve().parents[1]  # the flagscale package (this is flagscale/upstream/)
        for candidate in (Path.cwd(), *Path.cwd().parents, package.parent, package / "_project"):
            if (candidate / PINS_FILE).is_file():
                return cls(candidate)
        raise ConfigError(f"no FlagScale checkout found (looked for {PINS_FILE} above {Path.cwd()}); pass --root")

    @cached_property
    def pins(self) -> Pins:
        return load_pins(self.root / PINS_FILE)

    def common_series_dir(self, backend: str) -> Path:
        return self.root / "patches" / backend

    def device_series_dir(self, device: str, backend: str) -> Path:
        return self.root / "hardware" / device / "patches" / backend

    @property
    def devices(self) -> list[str]:
        hardware = self.root / "hardware"
        return sorted(p.name for p in hardware.iterdir() if (p / "device.toml").is_file()) if hardware.is_dir() else []
