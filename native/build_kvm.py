"""cffi (API mode) builder for ``vmsh._native``: the KVM ABI taken from ``<linux/kvm.h>``.

The module is compiled against the system's uapi headers, so every ioctl number and every
struct layout comes from the header itself rather than being retyped in Python: cffi checks
each struct declared below against the compiler's view of it (a mismatch is a build error),
and ``#define X ...`` constants are evaluated by the compiler.

What it exposes:

- the structs the engine passes to ioctls (regs, sregs, fpu, cpuid2, msrs, vcpu events,
  memory regions, irqfd, ioeventfd, pit config, stats header/descriptor, ...);
- the ioctl numbers and the exit reasons as integer constants;
- ``VMSH_RUN_*``: byte offsets of the ``struct kvm_run`` fields the vCPU loop reads, so that
  Python can read them straight out of the mmap'd run page;
- ``vmsh_ioctl`` / ``vmsh_ioctl_val`` / ``vmsh_kvm_run``: ioctl wrappers returning ``-errno``
  instead of setting ``errno`` (no thread-local errno dance from Python).

cffi API-mode calls release the GIL for the duration of the C call (cffi's default
``release_gil=True``), which is what lets a vCPU thread sit in ``KVM_RUN`` while other Python
threads run; ``tests/engine/test_kvm.py`` checks it.

Built by ``setup.py`` (``cffi_modules``) at ``pip install``; it can also be run directly
(``python native/build_kvm.py``) to build in place.
"""

from __future__ import annotations

from cffi import FFI

ffibuilder = FFI()

# Struct declarations mirror <linux/kvm.h> / <asm/kvm.h>; cffi verifies them against the header.
CDEF_STRUCTS = """
struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
    uint64_t rip, rflags;
};
struct kvm_segment {
    uint64_t base;
    uint32_t limit;
    uint16_t selector;
    uint8_t type;
    uint8_t present, dpl, db, s, l, g, avl;
    uint8_t unusable;
    uint8_t padding;
};
struct kvm_dtable {
    uint64_t base;
    uint16_t limit;
    uint16_t padding[3];
};
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8;
    uint64_t efer;
    uint64_t apic_base;
    uint64_t interrupt_bitmap[4];
};
struct kvm_fpu {
    uint8_t fpr[8][16];
    uint16_t fcw;
    uint16_t fsw;
    uint8_t ftwx;
    uint8_t pad1;
    uint16_t last_opcode;
    uint64_t last_ip;
    uint64_t last_dp;
    uint8_t xmm[16][16];
    uint32_t mxcsr;
    uint32_t pad2;
};
struct kvm_userspace_memory_region {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
};
struct kvm_cpuid_entry2 {
    uint32_t function;
    uint32_t index;
    uint32_t flags;
    uint32_t eax;
    uint32_t ebx;
    uint32_t ecx;
    uint32_t edx;
    ...;
};
struct kvm_cpuid2 {
    uint32_t nent;
    struct kvm_cpuid_entry2 entries[];
    ...;
};
struct kvm_msr_entry {
    uint32_t index;
    uint32_t reserved;
    uint64_t data;
};
struct kvm_msrs {
    uint32_t nmsrs;
    struct kvm_msr_entry entries[];
    ...;
};
struct kvm_msr_list {
    uint32_t nmsrs;
    uint32_t indices[];
};
struct kvm_pit_config {
    uint32_t flags;
    ...;
};
struct kvm_irq_level {
    uint32_t irq;
    uint32_t level;
};
struct kvm_irqfd {
    uint32_t fd;
    uint32_t gsi;
    uint32_t flags;
    uint32_t resamplefd;
    ...;
};
struct kvm_ioeventfd {
    uint64_t datamatch;
    uint64_t addr;
    uint32_t len;
    int32_t fd;
    uint32_t flags;
    ...;
};
struct kvm_irq_routing_irqchip {
    uint32_t irqchip;
    uint32_t pin;
};
struct kvm_irq_routing_msi {
    uint32_t address_lo;
    uint32_t address_hi;
    uint32_t data;
    uint32_t pad;
};
struct kvm_irq_routing_entry {
    uint32_t gsi;
    uint32_t type;
    uint32_t flags;
    uint32_t pad;
    union {
        struct kvm_irq_routing_irqchip irqchip;
        struct kvm_irq_routing_msi msi;
        uint32_t pad[8];
    } u;
    ...;
};
struct kvm_irq_routing {
    uint32_t nr;
    uint32_t flags;
    struct kvm_irq_routing_entry entries[];
};
struct kvm_enable_cap {
    uint32_t cap;
    uint32_t flags;
    uint64_t args[4];
    ...;
};
struct kvm_lapic_state {
    char regs[1024];
};
struct kvm_stats_header {
    uint32_t flags;
    uint32_t name_size;
    uint32_t num_desc;
    uint32_t id_offset;
    uint32_t desc_offset;
    uint32_t data_offset;
};
struct kvm_stats_desc {
    uint32_t flags;
    int16_t exponent;
    uint16_t size;
    uint32_t offset;
    uint32_t bucket_size;
    ...;
};
struct kvm_mp_state {
    uint32_t mp_state;
};
struct kvm_xcr {
    uint32_t xcr;
    uint32_t reserved;
    uint64_t value;
};
struct kvm_xcrs {
    uint32_t nr_xcrs;
    uint32_t flags;
    struct kvm_xcr xcrs[16];
    ...;
};
struct kvm_debugregs {
    uint64_t db[4];
    uint64_t dr6;
    uint64_t dr7;
    uint64_t flags;
    ...;
};
struct kvm_irqchip {
    uint32_t chip_id;
    ...;
};
struct kvm_pit_state2 {
    uint32_t flags;
    ...;
};
struct kvm_clock_data {
    uint64_t clock;
    uint32_t flags;
    uint64_t realtime;
    uint64_t host_tsc;
    ...;
};
struct kvm_translation {
    uint64_t linear_address;
    uint64_t physical_address;
    uint8_t valid;
    uint8_t writeable;
    uint8_t usermode;
    ...;
};
"""

# The anonymous structs inside kvm_vcpu_events and kvm_run are reached through offsets and
# small typedef'd mirrors declared in the C source below (cffi cannot name anonymous members).
CDEF_EVENTS = """
typedef struct {
    uint8_t exception_injected;
    uint8_t exception_nr;
    uint8_t exception_has_error_code;
    uint8_t exception_pending;
    uint32_t exception_error_code;
    uint8_t interrupt_injected;
    uint8_t interrupt_nr;
    uint8_t interrupt_soft;
    uint8_t interrupt_shadow;
    uint8_t nmi_injected;
    uint8_t nmi_pending;
    uint8_t nmi_masked;
    uint32_t sipi_vector;
    uint32_t flags;
    uint8_t smi_smm;
    uint8_t smi_pending;
    uint8_t smi_smm_inside_nmi;
    uint8_t smi_latched_init;
    uint8_t triple_fault_pending;
    uint8_t exception_has_payload;
    uint64_t exception_payload;
} vmsh_vcpu_events;
"""

IOCTLS = [
    # /dev/kvm
    "KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_CHECK_EXTENSION", "KVM_GET_VCPU_MMAP_SIZE",
    "KVM_GET_SUPPORTED_CPUID", "KVM_GET_MSR_INDEX_LIST", "KVM_GET_MSR_FEATURE_INDEX_LIST",
    # vm
    "KVM_CREATE_VCPU", "KVM_SET_USER_MEMORY_REGION", "KVM_SET_TSS_ADDR", "KVM_SET_IDENTITY_MAP_ADDR",
    "KVM_CREATE_IRQCHIP", "KVM_CREATE_PIT2", "KVM_IRQ_LINE", "KVM_IRQFD", "KVM_IOEVENTFD",
    "KVM_ENABLE_CAP", "KVM_GET_STATS_FD", "KVM_SET_GSI_ROUTING",
    # vcpu
    "KVM_RUN", "KVM_GET_REGS", "KVM_SET_REGS", "KVM_GET_SREGS", "KVM_SET_SREGS", "KVM_GET_FPU",
    "KVM_SET_FPU", "KVM_SET_CPUID2", "KVM_GET_CPUID2", "KVM_GET_MSRS", "KVM_SET_MSRS",
    "KVM_GET_VCPU_EVENTS", "KVM_SET_VCPU_EVENTS", "KVM_GET_LAPIC", "KVM_SET_LAPIC", "KVM_TRANSLATE",
    "KVM_GET_XSAVE", "KVM_GET_XSAVE2", "KVM_SET_XSAVE", "KVM_GET_MP_STATE", "KVM_SET_MP_STATE",
    "KVM_GET_XCRS", "KVM_SET_XCRS", "KVM_GET_DEBUGREGS", "KVM_SET_DEBUGREGS", "KVM_GET_TSC_KHZ",
    "KVM_SET_TSC_KHZ", "KVM_NMI",
    # vm state
    "KVM_GET_IRQCHIP", "KVM_SET_IRQCHIP", "KVM_GET_PIT2", "KVM_SET_PIT2", "KVM_GET_CLOCK", "KVM_SET_CLOCK",
]

CONSTANTS = [
    "KVM_API_VERSION", "KVMIO",
    # exit reasons (linux/kvm.h)
    "KVM_EXIT_UNKNOWN", "KVM_EXIT_EXCEPTION", "KVM_EXIT_IO", "KVM_EXIT_HYPERCALL", "KVM_EXIT_DEBUG",
    "KVM_EXIT_HLT", "KVM_EXIT_MMIO", "KVM_EXIT_IRQ_WINDOW_OPEN", "KVM_EXIT_SHUTDOWN",
    "KVM_EXIT_FAIL_ENTRY", "KVM_EXIT_INTR", "KVM_EXIT_SET_TPR", "KVM_EXIT_TPR_ACCESS",
    "KVM_EXIT_NMI", "KVM_EXIT_INTERNAL_ERROR", "KVM_EXIT_SYSTEM_EVENT", "KVM_EXIT_IOAPIC_EOI",
    "KVM_EXIT_X86_RDMSR", "KVM_EXIT_X86_WRMSR", "KVM_EXIT_DIRTY_RING_FULL", "KVM_EXIT_X86_BUS_LOCK",
    "KVM_EXIT_NOTIFY",
    "KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT",
    "KVM_INTERNAL_ERROR_EMULATION", "KVM_INTERNAL_ERROR_SIMUL_EX", "KVM_INTERNAL_ERROR_DELIVERY_EV",
    "KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON",
    "KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES",
    "KVM_MP_STATE_RUNNABLE", "KVM_MP_STATE_UNINITIALIZED", "KVM_MP_STATE_INIT_RECEIVED",
    "KVM_MP_STATE_HALTED", "KVM_MP_STATE_SIPI_RECEIVED",
    "KVM_IRQCHIP_PIC_MASTER", "KVM_IRQCHIP_PIC_SLAVE", "KVM_IRQCHIP_IOAPIC", "KVM_CLOCK_TSC_STABLE",
    "KVM_SYSTEM_EVENT_SHUTDOWN", "KVM_SYSTEM_EVENT_RESET", "KVM_SYSTEM_EVENT_CRASH",
    # capabilities
    "KVM_CAP_IRQCHIP", "KVM_CAP_HLT", "KVM_CAP_USER_MEMORY", "KVM_CAP_SET_TSS_ADDR",
    "KVM_CAP_EXT_CPUID", "KVM_CAP_NR_VCPUS", "KVM_CAP_MAX_VCPUS", "KVM_CAP_NR_MEMSLOTS",
    "KVM_CAP_PIT2", "KVM_CAP_IRQFD", "KVM_CAP_IOEVENTFD", "KVM_CAP_SET_IDENTITY_MAP_ADDR",
    "KVM_CAP_VCPU_EVENTS", "KVM_CAP_IMMEDIATE_EXIT", "KVM_CAP_BINARY_STATS_FD",
    "KVM_CAP_INTERNAL_ERROR_DATA", "KVM_CAP_SPLIT_IRQCHIP", "KVM_CAP_X2APIC_API",
    "KVM_CAP_SIGNAL_MSI", "KVM_CAP_XSAVE", "KVM_CAP_XSAVE2", "KVM_CAP_IRQ_ROUTING",
    "KVM_CAP_TSC_CONTROL", "KVM_CAP_GET_TSC_KHZ",
    # flags
    "KVM_MEM_LOG_DIRTY_PAGES", "KVM_MEM_READONLY", "KVM_PIT_SPEAKER_DUMMY",
    "KVM_IRQ_ROUTING_IRQCHIP", "KVM_IRQ_ROUTING_MSI",
    "KVM_IRQFD_FLAG_DEASSIGN", "KVM_IOEVENTFD_FLAG_DATAMATCH", "KVM_IOEVENTFD_FLAG_PIO",
    "KVM_IOEVENTFD_FLAG_DEASSIGN", "KVM_VCPUEVENT_VALID_NMI_PENDING", "KVM_VCPUEVENT_VALID_SIPI_VECTOR",
    "KVM_VCPUEVENT_VALID_SHADOW", "KVM_VCPUEVENT_VALID_SMM", "KVM_VCPUEVENT_VALID_PAYLOAD",
    "KVM_VCPUEVENT_VALID_TRIPLE_FAULT", "KVM_CPUID_FLAG_SIGNIFCANT_INDEX",
    # binary stats
    "KVM_STATS_TYPE_MASK", "KVM_STATS_TYPE_CUMULATIVE", "KVM_STATS_TYPE_INSTANT",
    "KVM_STATS_TYPE_PEAK", "KVM_STATS_TYPE_LINEAR_HIST", "KVM_STATS_TYPE_LOG_HIST",
    "KVM_STATS_UNIT_MASK", "KVM_STATS_BASE_MASK",
]

# Byte offsets inside struct kvm_run, computed by the compiler with offsetof().
RUN_OFFSETS = {
    "VMSH_RUN_REQUEST_INTERRUPT_WINDOW": "request_interrupt_window",
    "VMSH_RUN_IMMEDIATE_EXIT": "immediate_exit",
    "VMSH_RUN_EXIT_REASON": "exit_reason",
    "VMSH_RUN_READY_FOR_INTERRUPT_INJECTION": "ready_for_interrupt_injection",
    "VMSH_RUN_IF_FLAG": "if_flag",
    "VMSH_RUN_HW_FAIL_REASON": "hw.hardware_exit_reason",
    "VMSH_RUN_FAIL_ENTRY_REASON": "fail_entry.hardware_entry_failure_reason",
    "VMSH_RUN_IO_DIRECTION": "io.direction",
    "VMSH_RUN_IO_SIZE": "io.size",
    "VMSH_RUN_IO_PORT": "io.port",
    "VMSH_RUN_IO_COUNT": "io.count",
    "VMSH_RUN_IO_DATA_OFFSET": "io.data_offset",
    "VMSH_RUN_MMIO_PHYS_ADDR": "mmio.phys_addr",
    "VMSH_RUN_MMIO_DATA": "mmio.data",
    "VMSH_RUN_MMIO_LEN": "mmio.len",
    "VMSH_RUN_MMIO_IS_WRITE": "mmio.is_write",
    "VMSH_RUN_INTERNAL_SUBERROR": "internal.suberror",
    "VMSH_RUN_INTERNAL_NDATA": "internal.ndata",
    "VMSH_RUN_INTERNAL_DATA": "internal.data",
    "VMSH_RUN_EMUL_FLAGS": "emulation_failure.flags",
    "VMSH_RUN_EMUL_INSN_SIZE": "emulation_failure.insn_size",
    "VMSH_RUN_EMUL_INSN_BYTES": "emulation_failure.insn_bytes",
    "VMSH_RUN_SYSTEM_EVENT_TYPE": "system_event.type",
    "VMSH_RUN_SYSTEM_EVENT_NDATA": "system_event.ndata",
    "VMSH_RUN_SYSTEM_EVENT_DATA": "system_event.data",
}

CDEF_FUNCS = """
long vmsh_ioctl(int fd, unsigned long request, void *arg);
long vmsh_ioctl_val(int fd, unsigned long request, unsigned long arg);
int vmsh_kvm_run(int fd);
long long vmsh_kvm_run_packed(int fd, const struct kvm_run *run);
#define VMSH_PACKED_DIR_OUT ...
#define VMSH_PACKED_MULTI ...
int vmsh_get_vcpu_events(int fd, vmsh_vcpu_events *out);
int vmsh_set_vcpu_events(int fd, const vmsh_vcpu_events *in);
"""

C_SOURCE = r"""
#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

""" + CDEF_EVENTS + r"""

/* INVARIANTS: arg points to a buffer of the size the request encodes (the Python layer
 * allocates it with ffi.new of the matching struct); fd is a KVM fd owned by the caller. */
long vmsh_ioctl(int fd, unsigned long request, void *arg)
{
    long r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

long vmsh_ioctl_val(int fd, unsigned long request, unsigned long arg)
{
    long r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

/* One KVM_RUN; the GIL is released around this call by cffi. Returns 0 or -errno. */
int vmsh_kvm_run(int fd)
{
    int r = ioctl(fd, KVM_RUN, 0);
    return r < 0 ? -errno : 0;
}

/* KVM_RUN plus the decoding of the common exit, in one call from Python (the vCPU loop's
 * hot path; see vmsh/engine/vcpu.py). Returns -errno, or
 *   bits 0-7 exit_reason, and for KVM_EXIT_IO:
 *   bit 8 direction (1 = out), bit 9 "multi" (count != 1: read kvm_run.io yourself),
 *   bits 12-15 size, bits 16-31 port, bits 32-62 data_offset.
 * INVARIANTS: run is this vCPU's mmap'd kvm_run page, valid while the fd is open. */
#define VMSH_PACKED_DIR_OUT 0x100
#define VMSH_PACKED_MULTI 0x200
long long vmsh_kvm_run_packed(int fd, const struct kvm_run *run)
{
    if (ioctl(fd, KVM_RUN, 0) < 0)
        return -errno;
    long long r = run->exit_reason & 0xff;
    if (run->exit_reason == KVM_EXIT_IO) {
        if (run->io.count != 1)
            r |= VMSH_PACKED_MULTI;
        r |= (long long)(run->io.direction ? VMSH_PACKED_DIR_OUT : 0)
           | ((long long)(run->io.size & 0xf) << 12)
           | ((long long)run->io.port << 16)
           | ((long long)(run->io.data_offset & 0x7fffffff) << 32);
    }
    return r;
}

/* kvm_vcpu_events is made of anonymous structs cffi cannot declare; copy field by field. */
int vmsh_get_vcpu_events(int fd, vmsh_vcpu_events *out)
{
    struct kvm_vcpu_events ev;
    memset(&ev, 0, sizeof(ev));
    if (ioctl(fd, KVM_GET_VCPU_EVENTS, &ev) < 0)
        return -errno;
    out->exception_injected = ev.exception.injected;
    out->exception_nr = ev.exception.nr;
    out->exception_has_error_code = ev.exception.has_error_code;
    out->exception_pending = ev.exception.pending;
    out->exception_error_code = ev.exception.error_code;
    out->interrupt_injected = ev.interrupt.injected;
    out->interrupt_nr = ev.interrupt.nr;
    out->interrupt_soft = ev.interrupt.soft;
    out->interrupt_shadow = ev.interrupt.shadow;
    out->nmi_injected = ev.nmi.injected;
    out->nmi_pending = ev.nmi.pending;
    out->nmi_masked = ev.nmi.masked;
    out->sipi_vector = ev.sipi_vector;
    out->flags = ev.flags;
    out->smi_smm = ev.smi.smm;
    out->smi_pending = ev.smi.pending;
    out->smi_smm_inside_nmi = ev.smi.smm_inside_nmi;
    out->smi_latched_init = ev.smi.latched_init;
    out->triple_fault_pending = ev.triple_fault.pending;
    out->exception_has_payload = ev.exception_has_payload;
    out->exception_payload = ev.exception_payload;
    return 0;
}

int vmsh_set_vcpu_events(int fd, const vmsh_vcpu_events *in)
{
    struct kvm_vcpu_events ev;
    memset(&ev, 0, sizeof(ev));
    ev.exception.injected = in->exception_injected;
    ev.exception.nr = in->exception_nr;
    ev.exception.has_error_code = in->exception_has_error_code;
    ev.exception.pending = in->exception_pending;
    ev.exception.error_code = in->exception_error_code;
    ev.interrupt.injected = in->interrupt_injected;
    ev.interrupt.nr = in->interrupt_nr;
    ev.interrupt.soft = in->interrupt_soft;
    ev.interrupt.shadow = in->interrupt_shadow;
    ev.nmi.injected = in->nmi_injected;
    ev.nmi.pending = in->nmi_pending;
    ev.nmi.masked = in->nmi_masked;
    ev.sipi_vector = in->sipi_vector;
    ev.flags = in->flags;
    ev.smi.smm = in->smi_smm;
    ev.smi.pending = in->smi_pending;
    ev.smi.smm_inside_nmi = in->smi_smm_inside_nmi;
    ev.smi.latched_init = in->smi_latched_init;
    ev.triple_fault.pending = in->triple_fault_pending;
    ev.exception_has_payload = in->exception_has_payload;
    ev.exception_payload = in->exception_payload;
    if (ioctl(fd, KVM_SET_VCPU_EVENTS, &ev) < 0)
        return -errno;
    return 0;
}
"""

C_SOURCE += "".join(
    f"#define {name} offsetof(struct kvm_run, {field})\n" for name, field in RUN_OFFSETS.items()
)
C_SOURCE += "#define VMSH_KVM_RUN_SIZE sizeof(struct kvm_run)\n"

ffibuilder.cdef(
    CDEF_STRUCTS
    + CDEF_EVENTS
    + "".join(f"#define {name} ...\n" for name in IOCTLS + CONSTANTS + list(RUN_OFFSETS))
    + "#define VMSH_KVM_RUN_SIZE ...\n"
    + CDEF_FUNCS
)
ffibuilder.set_source("vmsh._native", C_SOURCE, extra_compile_args=["-O2"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=False)
