"""wait_until: returns the first truthy value, names what and the last value on timeout, and stops
early when the watched process has died; wait_cpu_quiet tells a computing process from an idle one."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from vmsh.harness.waiting import WaitTimeout, cpu_time, wait_cpu_quiet, wait_until


def test_returns_the_first_truthy_value() -> None:
    values = iter([0, None, "", [], 7, 8])
    assert wait_until(lambda: next(values), 5, "a number", interval=0) == 7


def test_timeout_names_what_and_the_last_value() -> None:
    calls = []

    def predicate() -> list[int]:
        calls.append(1)
        return []

    start = time.monotonic()
    with pytest.raises(WaitTimeout, match=r"waiting for the queue to fill: nothing after 0.2 s \(last value \[\]\)"):
        wait_until(predicate, 0.2, "the queue to fill", interval=0.01)
    assert time.monotonic() - start >= 0.2
    assert len(calls) > 2, "polled more than once"


def test_a_timeout_is_an_assertion_error() -> None:
    with pytest.raises(AssertionError):
        wait_until(lambda: False, 0, "never")


def test_a_dead_process_ends_the_wait_with_its_status_and_stderr() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"],
                            stderr=subprocess.PIPE)
    try:
        proc.wait(30)
        start = time.monotonic()
        with pytest.raises(WaitTimeout, match=r"(?s)waiting for a socket: the process exited with status 3.*boom"):
            wait_until(lambda: False, 60, "a socket", process=proc)
        assert time.monotonic() - start < 5, "did not wait for the deadline"
    finally:
        assert proc.stderr is not None
        proc.stderr.close()


def test_a_state_reached_just_before_exiting_counts() -> None:
    seen = iter([False, True])  # false while the status is read, true on the second look

    assert wait_until(lambda: next(seen), 60, "the file", process=lambda: 0) is True


def test_an_exit_status_function_is_a_process() -> None:
    with pytest.raises(WaitTimeout, match="exited with status -9"):
        wait_until(lambda: None, 60, "the guest", process=lambda: -9)


def test_a_running_process_does_not_end_the_wait() -> None:
    ticks = iter(range(100))
    assert wait_until(lambda: next(ticks) == 3, 5, "the third tick", interval=0, process=lambda: None)


def test_cpu_quiet_tells_a_busy_process_from_an_idle_one() -> None:
    # a busy thread beside an idle main thread: every thread's time counts
    busy = subprocess.Popen([sys.executable, "-c", "import threading, time\n"
                             "threading.Thread(target=lambda: [0 for _ in iter(int, 1)], daemon=True).start()\n"
                             "time.sleep(60)"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not wait_cpu_quiet(busy.pid, 1.0, window=0.2)
        assert cpu_time(busy.pid) > 0.3
        assert wait_cpu_quiet(idle.pid, 10, window=0.2)  # once its start-up is over
    finally:
        for proc in (busy, idle):
            proc.kill()
            proc.wait()
    assert cpu_time(busy.pid) == 0.0  # gone
