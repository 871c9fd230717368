"""One VM's lifecycle: its vCPUs running, paused, resumed and shut down, and what it is asked
about while it exists.

:mod:`vmsh.engine.builder` creates a ``Vm`` (from a config, or from a snapshot) with everything
in place; from then on ``Vm`` moves through :mod:`vmsh.engine.state`. What the guest asks for
(poweroff, reset) and fatal vCPU errors are reported through ``on_guest_event``, never acted on
from the vCPU threads themselves; topology changes the guest makes from a vCPU thread (an eject,
a BAR move) run on the control loop through ``requests`` (``docs/threading.md``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from vmsh.config import canonical_json
from vmsh.config import model as m
from vmsh.devices.acpi import GED_CPU_CHANGE, GED_POWER_BUTTON
from vmsh.devices.cpu_hotplug import CpuHotplugController
from vmsh.devices.vhost_user.device import VhostUserDevice
from vmsh.devices.virtio.balloon import VirtioBalloon
from vmsh.engine import snapshot as snapshot_tree
from vmsh.engine.bus import Bus
from vmsh.engine.console import ConsoleBackend
from vmsh.engine.control_requests import ControlRequests
from vmsh.engine.device_manager import DeviceManager
from vmsh.engine.events import EventMonitor, GuestEvent
from vmsh.engine.hotplug import PciHotplug
from vmsh.engine.kvm import Kvm
from vmsh.engine.kvm_state import save_vcpu, save_vm, saveable_msrs
from vmsh.engine.memory import GuestMemoryMmap
from vmsh.engine.memory_hotplug import MemoryHotplug
from vmsh.engine.memory_manager import boot_ram_size
from vmsh.engine.persist import write_snapshot
from vmsh.engine.platform_devices import PlatformDevices
from vmsh.engine.profiler import RipSampler, Symbolizer
from vmsh.engine.state import VmState, check_transition
from vmsh.engine.stats import KvmStats
from vmsh.engine.vcpu import Vcpu, VcpuStop
from vmsh.engine.virtio_devices import BALLOON_ID
from vmsh.errors import BusyError, SnapshotError, StateError, VmshError, error_chain

LOG = logging.getLogger(__name__)

#: how long pause and shutdown wait for a vCPU to leave KVM_RUN
VCPU_STOP_TIMEOUT = 5.0

GuestEventSink = Callable[[str, str], None]


class Vm:
    """One VM: KVM objects, memory, devices and vCPUs, as the builder put them together."""

    #: RAM resizes (ACPI hot-add and virtio-mem); the builder sets it
    memory_hotplug: MemoryHotplug | None = None
    #: the RAM the VM booted with, when a snapshot says it differs from the config's size (an
    #: ACPI resize sets that to the new total); None: the config's
    boot_ram: int | None = None

    def __init__(self, config: m.VmConfig, events: EventMonitor, on_guest_event: GuestEventSink,
                 requests: ControlRequests, profile: m.ProfileConfig | None = None) -> None:
        self.config = config
        self.events = events
        self.on_guest_event = on_guest_event
        #: topology work vCPU threads hand to the control loop
        self.requests = requests
        self.profile = profile
        self.sampler: RipSampler | None = None
        self.state = VmState.CREATED
        self.kvm: Kvm | None = None
        self.vm_fd: Any = None
        self.memory: GuestMemoryMmap | None = None
        #: the present vCPUs, in index order (vcpu0, vcpu1, ...)
        self.vcpus: list[Vcpu] = []
        #: ejected vCPUs by index: KVM cannot destroy a vCPU, so its fd waits here, its thread
        #: ended, for a later resize up (as cloud-hypervisor keeps them)
        self.parked: dict[int, Vcpu] = {}
        #: makes vCPU ``index`` configured as the boot vCPUs are (the builder's; None: no hotplug)
        self.new_vcpu: Callable[[int], Vcpu] | None = None
        #: the ACPI CPU hotplug registers (None when max_vcpus is 1)
        self.cpu_hotplug: CpuHotplugController | None = None
        self.memory_hotplug = None
        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        self.platform: PlatformDevices | None = None
        self.devices: DeviceManager | None = None
        self.hotplug: PciHotplug | None = None
        self.backends: list[ConsoleBackend] = []
        self.pvm_handler: Any = None
        self.vm_stats: KvmStats | None = None
        self.vcpu_stats: list[KvmStats] = []
        #: host resources closed with the VM (interrupt triggers)
        self.closeables: list[Any] = []
        #: kvmclock when the vCPUs stopped: put back on resume, saved by a snapshot
        self.paused_clock: int | None = None
        #: told (on the vCPU's thread) when a vCPU stops at a breakpoint or after a step; set
        #: by the gdb stub while a debugger is attached (``vmsh.engine.gdb``)
        self.debug_listener: Callable[[Vcpu], None] | None = None
        self._closed = False
        self._lock = threading.Lock()

    # --- lifecycle --------------------------------------------------------------------------------

    def _on_vcpu_stop(self, vcpu: Vcpu) -> None:
        """Runs in the vCPU thread when its loop ends: report what the guest did."""
        if vcpu.error is not None:
            detail = f"vcpu{vcpu.index}: " + ": ".join(error_chain(vcpu.error))
            LOG.error("%s", detail)
            self.on_guest_event(GuestEvent.FATAL, detail)
            return
        reason = vcpu.stop_reason
        if reason in (VcpuStop.SHUTDOWN, VcpuStop.RESET):
            self.on_guest_event(GuestEvent.RESET, f"vcpu{vcpu.index}: {reason.value}")
        elif reason is VcpuStop.POWEROFF:
            self.on_guest_event(GuestEvent.POWEROFF, f"vcpu{vcpu.index}: system event")
        elif reason is VcpuStop.CRASH:
            self.on_guest_event(GuestEvent.FATAL, f"vcpu{vcpu.index}: guest crash")
        elif reason is VcpuStop.DEBUG:
            listener = self.debug_listener
            if listener is not None:
                listener(vcpu)  # the debugger's wake-up only: it pauses the VM from its own thread

    def _start_vcpus(self, vcpus: list[Vcpu] | None = None) -> None:
        affinity = {a.vcpu: set(a.host_cpus) for a in self.config.cpus.affinity or []}
        for vcpu in self.vcpus if vcpus is None else vcpus:
            vcpu.start(on_stop=self._on_vcpu_stop, affinity=affinity.get(vcpu.index))

    def _stop_vcpus(self, timeout: float) -> list[Vcpu]:
        """Kick every vCPU out of KVM_RUN and wait; returns the ones still running.

        Runs on the control loop: a vCPU may be waiting for it (``requests``), so the queued
        topology work is done while waiting, or that vCPU would never stop.
        """
        for vcpu in self.vcpus:
            vcpu.kick()
        deadline = time.monotonic() + timeout
        running = list(self.vcpus)
        while running:
            self.requests.drain()
            running = [v for v in running if not v.join(0.01)]
            if time.monotonic() >= deadline:
                break
        return running

    def boot(self) -> None:
        check_transition(self.state, VmState.RUNNING)
        assert self.devices is not None, "the builder made the devices"
        self.devices.start()
        self._start_vcpus()
        self.state = VmState.RUNNING
        if self.profile is not None:
            self.start_profiler(self.profile.hz)

    def pause(self) -> None:
        """Stop every vCPU and quiesce the devices.

        :raises VmshError: when a vCPU does not leave KVM_RUN in time; the VM then runs on
            (the vCPUs that had stopped are started again), so no snapshot sees a live vCPU.
        """
        check_transition(self.state, VmState.PAUSED)
        stuck = self._stop_vcpus(VCPU_STOP_TIMEOUT)
        if stuck:
            for vcpu in stuck:
                vcpu.cancel_kick()
            self._start_vcpus([v for v in self.vcpus if v not in stuck or v.join(0)])
            names = ", ".join(f"vcpu{v.index}" for v in stuck)
            raise VmshError(f"Cannot pause: {names} did not stop within {VCPU_STOP_TIMEOUT:.0f} s; "
                            "the VM keeps running")
        assert self.devices is not None, "the builder made the devices"
        self.devices.pause()
        # The guest must not see the paused time: kvmclock is put back on resume.
        self.paused_clock = self.vm_fd.get_clock()[0]
        self.state = VmState.PAUSED

    def resume(self) -> None:
        check_transition(self.state, VmState.RUNNING)
        if self.paused_clock is not None:
            self.vm_fd.set_clock(self.paused_clock)
            self.paused_clock = None
        assert self.devices is not None, "the builder made the devices"
        self.devices.start()
        self._start_vcpus()
        self.state = VmState.RUNNING
        if self.profile is not None and self.sampler is None:
            self.start_profiler(self.profile.hz)  # a restored VM is profiled from its first resume

    def shutdown(self) -> None:
        """Stop the vCPUs and release everything (safe to call twice, or on a half-built VM)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.sampler is not None and self.profile is not None:
            self._finish_profile()
        elif self.sampler is not None:
            self.sampler.stop()
        self.requests.close()  # a vCPU waiting for the control loop gives up: nothing changes now
        for vcpu in self._stop_vcpus(VCPU_STOP_TIMEOUT):
            LOG.error("vcpu%d did not stop within %.0f s", vcpu.index, VCPU_STOP_TIMEOUT)
        if LOG.isEnabledFor(logging.INFO) and self.vm_stats is not None:
            self._log_counters()
        if self.devices is not None:
            self.devices.close()
        for backend in self.backends:
            backend.close()
        for stats in [self.vm_stats, *self.vcpu_stats]:
            if stats is not None:
                stats.close()
        for vcpu in [*self.vcpus, *self.parked.values()]:
            vcpu.fd.close()
        for closeable in self.closeables:
            closeable.close()
        if self.vm_fd is not None:
            self.vm_fd.close()
        if self.memory is not None:
            self.memory.close()
        if self.kvm is not None:
            self.kvm.close()
        self.state = VmState.SHUTDOWN

    def power_button(self) -> None:
        if self.state is not VmState.RUNNING:
            raise VmshError(f"The power button needs a running VM (it is {self.state.value})")
        assert self.platform is not None, "the builder made the platform devices"
        self.platform.ged.notify(GED_POWER_BUTTON)

    def nmi(self) -> None:
        """Queue an NMI on every vCPU (from its own thread while it runs)."""
        for vcpu in self.vcpus:
            if self.state is VmState.RUNNING:
                vcpu.run_on_vcpu(lambda v: v.fd.nmi())
            else:
                vcpu.fd.nmi()

    # --- vCPU hotplug ---------------------------------------------------------------------------

    def resize_vcpus(self, desired: int) -> bool:
        """Grow to or shrink towards ``desired`` vCPUs (cloud-hypervisor's ``CpuManager::resize``);
        False when nothing changes.

        Up: the missing vCPUs (parked ones first) are created, configured as the boot vCPUs,
        started, marked inserting, and the GED tells the guest, which brings them online. Down:
        the highest are marked removing; the guest offlines them and ejects each through the
        controller (``vcpu_ejected``). ``cpus.boot_vcpus`` follows at once, as in
        cloud-hypervisor. Runs on the control loop.

        :raises VmshError: for fewer than 1 or more than ``max_vcpus`` vCPUs (a 500, as
            cloud-hypervisor's CpuManager errors are).
        :raises BusyError: while a removal asked for earlier is not done (429).
        """
        cfg = self.config.cpus
        if desired < 1:
            raise VmshError("resize: desired_vcpus must be at least 1 (vCPU 0 cannot be removed)")
        if desired > cfg.max_vcpus:
            raise VmshError(f"resize: desired_vcpus {desired} exceeds the maximum number of vCPUs ({cfg.max_vcpus})")
        present = len(self.vcpus)
        if desired == present:
            return False
        if self.cpu_hotplug is None or self.new_vcpu is None or self.platform is None:
            raise VmshError("resize: this VM has no CPU hotplug controller")
        if self.cpu_hotplug.pending_removals():
            raise BusyError("resize: a vCPU removal is still pending")
        # the present vCPUs are always 0..present-1: only the highest go, only they are ejected
        if desired > present:
            for index in range(present, desired):
                vcpu = self.parked.pop(index, None) or self.new_vcpu(index)
                self.vcpus.append(vcpu)
                self.cpu_hotplug.insert(index)
                if self.state is VmState.RUNNING:
                    self._start_vcpus([vcpu])
                LOG.info("vcpu%d added", index)
        else:
            for index in range(desired, present):
                self.cpu_hotplug.request_removal(index)
        cfg.boot_vcpus = desired
        self.platform.ged.notify(GED_CPU_CHANGE)
        return True

    def vcpu_ejected(self, index: int) -> None:
        """The guest ejected vCPU ``index`` (runs on the control loop): its thread ends and it
        is parked."""
        vcpu = next((v for v in self.vcpus if v.index == index), None)
        if vcpu is None:
            return
        vcpu.kick()
        if not vcpu.join(VCPU_STOP_TIMEOUT):
            LOG.error("vcpu%d did not stop within %.0f s after its eject", index, VCPU_STOP_TIMEOUT)
            return
        vcpu.cancel_kick()
        self.vcpus.remove(vcpu)
        self.parked[index] = vcpu
        LOG.info("vcpu%d ejected and parked", index)

    # --- memory hotplug ---------------------------------------------------------------------------

    def resize_memory(self, desired: int) -> None:
        """``vm.resize desired_ram`` (runs in an action, which owns the memory map)."""
        if self.memory_hotplug is None:
            raise VmshError("resize: this VM has no memory hotplug")
        if self.config.memory.hotplug_method is m.HotplugMethod.ACPI and self._vhost_user_ids():
            # their backends map guest RAM from the table they were given at start: RAM added
            # now would be invisible to them (virtio-mem regions are in that table from boot)
            raise VmshError(f"resize: cannot add RAM through ACPI to a VM with vhost-user devices "
                            f"({', '.join(self._vhost_user_ids())}); use hotplug_method=virtio-mem")
        self.memory_hotplug.resize(desired)

    def resize_zone(self, zone_id: str, desired: int) -> None:
        """``vm.resize-zone``."""
        if self.memory_hotplug is None:
            raise VmshError("resize-zone: this VM has no memory hotplug")
        self.memory_hotplug.resize_zone(zone_id, desired)

    def _vhost_user_ids(self) -> list[str]:
        if self.devices is None:
            return []
        return [dev_id for dev_id, entry in self.devices.devices.items()
                if isinstance(getattr(entry.transport, "device", None), VhostUserDevice)]

    # --- snapshot -------------------------------------------------------------------------------

    def snapshot(self, directory: str) -> None:
        """Write the paused VM into ``directory`` (config.json, state.json, memory-ranges)."""
        config_json, tree = self.saved_state()
        assert self.memory is not None
        # regions in address order: their concatenation is the coalesced ranges' contents
        write_snapshot(directory, config_json, tree, [(r.view, r.data_runs()) for r in self.memory.regions])

    def check_saveable(self) -> None:
        """Refuse a VM whose state vmsh cannot save (a snapshot or a live migration).

        :raises SnapshotError: naming what cannot be saved.
        """
        backed = self._vhost_user_ids()
        if backed:
            # Refused before anything is written: a backend's own state (its rings' positions,
            # requests in flight, a NIC's or a file system's state) cannot be saved from here.
            raise SnapshotError(f"Cannot snapshot a VM with vhost-user devices ({', '.join(backed)}): "
                                f"vmsh cannot save their backends' state")
        if self.cpu_hotplug is not None and self.cpu_hotplug.pending_removals():
            # the config already says the smaller count while the guest still has the vCPUs:
            # a snapshot of that would not restore
            raise SnapshotError("Cannot snapshot while a vCPU removal is pending (the guest has not ejected "
                                "the vCPUs yet)")
        if self.platform is not None and self.platform.tpm is not None:
            # swtpm's state lives in swtpm: vmsh neither saves it (CMD_GET_STATEBLOB) nor could a
            # restore be sure to meet the same swtpm again, so a TPM'd VM is refused up front
            raise SnapshotError("Cannot snapshot a VM with a TPM (--tpm): vmsh cannot save swtpm's state")

    def saved_state(self) -> tuple[str, dict[str, Any]]:
        """The paused VM's config (canonical JSON) and its state tree (``vmsh.engine.snapshot``).

        :raises SnapshotError: when the VM runs or :meth:`check_saveable` refuses it.
        """
        if self.state is not VmState.PAUSED:
            raise StateError("Trying to snapshot while VM is running")
        self.check_saveable()
        assert self.kvm is not None and self.memory is not None and self.devices is not None
        msrs = saveable_msrs(self.kvm, self.vcpus[0].fd)
        kvm_state = save_vm(self.vm_fd)
        if self.paused_clock is not None:
            # The clock as it was when the vCPUs stopped: a restore continues from there.
            kvm_state = dataclasses.replace(kvm_state, clock=self.paused_clock)
        # the boot RAM is saved when an ACPI resize made the config's size differ from it
        boot_ram = self.memory.boot_size
        tree = snapshot_tree.build_tree(kvm_state, [save_vcpu(v.fd, msrs) for v in self.vcpus],
                                        snapshot_tree.memory_table(self.memory), self.devices.states(),
                                        boot_ram if boot_ram != boot_ram_size(self.config.memory) else None)
        return canonical_json(self.config), tree

    # --- devices --------------------------------------------------------------------------------

    def hotplug_device(self, kind: str, item: Any) -> dict[str, str]:
        """Plug a device of ``kind`` (a VmConfig list) into the running guest."""
        assert self.hotplug is not None, "the builder made the hotplug manager"
        return self.hotplug.add(kind, item)

    def unplug_device(self, dev_id: str) -> bool:
        """Ask the guest to eject ``dev_id``; False if there is no such PCI device."""
        assert self.hotplug is not None, "the builder made the hotplug manager"
        return self.hotplug.unplug(dev_id)

    def resize_balloon(self, size: int) -> None:
        """Ask the guest to give ``size`` bytes back through the balloon."""
        entry = self.devices.devices.get(BALLOON_ID) if self.devices is not None else None
        if entry is None or self.config.balloon is None:
            raise VmshError("resize: the VM has no balloon device (--balloon)")
        if size > self.config.memory.total_size():
            raise VmshError(f"resize: a balloon of {size} bytes is larger than the guest's RAM")
        with entry.lock:
            entry.transport.device.resize(size)  # type: ignore[attr-defined]  # the balloon's transport
        self.config.balloon.size = size

    # --- profiling ----------------------------------------------------------------------------------

    def start_profiler(self, hz: int) -> None:
        """Start sampling every vCPU's instruction pointer ``hz`` times a second."""
        if self.sampler is not None:
            raise VmshError("The profiler is already running")
        self.sampler = RipSampler(self.vcpus, hz, memory=self.memory)
        self.sampler.start()

    def stop_profiler(self, system_map: str | None = None, top: int = 40) -> str:
        """Stop sampling; returns the report, by symbol when ``system_map`` is given."""
        if self.sampler is None:
            raise VmshError("The profiler is not running")
        sampler, self.sampler = self.sampler, None
        sampler.stop()
        symbolizer = None
        if system_map is not None:
            try:
                symbolizer = Symbolizer.from_system_map(system_map)
            except (OSError, ValueError) as err:
                LOG.warning("cannot read the symbol map %s: %s", system_map, err)
        return sampler.report(symbolizer, top=top)

    def _finish_profile(self) -> None:
        assert self.profile is not None
        sampler = self.sampler
        text = self.stop_profiler(self.profile.system_map)
        if self.profile.path is None:
            LOG.warning("%s", text)
            return
        outputs = [(self.profile.path, text + "\n")]
        if sampler is not None and sampler.stacks and self.profile.system_map is not None:
            try:
                symbolizer = Symbolizer.from_system_map(self.profile.system_map)
            except (OSError, ValueError):
                symbolizer = None  # stop_profiler has said why
            if symbolizer is not None:
                # flame graph input beside the report (flamegraph.pl, speedscope, ...)
                outputs.append((self.profile.path + ".folded", sampler.folded_stacks(symbolizer)))
        for path, content in outputs:
            try:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(content)
            except OSError as err:
                LOG.error("cannot write the profile to %s: %s", path, err)

    # --- inspection ---------------------------------------------------------------------------------

    def counters(self) -> dict[str, dict[str, int]]:
        """Device counters plus KVM's own statistics (``__vm``, ``__vcpuN``) and PVM handler counts."""
        result: dict[str, dict[str, int]] = dict(self.devices.counters()) if self.devices is not None else {}
        if self.vm_stats is not None:
            result["__vm"] = self.vm_stats.read_counters()
        for vcpu, stats in zip(self.vcpus, self.vcpu_stats, strict=False):
            result[f"__vcpu{vcpu.index}"] = stats.read_counters()
        if self.pvm_handler is not None:
            result["__pvm"] = dict(self.pvm_handler.counts)
        return result

    def info(self) -> dict[str, Any]:
        """What ``vm.info`` adds to the config and state: ``memory_actual_size`` without what the
        balloon holds, and cloud-hypervisor's ``device_tree`` (each node with id, resources,
        parent, children and pci_bdf, as its DeviceNode has)."""
        if self.devices is None:
            return {}
        # cloud-hypervisor's: the configured RAM (virtio-mem counted by what the guest has
        # plugged, not what was asked for) less what the balloon holds (max: a guest can claim a
        # balloon larger than its RAM; the size stays a size)
        return {"memory_actual_size": max(0, self.actual_ram() - self.balloon_size()),
                "device_tree": self.devices.device_tree()}

    def actual_ram(self) -> int:
        """The guest's RAM now: boot RAM, RAM added through ACPI, and the virtio-mem blocks plugged."""
        mem = self.config.memory
        if self.memory_hotplug is None or not self.memory_hotplug.virtio_mem:
            return mem.total_size()
        requested = sum(z.hotplugged_size or 0 for z in mem.zones or [])
        if mem.hotplug_method is m.HotplugMethod.VIRTIO_MEM:
            requested += mem.hotplugged_size or 0
        return mem.total_size() - requested + self.memory_hotplug.virtio_mem_plugged()

    def balloon_size(self) -> int:
        """Bytes the guest has put into the balloon (its ``actual``: up on inflate, down on
        deflate, including the guest's own deflate on OOM); cloud-hypervisor's
        ``Vm::balloon_size``, which its ``vm_info`` subtracts from the RAM."""
        entry = self.devices.devices.get(BALLOON_ID) if self.devices is not None else None
        if entry is None:
            return 0
        balloon: VirtioBalloon = entry.transport.device  # type: ignore[attr-defined]  # the balloon's transport
        return balloon.actual_bytes

    #: the KVM statistics worth a line at exit with ``-v``
    SUMMARY_STATS = ("exits", "io_exits", "mmio_exits", "halt_exits", "insn_emulation", "insn_emulation_fail",
                     "mmu_pte_write", "pf_taken")

    def _log_counters(self) -> None:
        try:
            counters = self.counters()
        except VmshError as err:
            LOG.info("KVM statistics could not be read: %s", err)
            return
        for name, values in counters.items():
            shown = {k: v for k, v in values.items() if k in self.SUMMARY_STATS or name == "__pvm"}
            if shown:
                LOG.info("%s: %s", name, " ".join(f"{k}={v}" for k, v in sorted(shown.items())))
