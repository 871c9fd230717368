"""A VmConfig back to launcher flags: the inverse of :mod:`vmsh.config.launcher_args`.

``to_argv(cfg)`` gives flags that parse to ``cfg`` again (ids, sizes in bytes, every
field written). The shell shows a config as the command that would create it, and the
parity tests use it to write one configuration in both forms. Net ``fds`` are left out:
descriptors cannot be written down, they must be passed.
"""

from __future__ import annotations

from typing import Any

from vmsh.config import model as m

_SPECIAL = set(',[]"=@') | {" ", "\t"}


def quote(value: str) -> str:
    """``value`` as an option value, quoted when the grammar needs it (``a,b`` -> ``"a,b"``)."""
    if value and not (_SPECIAL & set(value)):
        return value
    return '"' + value.replace('"', '""') + '"'


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def _ints(values: list[int]) -> str:
    return "[" + ",".join(str(v) for v in values) + "]"


def _strings(values: list[str]) -> str:
    return "[" + ",".join(quote(v) for v in values) + "]"


class _Raw(str):
    """An already formatted value that must not be quoted."""


def _fmt(pairs: list[tuple[str, Any]]) -> str:
    """``k=v,...`` from pairs, leaving out None values; bools become on/off, strings are quoted."""
    parts = []
    for key, value in pairs:
        if value is None:
            continue
        if isinstance(value, _Raw):
            text = str(value)
        elif isinstance(value, bool):
            text = _on(value)
        elif isinstance(value, str):
            text = quote(value)
        else:
            text = str(value)
        parts.append(f"{key}={text}")
    return ",".join(parts)


def _attrs(obj: Any, *names: str) -> str:
    """``_fmt`` of the named attributes of ``obj``, each under its own name."""
    return _fmt([(name, getattr(obj, name)) for name in names])


def _rate_limiter(limiter: m.RateLimiterConfig | None) -> list[tuple[str, Any]]:
    pairs: list[tuple[str, Any]] = []
    if limiter is None:
        return pairs
    for prefix, bucket in (("bw", limiter.bandwidth), ("ops", limiter.ops)):
        if bucket is not None:
            pairs += [
                (f"{prefix}_size", bucket.size),
                (f"{prefix}_one_time_burst", bucket.one_time_burst),
                (f"{prefix}_refill_time", bucket.refill_time),
            ]
    return pairs


def _console(c: m.ConsoleConfig) -> str:
    if c.mode is m.ConsoleOutputMode.FILE:
        head = f"file={quote(c.file or '')}"
    elif c.mode is m.ConsoleOutputMode.SOCKET:
        head = f"socket={quote(c.socket or '')}"
    else:
        head = c.mode.value.lower()
    return f"{head},iommu={_on(c.iommu)}"


def _debug_console(c: m.DebugConsoleConfig) -> str:
    head = f"file={quote(c.file or '')}" if c.mode is m.ConsoleOutputMode.FILE else c.mode.value.lower()
    return head + (f",iobase={c.iobase:#x}" if c.iobase is not None else "")


def _cpus(c: m.CpusConfig) -> str:
    pairs: list[tuple[str, Any]] = [("boot", c.boot_vcpus), ("max", c.max_vcpus)]
    if c.topology is not None:
        t = c.topology
        pairs.append(("topology", _Raw(f"{t.threads_per_core}:{t.cores_per_die}:{t.dies_per_package}:{t.packages}")))
    pairs += [("kvm_hyperv", c.kvm_hyperv), ("max_phys_bits", c.max_phys_bits)]
    if c.affinity is not None:
        pairs.append(("affinity", _Raw("[" + ",".join(f"{a.vcpu}@{_ints(a.host_cpus)}" for a in c.affinity) + "]")))
    if c.features.amx:
        pairs.append(("features", _Raw("[amx]")))
    return _fmt(pairs)


def _memory(c: m.MemoryConfig) -> str:
    method = "virtio-mem" if c.hotplug_method is m.HotplugMethod.VIRTIO_MEM else "acpi"
    return _fmt([
        ("size", c.size), ("mergeable", c.mergeable), ("hotplug_method", _Raw(method)),
        ("hotplug_size", c.hotplug_size), ("hotplugged_size", c.hotplugged_size), ("shared", c.shared),
        ("hugepages", c.hugepages), ("hugepage_size", c.hugepage_size), ("prefault", c.prefault), ("thp", c.thp),
    ])


def _zone(z: m.MemoryZoneConfig) -> str:
    return _fmt([
        ("id", z.id), ("size", z.size), ("file", z.file), ("shared", z.shared), ("hugepages", z.hugepages),
        ("hugepage_size", z.hugepage_size), ("host_numa_node", z.host_numa_node), ("hotplug_size", z.hotplug_size),
        ("hotplugged_size", z.hotplugged_size), ("prefault", z.prefault),
    ])


def _disk(d: m.DiskConfig) -> str:
    pairs: list[tuple[str, Any]] = [
        ("path", d.path), ("readonly", d.readonly), ("direct", d.direct), ("iommu", d.iommu),
        ("num_queues", d.num_queues), ("queue_size", d.queue_size), ("vhost_user", d.vhost_user),
        ("socket", d.vhost_socket), ("rate_limit_group", d.rate_limit_group), ("id", d.id),
        ("_disable_io_uring", d.disable_io_uring), ("_disable_aio", d.disable_aio),
        ("pci_segment", d.pci_segment), ("serial", d.serial),
    ]
    pairs += _rate_limiter(d.rate_limiter_config)
    if d.queue_affinity is not None:
        text = ",".join(f"{a.queue_index}@{_ints(a.host_cpus)}" for a in d.queue_affinity)
        pairs.append(("queue_affinity", _Raw(f"[{text}]")))
    return _fmt(pairs)


def _net(n: m.NetConfig) -> str:
    pairs: list[tuple[str, Any]] = [
        ("tap", n.tap), ("ip", _Raw(n.ip)), ("mask", _Raw(n.mask)),
        ("mac", _Raw(n.mac) if n.mac else None), ("host_mac", _Raw(n.host_mac) if n.host_mac else None),
        ("mtu", n.mtu), ("iommu", n.iommu), ("num_queues", n.num_queues), ("queue_size", n.queue_size),
        ("vhost_user", n.vhost_user), ("socket", n.vhost_socket), ("vhost_mode", _Raw(n.vhost_mode.value.lower())),
        ("id", n.id), ("pci_segment", n.pci_segment), ("offload_tso", n.offload_tso),
        ("offload_ufo", n.offload_ufo), ("offload_csum", n.offload_csum),
    ]
    return _fmt(pairs + _rate_limiter(n.rate_limiter_config))


def _platform(p: m.PlatformConfig) -> str:
    return _fmt([
        ("num_pci_segments", p.num_pci_segments),
        ("iommu_segments", _Raw(_ints(p.iommu_segments)) if p.iommu_segments is not None else None),
        ("serial_number", p.serial_number), ("uuid", p.uuid),
        ("oem_strings", _Raw(_strings(p.oem_strings)) if p.oem_strings is not None else None),
    ])


def _numa(n: m.NumaConfig) -> str:
    return _fmt([
        ("guest_numa_id", n.guest_numa_id),
        ("cpus", _Raw(_ints(n.cpus)) if n.cpus is not None else None),
        ("distances", _Raw("[" + ",".join(f"{d.destination}@{d.distance}" for d in n.distances) + "]")
         if n.distances is not None else None),
        ("memory_zones", _Raw(_strings(n.memory_zones)) if n.memory_zones is not None else None),
        ("sgx_epc_sections", _Raw(_strings(n.sgx_epc_sections)) if n.sgx_epc_sections is not None else None),
        ("pci_segments", _Raw(_ints(n.pci_segments)) if n.pci_segments is not None else None),
    ])


def to_argv(cfg: m.VmConfig) -> list[str]:
    """Launcher flags that describe ``cfg`` (every option written, defaults included)."""
    argv: list[str] = ["--cpus", _cpus(cfg.cpus), "--memory", _memory(cfg.memory)]

    def many(flag: str, items: list[Any] | None, render: Any) -> None:
        if items is not None:
            for item in items:
                argv.extend([flag, render(item)])

    many("--memory-zone", cfg.memory.zones, _zone)
    if cfg.payload is not None:
        for key in ("firmware", "kernel", "cmdline", "initramfs"):
            value = getattr(cfg.payload, key)
            if value is not None:
                argv.extend([f"--{key}", value])
    many("--rate-limit-group", cfg.rate_limit_groups,
         lambda g: _fmt([("id", g.id), *_rate_limiter(g.rate_limiter_config)]))
    many("--disk", cfg.disks, _disk)
    many("--net", cfg.net, _net)
    argv.extend(["--rng", _fmt([("src", cfg.rng.src), ("iommu", cfg.rng.iommu)])])
    if cfg.balloon is not None:
        argv.extend(["--balloon", _attrs(cfg.balloon, "size", "deflate_on_oom", "free_page_reporting")])
    many("--fs", cfg.fs, lambda f: _attrs(f, "tag", "socket", "num_queues", "queue_size", "id", "pci_segment"))
    many("--pmem", cfg.pmem, lambda p: _attrs(p, "file", "size", "iommu", "discard_writes", "id", "pci_segment"))
    argv.extend(["--serial", _console(cfg.serial), "--console", _console(cfg.console)])
    argv.extend(["--debug-console", _debug_console(cfg.debug_console)])
    many("--device", cfg.devices,
         lambda d: _attrs(d, "path", "iommu", "id", "pci_segment", "x_nv_gpudirect_clique"))
    many("--user-device", cfg.user_devices, lambda u: _attrs(u, "socket", "id", "pci_segment"))
    many("--vdpa", cfg.vdpa, lambda v: _attrs(v, "path", "num_queues", "iommu", "id", "pci_segment"))
    if cfg.vsock is not None:
        argv.extend(["--vsock", _attrs(cfg.vsock, "cid", "socket", "iommu", "id", "pci_segment")])
    if cfg.pvpanic:
        argv.append("--pvpanic")
    many("--sgx-epc", cfg.sgx_epc, lambda e: _fmt([("id", e.id), ("size", e.size), ("prefault", e.prefault)]))
    many("--numa", cfg.numa, _numa)
    if cfg.watchdog:
        argv.append("--watchdog")
    many("--pci-segment", cfg.pci_segments,
         lambda s: _attrs(s, "pci_segment", "mmio32_aperture_weight", "mmio64_aperture_weight"))
    if cfg.platform is not None:
        argv.extend(["--platform", _platform(cfg.platform)])
    if cfg.tpm is not None:
        argv.extend(["--tpm", _fmt([("socket", cfg.tpm.socket)])])
    return argv
