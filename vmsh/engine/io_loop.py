"""The device I/O thread: one epoll loop that serves the eventfds of every device.

Virtqueue kicks arrive as ioeventfds (the guest's write to a notify address signals an
eventfd inside KVM, no exit to user space), host-side input (a tap, a socket) as readable
fds. Both are served here, off the vCPU threads (README.md, "PCI and virtio").

The loop can be paused: ``pause`` returns once no callback is running and none will start
until ``resume``, which is how a paused VM's devices are quiesced for a snapshot. Events
that arrive meanwhile stay pending in their fds and are served after ``resume``.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable

from vmsh.engine import seccomp

LOG = logging.getLogger(__name__)

Callback = Callable[[], None]


class IoLoop:
    """Dispatch readable fds to callbacks on one thread.

    Example::

        loop = IoLoop("vmsh-io")
        loop.add(efd, lambda: handle(os.eventfd_read(efd)))
        loop.start()
        ...
        loop.stop()
    """

    def __init__(self, name: str = "vmsh-io") -> None:
        self.name = name
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callback] = {}
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._thread: threading.Thread | None = None
        self._stopping = False
        #: held by the loop while it dispatches; ``pause`` takes it to keep the loop out
        self._dispatch = threading.Lock()
        self._paused = threading.Event()
        self._paused.set()  # released by start/resume

    def add(self, fd: int, callback: Callback) -> None:
        """Call ``callback`` (on the loop thread) whenever ``fd`` is readable."""
        self._callbacks[fd] = callback
        self._epoll.register(fd, select.EPOLLIN)

    def remove(self, fd: int) -> None:
        """Stop watching ``fd`` (does nothing if it is not watched)."""
        if self._callbacks.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    @property
    def started(self) -> bool:
        """True once :meth:`start` ran."""
        return self._thread is not None

    def start(self) -> None:
        """Start the thread (once)."""
        if self._thread is None:
            self._paused.clear()
            self._thread = threading.Thread(target=seccomp.confined(seccomp.ThreadKind.IO, self._run), name=self.name,
                                            daemon=True)
            self._thread.start()

    def pause(self) -> None:
        """Return once no callback runs; none starts until :meth:`resume`."""
        if not self._paused.is_set():
            self._paused.set()
            self._dispatch.acquire()

    def resume(self) -> None:
        """Let callbacks run again after :meth:`pause`."""
        if self._paused.is_set() and self._thread is not None:
            self._paused.clear()
            self._dispatch.release()
            os.eventfd_write(self._wake, 1)

    def stop(self) -> None:
        """End the thread and close the loop's own fds (the watched fds belong to their owners)."""
        self._stopping = True
        try:
            os.eventfd_write(self._wake, 1)
        except OSError:
            pass
        if self._paused.is_set() and self._dispatch.locked():
            self._dispatch.release()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        self._epoll.close()
        os.close(self._wake)

    def _run(self) -> None:
        while not self._stopping:
            try:
                ready = self._epoll.poll()
            except InterruptedError:
                continue
            except (OSError, ValueError):
                return
            with self._dispatch:
                if self._stopping:
                    return
                for fd, _ in ready:
                    if fd == self._wake:
                        try:
                            os.eventfd_read(self._wake)
                        except BlockingIOError:
                            pass
                        continue
                    callback = self._callbacks.get(fd)
                    if callback is None:
                        continue
                    try:
                        callback()
                    except Exception:  # a device bug must not end every device's I/O
                        LOG.exception("%s: callback for fd %d failed; no longer watching it", self.name, fd)
                        self.remove(fd)
