"""Upstream pins and their sources: `third_party/upstreams.toml`, the checkout, the package index, the cache."""
