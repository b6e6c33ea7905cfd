"""`flagscale` / `python -m flagscale`: a cached `patch apply` is answered before the full CLI loads."""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:3] == ["patch", "apply"]:
        from flagscale.fastpath import cached_apply

        code = cached_apply(sys.argv[2:])
        if code is not None:
            sys.exit(code)
    from flagscale.cli import run

    run()


if __name__ == "__main__":
    main()
