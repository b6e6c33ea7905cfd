"""wait_until: the one polling loop of the runner (real clock, real sleeps; each test well under a second)."""

from __future__ import annotations

import itertools
import time

import pytest

from flagscale.runner.wait import wait_until


def test_returns_the_first_true_value_of_the_condition():
    answers = iter([None, 0, "", "ready", "later"])
    assert wait_until(lambda: next(answers), timeout=5, interval=0.01) == "ready"
    assert next(answers) == "later"  # not called once it was true


def test_polls_every_interval_until_true():
    calls = []

    def third_time() -> bool:
        calls.append(time.monotonic())
        return len(calls) == 3

    assert wait_until(third_time, timeout=5, interval=0.05) is True
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert len(gaps) == 2 and all(0.05 <= g < 0.5 for g in gaps)


def test_a_passed_deadline_returns_false_without_an_error():
    start = time.monotonic()
    calls = []
    assert wait_until(lambda: calls.append(1), timeout=0.2, interval=0.05) is False
    assert 0.2 <= time.monotonic() - start < 1.0
    assert 3 <= len(calls) <= 6  # once at 0, then after each interval until the deadline


def test_a_passed_deadline_raises_the_callers_error_built_then():
    seen = []

    def too_slow() -> TimeoutError:
        return TimeoutError(f"not ready after {len(seen)} tries")

    with pytest.raises(TimeoutError, match=r"not ready after [3-9] tries"):
        wait_until(lambda: seen.append(1), timeout=0.1, interval=0.03, timeout_error=too_slow)


def test_the_condition_runs_once_even_with_no_time_left():
    assert wait_until(lambda: 42, timeout=0, interval=1) == 42
    calls = []
    assert wait_until(lambda: calls.append(1), timeout=0, interval=1) is False and calls == [1]


def test_an_error_from_the_condition_ends_the_wait_at_once():
    def died() -> bool:
        raise RuntimeError("the server exited before it was ready")

    start = time.monotonic()
    with pytest.raises(RuntimeError, match="exited before it was ready"):
        wait_until(died, timeout=10, interval=1, timeout_error=lambda: AssertionError("not this one"))
    assert time.monotonic() - start < 0.5


def test_no_timeout_waits_as_long_as_it_takes():
    end = time.monotonic() + 0.2
    assert wait_until(lambda: time.monotonic() >= end, timeout=None, interval=0.02) is True
    assert time.monotonic() >= end
