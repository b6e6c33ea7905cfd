"""The hardware registry (`hardware/<device>/device.toml`) and the per-chip CI matrix built from it."""
