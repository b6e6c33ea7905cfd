"""flagscale.runner.diagnose on logs as torchrun and its ranks write them (no torch needed: it reads text).

The signal case for real (a rank SIGKILLed under torchrun) is in tests/test_fault_tolerance.py; here each known
signature, the "Root Cause" section, the part of an appended log that belongs to this attempt, and the choice
among several failed nodes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flagscale.runner.diagnose import diagnose_crash, diagnose_hang, last_traceback, most_likely

ROOT_CAUSE = """\
Traceback (most recent call last):
  File "/venv/bin/torchrun", line 8, in <module>
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
flagscale.train.driver FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-30_18:48:53
  host      : node-a
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 30379)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 30379
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-30_18:48:53
  host      : node-a
  rank      : {rank} (local_rank: 1)
  exitcode  : {code} (pid: 30380)
  error_file: <N/A>
  traceback : {traceback}
============================================================
"""


def _rank_error(line: str) -> str:
    return (
        "[2026-11-30 18:48:50 rank1]  iteration        3/      20 | lm loss: 4.1E+00 |\n"
        "[rank1]: Traceback (most recent call last):\n"
        '[rank1]:   File "/x/driver.py", line 12, in main\n'
        f"[rank1]: {line}\n"
    )


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "oom"),
        (
            "RuntimeError: [Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9, "
            "OpType=ALLREDUCE) ran for 600000 milliseconds before timing out.",
            "collective_timeout",
        ),
        ("torch.distributed.DistNetworkError: The client socket has failed to connect to [node-a]:29500", "rendezvous"),
        ("RuntimeError: CUDA error: an illegal memory access was encountered", "device_error"),
        ("FileNotFoundError: [Errno 2] No such file or directory: '/data/corpus_text_document.bin'", "missing_file"),
        ("ValueError: micro batch size must divide the global batch", "traceback"),
        (
            "flagscale.errors.ConfigError: checkpoint /ckpt/iter_0000000 holds model weights only (as `flagscale "
            "checkpoint import` writes them): set train.system.checkpoint.finetune=true to start training from them",
            "config",
        ),
    ],
)
def test_signatures_from_the_failed_rank_log(tmp_path: Path, error: str, kind: str):
    node_log, rank_log = tmp_path / "node0.log", tmp_path / "rank1.log"
    node_log.write_text(ROOT_CAUSE.format(rank=1, code=1, traceback="To enable traceback see: ..."))
    rank_log.write_text(_rank_error(error))
    d = diagnose_crash("node0", node_log, 1, {1: rank_log}, {0: 3, 1: 3})
    assert (d.kind, d.rank, d.node, d.iteration, d.log) == (kind, 1, "node0", 3, str(rank_log)), d
    assert d.message.startswith("rank 1 on node0 at iteration 3: ")
    assert error.split(":")[-1].strip()[:20] in d.message


def test_the_root_cause_signal_not_the_ranks_torchrun_terminated(tmp_path: Path):
    node_log = tmp_path / "node0.log"
    node_log.write_text(ROOT_CAUSE.format(rank=1, code=-9, traceback="Signal 9 (SIGKILL) received by PID 30380"))
    d = diagnose_crash("node0", node_log, 1, {}, {0: 12, 1: 12})
    assert (d.kind, d.rank, d.iteration) == ("signal", 1, 12) and d.message.endswith("killed by SIGKILL"), d


def test_only_this_attempts_part_of_an_appended_log(tmp_path: Path):
    node_log, rank_log = tmp_path / "node0.log", tmp_path / "rank0.log"
    rank_log.write_text(_rank_error("torch.OutOfMemoryError: CUDA out of memory"))  # the last attempt's
    start = rank_log.stat().st_size
    with rank_log.open("a") as f:
        f.write(_rank_error("KeyError: 'lm loss'"))
    node_log.write_text(ROOT_CAUSE.format(rank=0, code=1, traceback="To enable traceback see: ..."))
    d = diagnose_crash("node0", node_log, 1, {0: rank_log}, {0: 5}, 0, {0: start})
    assert d.kind == "traceback" and "KeyError: 'lm loss'" in d.message, d


def test_a_torchrun_that_printed_nothing(tmp_path: Path):
    node_log = tmp_path / "node0.log"
    node_log.write_text("flagscale: before_start failed (3)\n")
    d = diagnose_crash("node0", node_log, 3, {}, {})
    assert d.kind == "exit" and "exit status 3" in d.message and "before_start failed" in d.message, d


def test_several_failed_nodes_the_cause_wins(tmp_path: Path):
    logs = {}
    for node, text in (
        ("node0", ROOT_CAUSE.format(rank=0, code=1, traceback="...")),
        ("node1", ROOT_CAUSE.format(rank=1, code=-9, traceback="Signal 9 (SIGKILL) received by PID 7")),
    ):
        logs[node] = tmp_path / f"{node}.log"
        logs[node].write_text(text)
    (tmp_path / "rank0.log").write_text(_rank_error("RuntimeError: Connection closed by peer [127.0.0.2]:1234"))
    found = [diagnose_crash(n, p, 1, {0: tmp_path / "rank0.log"}, {0: 12, 1: 12}) for n, p in logs.items()]
    assert [d.kind for d in found] == ["traceback", "signal"]
    assert most_likely(found).node == "node1"


def test_hang_names_the_rank_behind():
    beats = [
        {"rank": 0, "node": 0, "host": "elsewhere", "pid": 1, "iteration": 8, "phase": "train"},
        {"rank": 1, "node": 1, "host": "elsewhere", "pid": 2, "iteration": 7, "phase": "train"},
    ]
    d = diagnose_hang(beats, {0: 50.0, 1: 61.0}, 60.0, "here")
    assert (d.kind, d.rank, d.node, d.iteration) == ("hang", 1, "node1", 7) and "made no progress" in d.message
    assert "start-up" in diagnose_hang([], {}, 60.0, "here").message


def test_last_traceback_skips_frames_and_carets():
    text = _rank_error("AssertionError: shapes differ") + "[rank1]:     ^^^^^^\n"
    assert last_traceback(text) == "AssertionError: shapes differ"
