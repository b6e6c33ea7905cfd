"""The node agent: what `flagscale train` runs over ssh on every node of a multi-node job.

    python -m flagscale.train.node start  --run-dir D --name node1 -- bash D/scripts/node1.sh
    python -m flagscale.train.node mark   --run-dir D --name node1     (a stop is coming: exits read as stopped)
    python -m flagscale.train.node stop   --run-dir D --name node1 [--timeout 15]
    python -m flagscale.train.node status --run-dir D --name node1     (+ the node's heartbeats)
    python -m flagscale.train.node diagnose --run-dir D --name node1 --iterations JSON --log-start JSON

It starts, stops and reports the node's own processes with `flagscale.runner.process`, so pid records,
logs and exit statuses live on the node, exactly as for a local run. It answers one JSON line; errors
are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from flagscale.errors import reported
from flagscale.runner import heartbeat, process
from flagscale.runner.diagnose import diagnose_crash
from flagscale.runner.monitor import rank_logs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flagscale.train.node")
    parser.add_argument("action", choices=("start", "mark", "stop", "status", "diagnose"))
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--timeout", type=float, default=15.0)
    parser.add_argument("--iterations", default="{}", help="diagnose: {rank: last heartbeat iteration}")
    parser.add_argument("--log-start", default="{}", help='diagnose: {"node": offset, "ranks": {rank: offset}}')
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)  # the command after -- is never parsed as options
    args, cmd = parser.parse_args(argv[:cut]), argv[cut + 1 :]

    with reported():  # one `error: ...` line on stderr and exit status 2, which the launcher reads back
        if args.action == "start":
            if not cmd:
                raise SystemExit("start needs a command after --")
            node = int(args.name[4:]) if args.name[4:].isdigit() else None
            for path in heartbeat.folder(args.run_dir).glob(f"node{node}-rank*.json"):
                path.unlink(missing_ok=True)  # a new attempt: the last one's heartbeats are no progress of it
            # where this attempt's output begins in the (appended) logs: what a diagnosis reads
            log = args.run_dir / "logs" / f"{args.name}.log"
            begins = {"log_start": log.stat().st_size if log.exists() else 0}
            begins["rank_log_start"] = {r: p.stat().st_size for r, p in rank_logs(args.run_dir).items()}
            answer = {**asdict(process.start(cmd, name=args.name, run_dir=args.run_dir)), **begins}
        elif args.action == "mark":  # phase 1 of a multi-node stop: see process.mark_stopping
            answer = {"marked": process.mark_stopping(args.run_dir, [args.name])}
        elif args.action == "stop":
            known = {r.name for r in process.records(args.run_dir)}
            stopped = process.stop(args.run_dir, [args.name], timeout=args.timeout) if args.name in known else []
            answer = {"stopped": stopped}
        elif args.action == "diagnose":
            starts = json.loads(args.log_start)
            answer = diagnose_crash(
                args.name,
                args.run_dir / "logs" / f"{args.name}.log",
                process.exit_status(args.run_dir, args.name),
                rank_logs(args.run_dir),
                {int(r): i for r, i in json.loads(args.iterations).items()},
                int(starts.get("node", 0)),
                {int(r): int(o) for r, o in starts.get("ranks", {}).items()},
            ).as_dict()
        else:
            node = int(args.name[4:]) if args.name[4:].isdigit() else None  # this node's ranks only
            beats = [h for h in heartbeat.read_all(args.run_dir) if node is None or h.get("node") == node]
            answer = {args.name: process.state(args.run_dir, args.name), "heartbeats": beats}
    print(json.dumps(answer, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
