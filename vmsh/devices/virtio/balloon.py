"""virtio-balloon (virtio 1.2 §5.5): the host asks the guest to give memory back.

The host sets ``num_pages`` in the configuration (``resize``, from ``--balloon size=`` and
``vm.resize desired_balloon``) and signals a configuration change; the guest's driver inflates
the balloon by sending 4 KiB page frame numbers on the inflate queue (or deflates it on the
deflate queue) and writes how many pages it holds into ``actual``. Inflated pages are handed
back to the host with ``GuestMemory.discard``; deflated pages need nothing: the guest's next
touch faults fresh memory in.

Queues, as Linux's driver numbers them (it compacts the indexes of queues whose feature was not
negotiated): 0 inflateq, 1 deflateq, then statsq if VIRTIO_BALLOON_F_STATS_VQ was negotiated,
then reporting_vq if VIRTIO_BALLOON_F_REPORTING was (free page hinting is not offered). The
transport offers one queue per feature the device offers.

- inflate/deflate buffers are device-readable arrays of le32 PFNs (§5.5.6). Each PFN is checked
  to be guest RAM; one that is not is skipped and counted (``bad_pfns``): a hostile guest cannot
  make the host discard anything else.
- statsq (§5.5.6.3): the driver posts one readable buffer of ``{le16 tag; le64 val}`` entries;
  the device keeps it, and ``request_stats`` returns it to ask for fresh numbers.
- reporting_vq (§5.5.6.7): device-writable buffers describe free guest pages, which are discarded
  and returned with a used length of 0.

Features offered: VIRTIO_BALLOON_F_DEFLATE_ON_OOM and VIRTIO_BALLOON_F_REPORTING as configured
(cloud-hypervisor's ``deflate_on_oom`` / ``free_page_reporting``), VIRTIO_BALLOON_F_STATS_VQ
when asked for.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

from vmsh.config.model import BalloonConfig
from vmsh.devices.state import check_max_length, check_range, expect_state
from vmsh.devices.virtio.device import COMMON_FEATURES, VirtioDevice, has_feature
from vmsh.devices.virtio.queue import DescriptorChain, VirtQueue
from vmsh.errors import DeviceError, GuestMemoryError, VirtQueueError
from vmsh.state_types import U16, U32, U64

LOG = logging.getLogger(__name__)

VIRTIO_ID_BALLOON = 5

# Feature bits (§5.5.3)
VIRTIO_BALLOON_F_MUST_TELL_HOST = 0  # not offered
VIRTIO_BALLOON_F_STATS_VQ = 1  # a statistics queue
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2  # the guest deflates when it runs out of memory
VIRTIO_BALLOON_F_FREE_PAGE_HINT = 3  # not offered
VIRTIO_BALLOON_F_PAGE_POISON = 4  # not offered
VIRTIO_BALLOON_F_REPORTING = 5  # free page reporting queue

INFLATEQ = 0
DEFLATEQ = 1
#: cloud-hypervisor's balloon queue size
BALLOON_QUEUE_SIZE = 128
#: PFNs are in units of 4 KiB whatever the guest's page size (VIRTIO_BALLOON_PFN_SHIFT)
VIRTIO_BALLOON_PFN_SHIFT = 12
BALLOON_PAGE_SIZE = 1 << VIRTIO_BALLOON_PFN_SHIFT
#: PFN bytes taken from one inflate/deflate chain (Linux sends at most 256 PFNs; a hostile chain
#: may describe gigabytes)
MAX_PFN_BYTES = 64 << 10
#: most statistics entries read from the stats buffer (Linux has 10 tags today)
MAX_STATS = 64
_STAT = struct.Struct("<HQ")
# struct virtio_balloon_config (§5.5.4)
CONFIG_NUM_PAGES = 0
CONFIG_ACTUAL = 4
CONFIG_SIZE = 16  # num_pages, actual, free_page_hint_cmd_id, poison_val
_U32_MAX = 0xFFFF_FFFF

# Statistics tags (§5.5.6.3)
STAT_NAMES = {
    0: "swap_in", 1: "swap_out", 2: "major_faults", 3: "minor_faults", 4: "free_memory",
    5: "total_memory", 6: "available_memory", 7: "disk_caches", 8: "hugetlb_allocations",
    9: "hugetlb_failures",
}


@dataclass(frozen=True, slots=True)
class VirtioBalloonState:
    """Plain-data state of a ``VirtioBalloon``."""

    num_pages: U32 = 0
    actual: U32 = 0
    inflated_pages: U64 = 0
    deflated_pages: U64 = 0
    reported_pages: U64 = 0
    bad_pfns: U64 = 0
    #: head of the statistics buffer the device holds (None: none held)
    stats_head: int | None = None
    #: last statistics, as (tag, value) pairs (struct virtio_balloon_stat: le16 tag, le64 val)
    stats: tuple[tuple[U16, U64], ...] = ()


class VirtioBalloon(VirtioDevice):
    """A memory balloon.

    :param size: initial balloon size in bytes (rounded down to 4 KiB pages).
    :param deflate_on_oom: offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM.
    :param free_page_reporting: offer VIRTIO_BALLOON_F_REPORTING (and its queue).
    :param stats: offer VIRTIO_BALLOON_F_STATS_VQ (and its queue).
    :raises DeviceError: for a size that does not fit the 32-bit page count.

    Example::

        balloon = VirtioBalloon.from_config(BalloonConfig(size=256 << 20, deflate_on_oom=True))
        balloon.resize(512 << 20)   # vm.resize desired_balloon: the guest inflates to 512 MiB
    """

    state_type = VirtioBalloonState

    device_type = VIRTIO_ID_BALLOON

    def __init__(self, size: int = 0, *, deflate_on_oom: bool = False, free_page_reporting: bool = False,
                 stats: bool = False, queue_size: int = BALLOON_QUEUE_SIZE) -> None:
        self.queue_max_sizes = (queue_size,) * (2 + int(stats) + int(free_page_reporting))
        super().__init__()
        features = COMMON_FEATURES
        if deflate_on_oom:
            features |= 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM
        if free_page_reporting:
            features |= 1 << VIRTIO_BALLOON_F_REPORTING
        if stats:
            features |= 1 << VIRTIO_BALLOON_F_STATS_VQ
        self.avail_features = features
        self.num_pages = self._pages(size)
        #: pages the guest says the balloon holds (its config writes)
        self.actual = 0
        self._counts = {"inflated_pages": 0, "deflated_pages": 0, "reported_pages": 0, "bad_pfns": 0}
        #: queue index of statsq / reporting_vq for the negotiated features (None: not in use)
        self.stats_index: int | None = None
        self.report_index: int | None = None
        self._stats_head: int | None = None
        self.stats: dict[int, int] = {}

    @classmethod
    def from_config(cls, config: BalloonConfig) -> VirtioBalloon:
        """A balloon from ``--balloon`` keys (size, deflate_on_oom, free_page_reporting)."""
        return cls(config.size, deflate_on_oom=config.deflate_on_oom,
                   free_page_reporting=config.free_page_reporting)

    @staticmethod
    def _pages(size: int) -> int:
        pages = size >> VIRTIO_BALLOON_PFN_SHIFT
        if size < 0 or pages > _U32_MAX:
            raise DeviceError(f"balloon size {size} out of range")
        return pages

    # -- configuration (§5.5.4) --------------------------------------------------------------

    def config_bytes(self) -> bytes:
        return struct.pack("<IIII", self.num_pages, self.actual, 0, 0)

    def write_config(self, offset: int, data: bytes) -> None:
        """The driver writes ``actual`` (any other field is read-only)."""
        if not CONFIG_ACTUAL <= offset < CONFIG_ACTUAL + 4 or not data:
            return
        raw = bytearray(struct.pack("<I", self.actual))
        start = offset - CONFIG_ACTUAL
        chunk = bytes(data[:4 - start])
        raw[start:start + len(chunk)] = chunk
        self.actual = struct.unpack("<I", raw)[0]

    def resize(self, size_bytes: int) -> None:
        """Ask the guest for a balloon of ``size_bytes``; it follows at its own pace.

        :raises DeviceError: for a size that does not fit the 32-bit page count.
        """
        self.num_pages = self._pages(size_bytes)
        if self.activated and self.interrupt is not None:
            self.interrupt.signal_config_change()

    @property
    def actual_bytes(self) -> int:
        """What the guest has given back so far (``memory_actual_size`` subtracts it)."""
        return self.actual << VIRTIO_BALLOON_PFN_SHIFT

    # -- lifecycle -------------------------------------------------------------------------

    def on_activate(self) -> None:
        index = DEFLATEQ + 1
        self.stats_index = self.report_index = None
        if has_feature(self.acked_features, VIRTIO_BALLOON_F_STATS_VQ):
            self.stats_index, index = index, index + 1
        if has_feature(self.acked_features, VIRTIO_BALLOON_F_REPORTING):
            self.report_index = index
        if self.stats_index is None or self.stats_index >= len(self.queues):
            self._stats_head = None

    def on_reset(self) -> None:
        self.stats_index = self.report_index = None
        self._stats_head = None

    # -- queues ----------------------------------------------------------------------------

    def process_queue(self, index: int, queue: VirtQueue) -> None:
        if index in (INFLATEQ, DEFLATEQ):
            handler = self._inflate_deflate
        elif index == self.stats_index:
            self._take_stats(index, queue)
            return
        elif index == self.report_index:
            handler = self._report
        else:
            return  # a queue no negotiated feature uses: leave it alone
        used = False
        while (chain := queue.pop()) is not None:
            handler(index, chain)
            queue.add_used(chain.head, 0)
            used = True
        if used:
            self.signal_used(index)

    def _inflate_deflate(self, index: int, chain: DescriptorChain) -> None:
        data = chain.read(0, MAX_PFN_BYTES)
        count = len(data) // 4
        pfns = struct.unpack_from(f"<{count}I", data)
        assert self.memory is not None
        if index == DEFLATEQ:
            # Nothing to do: the guest's next touch of a deflated page faults in a fresh one.
            good = sum(1 for pfn in pfns if self.memory.is_valid_range(pfn << VIRTIO_BALLOON_PFN_SHIFT,
                                                                        BALLOON_PAGE_SIZE))
            self._counts["deflated_pages"] += good
            self._counts["bad_pfns"] += count - good
            return
        # Discard runs of consecutive PFNs with one call each.
        run_start, run_len = -1, 0
        for pfn in sorted(set(pfns)):
            if not self.memory.is_valid_range(pfn << VIRTIO_BALLOON_PFN_SHIFT, BALLOON_PAGE_SIZE):
                self._counts["bad_pfns"] += 1
                continue
            if run_len and pfn == run_start + run_len:
                run_len += 1
                continue
            self._discard_pages(run_start, run_len)
            run_start, run_len = pfn, 1
        self._discard_pages(run_start, run_len)

    def _discard_pages(self, pfn: int, count: int) -> None:
        if count <= 0:
            return
        assert self.memory is not None
        try:
            # A run never crosses out of RAM, but it may cross from one region into the next.
            self.memory.discard(pfn << VIRTIO_BALLOON_PFN_SHIFT, count << VIRTIO_BALLOON_PFN_SHIFT)
        except GuestMemoryError as err:
            # The host keeps the memory; the guest still does not use it. Not the guest's fault.
            LOG.warning("virtio-balloon: %s", err)
        self._counts["inflated_pages"] += count

    def _report(self, index: int, chain: DescriptorChain) -> None:
        assert self.memory is not None
        for desc in chain.writable:
            if desc.addr % BALLOON_PAGE_SIZE or desc.length % BALLOON_PAGE_SIZE or not desc.length:
                self._counts["bad_pfns"] += 1
                continue
            try:
                self.memory.discard(desc.addr, desc.length)
            except GuestMemoryError as err:
                LOG.warning("virtio-balloon: reported range: %s", err)
                continue
            self._counts["reported_pages"] += desc.length >> VIRTIO_BALLOON_PFN_SHIFT

    def _take_stats(self, index: int, queue: VirtQueue) -> None:
        returned = False
        while (chain := queue.pop()) is not None:
            if self._stats_head is not None:
                # The driver keeps one stats buffer in flight (§5.5.6.3); give back the older one.
                queue.add_used(self._stats_head, 0)
                returned = True
            data = chain.read(0, MAX_STATS * _STAT.size)
            self.stats = dict(_STAT.unpack_from(data, i) for i in range(0, len(data) - _STAT.size + 1, _STAT.size))
            self._stats_head = chain.head
        if returned:
            self.signal_used(index)

    def request_stats(self) -> bool:
        """Return the held statistics buffer so the driver refills it; False if none is held."""
        index = self.stats_index
        if index is None:
            return False
        with self._locks[index]:
            if not self.activated or self.needs_reset or self._stats_head is None or index >= len(self.queues):
                return False
            try:
                self.queues[index].add_used(self._stats_head, 0)
            except VirtQueueError as err:
                self.fail(err)
                return False
            self._stats_head = None
            self.signal_used(index)
            return True

    def named_stats(self) -> dict[str, int]:
        """The last statistics with their spec names (unknown tags as ``tag_<n>``)."""
        return {STAT_NAMES.get(tag, f"tag_{tag}"): value for tag, value in self.stats.items()}

    # -- snapshot and counters ---------------------------------------------------------------

    def state(self) -> VirtioBalloonState:
        return VirtioBalloonState(num_pages=self.num_pages, actual=self.actual, stats_head=self._stats_head,
                                  stats=tuple(sorted(self.stats.items())), **self._counts)

    def restore(self, state: VirtioBalloonState) -> None:
        """Load ``state`` (untrusted).

        :raises DeviceStateError: for another state class, a page count beyond 32 bits, a held
            statistics buffer outside the queue, or too many statistics.
        """
        s = expect_state(state, VirtioBalloonState)
        if s.stats_head is not None:
            check_range("stats_head", s.stats_head, 0, max(self.queue_max_sizes) - 1)
        check_max_length("stats", s.stats, MAX_STATS)
        self.num_pages, self.actual = s.num_pages, s.actual
        for key in self._counts:
            self._counts[key] = getattr(s, key)
        self.stats = dict(s.stats)
        self._stats_head = s.stats_head

    def counters(self) -> dict[str, int]:
        return {**self._counts, "num_pages": self.num_pages, "actual_pages": self.actual}
