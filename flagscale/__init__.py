"""FlagScale: pinned upstreams + reviewed patches -> device-specific builds, and one front door to run them."""

__version__ = "0.1.0"
