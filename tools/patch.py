#!/usr/bin/env python3
"""FlagScale's patch workflow for developers; the same commands as `flagscale patch`.

tools/patch.py checkout megatron /tmp/mc      # pinned upstream + one commit per patch
tools/patch.py export megatron /tmp/mc        # commits -> patches/megatron/ (only changed files)
tools/patch.py rebase megatron --to 0.17.0    # try every patch on a new release, report each one
tools/patch.py rebase megatron --to 0.17.0 --workspace /tmp/rb [--drop-upstreamed]
                                              # ... and stop at the first conflict there, in progress
tools/patch.py rebase --continue /tmp/rb      # after resolving (git add or commit): next conflict or finish
tools/patch.py rebase --abort /tmp/rb         # give up: removes the workspace, nothing was written
tools/patch.py check                          # does every (device, backend) cell apply?
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

if __name__ == "__main__":
    from flagscale.fastpath import cached_apply  # a cache hit, before the full CLI's imports

    code = cached_apply(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from flagscale.cli import patch_app, setup_logging

    setup_logging("-v" in sys.argv or "--verbose" in sys.argv)
    sys.argv = [a for a in sys.argv if a not in ("-v", "--verbose")]
    patch_app(prog_name="tools/patch.py")
