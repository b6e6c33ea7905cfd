"""Wheels: each backend's patched wheel, FlagScale's device wheel, wheel rewriting, install and doctor."""
