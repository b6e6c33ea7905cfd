"""`patch apply BACKEND [--device D] [--source auto|sdist] [--root R]` on a cache hit, answered before the
full command line (typer, rich: ~0.15 s of imports) loads, so a hit costs well under 0.1 s.

Anything else, a miss included, returns None and the full CLI runs (with its progress and errors).
"""

from __future__ import annotations

import argparse
import sys


def cached_apply(argv: list[str]) -> int | None:
    if not argv or argv[0] != "apply":
        return None
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    parser.add_argument("backend")
    parser.add_argument("--device", "-d")
    parser.add_argument("--source", default="auto")
    parser.add_argument("--root")
    try:
        args, rest = parser.parse_known_args(argv[1:])
    except (argparse.ArgumentError, SystemExit):
        return None
    if rest or args.source not in ("auto", "sdist"):
        return None  # a DEST folder, --help, -v, another source: the full CLI
    from pathlib import Path

    from flagscale.errors import FlagScaleError
    from flagscale.patches.tree import cached_patched_tree
    from flagscale.upstream.project import Project
    from flagscale.upstream.target import Target

    try:
        project = Project.find(Path(args.root) if args.root else None)
        device = args.device
        if device is not None and not (project.root / "hardware" / device / "device.toml").is_file():
            return None  # an alias or a typo: the full CLI resolves or reports it (loading every manifest)
        tree = cached_patched_tree(Target.of(project, args.backend, device, args.source))
    except FlagScaleError:
        return None  # the full CLI reports it in its own words
    if tree is None:
        return None
    print(f"{len(tree.patches)} patch(es) on {tree.source.origin} (cached)", file=sys.stderr)
    print(tree.path)
    return 0
