"""The unit the toolchain works on: one backend's pin in a checkout, for a device, from a source, in a cache."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from flagscale.upstream.cache import Cache
from flagscale.upstream.pins import Pin
from flagscale.upstream.project import Project


@dataclass(frozen=True)
class Target:
    """(checkout, pin, device, source, cache): what materializing, patching and building a cell need."""

    project: Project
    pin: Pin
    device: str | None = None  # a registry name (`hardware/<device>`); None: the common series alone
    source: str = "auto"  # auto | submodule | sdist | a local path
    cache: Cache = field(default_factory=Cache, compare=False)

    @classmethod
    def of(
        cls, project: Project, backend: str, device: str | None = None, source: str = "auto", cache: Cache | None = None
    ) -> Target:
        """The target of `backend` (a name or alias) in `project`."""
        return cls(project, project.pins.resolve(backend), device, source, cache or Cache())

    @property
    def backend(self) -> str:
        return self.pin.backend

    def with_pin(self, pin: Pin, source: str | None = None) -> Target:
        """The same cell on another pin (a rebase's new release)."""
        return replace(self, pin=pin, source=self.source if source is None else source)
