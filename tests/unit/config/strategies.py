"""Hypothesis strategies for valid VmConfigs (valid by construction, so that a generated
config exercises the round trips rather than the validator)."""

from __future__ import annotations

from hypothesis import strategies as st

from vmsh.config import model as m

# Values with every character the option grammar treats specially, so quoting is tested.
TEXT = st.text(alphabet=st.sampled_from('abcXYZ019/._-:, ="[]@é'), min_size=1, max_size=12).filter(
    lambda s: not s.startswith("-") and not s.startswith("__")
)
PATH = TEXT.map(lambda s: "/" + s)
POW2_QUEUE = st.sampled_from([4, 8, 64, 128, 256, 1024, 32768])
SIZE = st.integers(1, 4096).map(lambda mib: mib << 20)
BOOL = st.booleans()


def opt(strategy: st.SearchStrategy) -> st.SearchStrategy:
    return st.none() | strategy


@st.composite
def bucket(draw: st.DrawFn) -> m.TokenBucketConfig:
    return m.TokenBucketConfig(
        size=draw(st.integers(1, 1 << 40)), one_time_burst=draw(st.integers(0, 1 << 30)),
        refill_time=draw(st.integers(1, 10**6))
    )


@st.composite
def limiter(draw: st.DrawFn) -> m.RateLimiterConfig:
    bw, ops = draw(opt(bucket())), draw(opt(bucket()))
    if bw is None and ops is None:
        bw = draw(bucket())
    return m.RateLimiterConfig(bandwidth=bw, ops=ops)


@st.composite
def vm_configs(draw: st.DrawFn) -> m.VmConfig:
    boot = draw(st.integers(1, 8))
    max_vcpus = draw(st.integers(boot, 16))
    topology = None
    if draw(BOOL):
        threads = draw(st.sampled_from([t for t in (1, 2) if max_vcpus % t == 0]))
        topology = m.CpuTopology(threads_per_core=threads, cores_per_die=max_vcpus // threads, dies_per_package=1,
                                 packages=1)
    cpus = m.CpusConfig(
        boot_vcpus=boot,
        max_vcpus=max_vcpus,
        topology=topology,
        kvm_hyperv=draw(BOOL),
        max_phys_bits=draw(st.integers(32, 52)),
        affinity=draw(opt(st.lists(
            st.builds(m.CpuAffinity, vcpu=st.integers(0, 7),
                      host_cpus=st.lists(st.integers(0, 63), min_size=1, max_size=4)),
            min_size=1, max_size=3))),
        features=m.CpuFeatures(amx=draw(BOOL)),
    )
    shared = draw(BOOL)
    hugepages = draw(BOOL)
    zones = draw(opt(st.lists(st.builds(
        m.MemoryZoneConfig, id=st.just(""), size=SIZE, file=opt(PATH), shared=BOOL, hugepages=st.just(False),
        host_numa_node=opt(st.integers(0, 3)), hotplug_size=opt(SIZE), hotplugged_size=opt(SIZE), prefault=BOOL,
    ), min_size=1, max_size=2)))
    for i, zone in enumerate(zones or []):
        zone.id = f"zone{i}"
    memory = m.MemoryConfig(
        size=draw(SIZE), mergeable=False if shared or any(z.shared for z in zones or []) else draw(BOOL),
        hotplug_method=draw(st.sampled_from(list(m.HotplugMethod))), hotplug_size=draw(opt(SIZE)),
        hotplugged_size=draw(opt(SIZE)), shared=shared, hugepages=hugepages,
        hugepage_size=draw(st.sampled_from([None, 2 << 20, 1 << 30])) if hugepages else None,
        prefault=draw(BOOL), zones=zones, thp=draw(BOOL),
    )
    kernel_payload = draw(BOOL)
    payload = m.PayloadConfig(
        firmware=None if kernel_payload else draw(PATH),
        kernel=draw(PATH) if kernel_payload else None,
        cmdline=draw(opt(TEXT)),
        initramfs=draw(opt(PATH)),
    )
    groups = draw(opt(st.lists(limiter(), min_size=1, max_size=2)))
    rate_limit_groups = [m.RateLimiterGroupConfig(id=f"group{i}", rate_limiter_config=r)
                         for i, r in enumerate(groups or [])] or None
    disks = []
    for i in range(draw(st.integers(0, 3))):
        use_group = rate_limit_groups is not None and draw(BOOL)
        disks.append(m.DiskConfig(
            path=draw(PATH), readonly=draw(BOOL), direct=draw(BOOL), iommu=draw(BOOL),
            num_queues=draw(st.integers(1, boot)), queue_size=draw(POW2_QUEUE),
            rate_limit_group="group0" if use_group else None,
            rate_limiter_config=None if use_group else draw(opt(limiter())),
            id=draw(st.sampled_from([None, f"disk{i}"])), serial=draw(opt(TEXT)),
            queue_affinity=draw(opt(st.lists(
                st.builds(m.VirtQueueAffinity, queue_index=st.integers(0, 3),
                          host_cpus=st.lists(st.integers(0, 7), min_size=1, max_size=3)),
                min_size=1, max_size=2))),
        ))
    nets = []
    for i in range(draw(st.integers(0, 2))):
        csum = draw(BOOL)
        nets.append(m.NetConfig(
            tap=draw(opt(TEXT)), ip=draw(st.sampled_from(["192.168.249.1", "10.0.0.1"])),
            mask=draw(st.sampled_from(["255.255.255.0", "255.0.0.0"])),
            mac=draw(opt(st.just("12:34:56:78:90:ab"))), host_mac=draw(opt(st.just("02:00:00:00:00:01"))),
            mtu=draw(opt(st.integers(1280, 9000))), iommu=draw(BOOL), num_queues=2 * draw(st.integers(1, boot)),
            queue_size=draw(POW2_QUEUE), vhost_mode=draw(st.sampled_from(list(m.VhostMode))),
            id=draw(st.sampled_from([None, f"net{i}"])), rate_limiter_config=draw(opt(limiter())),
            offload_csum=csum, offload_tso=csum and draw(BOOL), offload_ufo=csum and draw(BOOL),
        ))

    def console(default_mode: m.ConsoleOutputMode) -> m.ConsoleConfig:
        mode = draw(st.sampled_from(list(m.ConsoleOutputMode)))
        return m.ConsoleConfig(
            mode=mode,
            file=draw(PATH) if mode is m.ConsoleOutputMode.FILE else None,
            socket=draw(PATH) if mode is m.ConsoleOutputMode.SOCKET else None,
            iommu=draw(BOOL),
        )

    dbg_mode = draw(st.sampled_from([m.ConsoleOutputMode.OFF, m.ConsoleOutputMode.PTY, m.ConsoleOutputMode.TTY,
                                     m.ConsoleOutputMode.FILE, m.ConsoleOutputMode.NULL]))
    return m.VmConfig(
        cpus=cpus,
        memory=memory,
        payload=payload,
        rate_limit_groups=rate_limit_groups,
        disks=disks or None,
        net=nets or None,
        rng=m.RngConfig(src=draw(PATH), iommu=draw(BOOL)),
        # below the smallest RAM: a balloon as large as RAM is refused
        balloon=draw(opt(st.builds(m.BalloonConfig, size=st.integers(0, (1 << 20) - 1), deflate_on_oom=BOOL,
                                   free_page_reporting=BOOL))),
        fs=None,
        pmem=draw(opt(st.lists(st.builds(m.PmemConfig, file=PATH, size=opt(SIZE), iommu=BOOL, discard_writes=BOOL),
                               min_size=1, max_size=2))),
        serial=console(m.ConsoleOutputMode.NULL),
        console=console(m.ConsoleOutputMode.TTY),
        debug_console=m.DebugConsoleConfig(
            mode=dbg_mode, file=draw(PATH) if dbg_mode is m.ConsoleOutputMode.FILE else None,
            iobase=draw(opt(st.integers(0, 0xFFFF))),
        ),
        devices=draw(opt(st.lists(
            st.builds(m.DeviceConfig, path=PATH, iommu=BOOL, x_nv_gpudirect_clique=opt(st.integers(0, 255))),
            min_size=1, max_size=2, unique_by=lambda d: d.path))),
        vdpa=draw(opt(st.lists(st.builds(m.VdpaConfig, path=PATH, num_queues=st.integers(1, 4), iommu=BOOL),
                               min_size=1, max_size=2))),
        vsock=draw(opt(st.builds(m.VsockConfig, cid=st.integers(3, 1 << 31), socket=PATH, iommu=BOOL))),
        pvpanic=draw(BOOL),
        sgx_epc=draw(opt(st.lists(st.builds(m.SgxEpcConfig, id=st.just("epc0"), size=SIZE, prefault=BOOL),
                                  min_size=1, max_size=1))),
        numa=draw(opt(st.lists(st.builds(
            m.NumaConfig, guest_numa_id=st.integers(0, 3),
            cpus=opt(st.lists(st.integers(0, 15), min_size=1, max_size=4)),
            distances=opt(st.lists(
                st.builds(m.NumaDistance, destination=st.integers(0, 3), distance=st.integers(10, 255)),
                min_size=1, max_size=2)),
        ), min_size=1, max_size=2))),
        watchdog=draw(BOOL),
        pci_segments=draw(opt(st.lists(
            st.builds(m.PciSegmentConfig, pci_segment=st.just(0), mmio32_aperture_weight=st.integers(1, 8),
                      mmio64_aperture_weight=st.integers(1, 8)),
            min_size=1, max_size=1))),
        platform=draw(opt(st.builds(m.PlatformConfig, num_pci_segments=st.integers(1, 4), serial_number=opt(TEXT),
                                    uuid=opt(TEXT), oem_strings=opt(st.lists(TEXT, min_size=1, max_size=3))))),
        tpm=draw(opt(st.builds(m.TpmConfig, socket=PATH))),
    )
