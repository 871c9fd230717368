"""The device I/O thread: dispatch, pause/resume quiescing, a failing callback, stop."""

from __future__ import annotations

import os
import threading

import pytest

from vmsh.engine.io_loop import IoLoop


@pytest.fixture
def loop():
    lp = IoLoop("test-io")
    yield lp
    lp.stop()


def _efd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def test_callback_runs_on_the_loop_thread(loop):
    fd, seen = _efd(), []
    done = threading.Event()

    def cb():
        os.eventfd_read(fd)
        seen.append(threading.current_thread().name)
        done.set()

    loop.add(fd, cb)
    loop.start()
    os.eventfd_write(fd, 1)
    assert done.wait(5)
    assert seen == ["test-io"]
    os.close(fd)


def test_pause_holds_events_until_resume(loop):
    fd, hits = _efd(), []
    done = threading.Event()

    def cb():
        os.eventfd_read(fd)
        hits.append(1)
        done.set()

    loop.add(fd, cb)
    loop.start()
    loop.pause()
    os.eventfd_write(fd, 1)
    assert not done.wait(0.3)
    assert hits == []
    loop.resume()
    assert done.wait(5)
    assert hits == [1]
    os.close(fd)


def test_pause_waits_for_a_running_callback(loop):
    fd = _efd()
    entered, release, finished = threading.Event(), threading.Event(), threading.Event()

    def cb():
        os.eventfd_read(fd)
        entered.set()
        release.wait(5)
        finished.set()

    loop.add(fd, cb)
    loop.start()
    os.eventfd_write(fd, 1)
    assert entered.wait(5)
    pauser = threading.Thread(target=loop.pause)
    pauser.start()
    pauser.join(0.2)
    assert pauser.is_alive(), "pause returned while a callback was running"
    release.set()
    pauser.join(5)
    assert finished.is_set()
    loop.resume()
    os.close(fd)


def test_a_failing_callback_is_dropped_and_others_go_on(loop):
    bad, good = _efd(), _efd()
    done = threading.Event()

    def boom():
        os.eventfd_read(bad)
        raise RuntimeError("device bug")

    def ok():
        os.eventfd_read(good)
        done.set()

    loop.add(bad, boom)
    loop.add(good, ok)
    loop.start()
    os.eventfd_write(bad, 1)
    os.eventfd_write(good, 1)
    assert done.wait(5)
    os.close(bad)
    os.close(good)


def test_stop_while_paused_ends_the_thread():
    lp = IoLoop("test-io")
    lp.start()
    lp.pause()
    lp.stop()
    assert not lp._thread.is_alive()
