"""Work that a vCPU thread hands to the VMM's control loop, and waits for.

A guest changes the machine's topology from a vCPU thread: it ejects a PCI slot (a write to the
hotplug controller's B0EJ register) or moves a BAR (a configuration write). The device set, the
bus maps and the config are owned by the control loop (``docs/threading.md``), so the vCPU
thread does not change them itself: it queues the work here, posts ``drain`` to the control
loop, and waits until the work has run, so the guest sees the change done when its write
completes, as on real hardware.

``Vm.pause`` runs ``drain`` itself while it waits for the vCPUs to stop (it runs on the control
loop, so a vCPU waiting here would otherwise never stop), and ``close`` releases every waiting
vCPU without running its work once the VM is going away.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

LOG = logging.getLogger(__name__)

#: queues a callable for the control loop (``Vmm.post``)
Post = Callable[[Callable[[], None]], None]


@dataclass(eq=False)
class _Request:
    work: Callable[[], None]
    done: threading.Event = field(default_factory=threading.Event)


class ControlRequests:
    """The queue between vCPU threads and the control loop."""

    def __init__(self, post: Post) -> None:
        self._post = post
        self._pending: deque[_Request] = deque()
        self._lock = threading.Lock()
        self._closed = False

    def run(self, work: Callable[[], None]) -> None:
        """Have ``work`` run on the control loop and wait for it (not from the control loop)."""
        request = _Request(work)
        with self._lock:
            if self._closed:
                return  # the VM is going away: nothing to change any more
            self._pending.append(request)
        self._post(self.drain)
        request.done.wait()

    def drain(self) -> None:
        """Run every queued piece of work (the control loop, holding the VMM lock)."""
        while True:
            with self._lock:
                if not self._pending:
                    return
                request = self._pending.popleft()
            try:
                request.work()
            except Exception:  # the guest's write is done either way; the VM goes on
                LOG.exception("a topology change the guest asked for failed")
            finally:
                request.done.set()

    def close(self) -> None:
        """Release every waiting vCPU without running its work; later requests return at once."""
        with self._lock:
            self._closed = True
            pending, self._pending = list(self._pending), deque()
        for request in pending:
            request.done.set()
