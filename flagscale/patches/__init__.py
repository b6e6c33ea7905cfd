"""Patch series: the strict parser, `series` files, the apply engine, patched trees, and the devtool workflow."""
