"""Plain-data mirrors of the KVM register structs of ``<linux/kvm.h>`` (x86 ``<asm/kvm.h>``).

``Regs``, ``Segment``, ``DTable``, ``Sregs``, ``Fpu``, ``CpuidEntry`` and ``VcpuEvents`` are
what the ioctl wrappers (``vmsh.engine.kvm_vcpu``) take and return, so register sets can be
logged, compared and stored in snapshots without touching cffi. Every integer field carries the
width of its C member (``vmsh.state_types.U8`` ... ``U64``): a snapshot's value that does not
fit is refused by the decoder, naming the field, instead of overflowing in cffi. Byte arrays
(``Fpu.fpr``, ``Fpu.xmm``) stay ``bytes``.

The ``*_from_c`` / :func:`copy_to_c` helpers convert between these and the cffi structs; they
take the cffi objects as given and import no cffi themselves.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vmsh.state_types import U8, U16, U32, U64


@dataclass(slots=True)
class Regs:
    """``struct kvm_regs``: the general-purpose registers, rip and rflags (all ``__u64``)."""

    rax: U64 = 0
    rbx: U64 = 0
    rcx: U64 = 0
    rdx: U64 = 0
    rsi: U64 = 0
    rdi: U64 = 0
    rsp: U64 = 0
    rbp: U64 = 0
    r8: U64 = 0
    r9: U64 = 0
    r10: U64 = 0
    r11: U64 = 0
    r12: U64 = 0
    r13: U64 = 0
    r14: U64 = 0
    r15: U64 = 0
    rip: U64 = 0
    rflags: U64 = 0x2


#: kvm_regs field order (not the x86 encoding order: see ``vmsh.engine.x86.emulate.GPR_NAMES``)
REG_FIELDS = tuple(f.name for f in dataclasses.fields(Regs))


@dataclass(slots=True)
class Segment:
    """``struct kvm_segment``: a segment register with its hidden descriptor cache."""

    base: U64 = 0
    limit: U32 = 0
    selector: U16 = 0
    type: U8 = 0
    present: U8 = 0
    dpl: U8 = 0
    db: U8 = 0
    s: U8 = 0
    l: U8 = 0  # noqa: E741 - the uapi field name
    g: U8 = 0
    avl: U8 = 0
    unusable: U8 = 0


@dataclass(slots=True)
class DTable:
    """``struct kvm_dtable``: GDTR or IDTR."""

    base: U64 = 0
    limit: U16 = 0


@dataclass(slots=True)
class Sregs:
    """``struct kvm_sregs``: segments, descriptor tables, control registers, EFER, APIC base."""

    cs: Segment = field(default_factory=Segment)
    ds: Segment = field(default_factory=Segment)
    es: Segment = field(default_factory=Segment)
    fs: Segment = field(default_factory=Segment)
    gs: Segment = field(default_factory=Segment)
    ss: Segment = field(default_factory=Segment)
    tr: Segment = field(default_factory=Segment)
    ldt: Segment = field(default_factory=Segment)
    gdt: DTable = field(default_factory=DTable)
    idt: DTable = field(default_factory=DTable)
    cr0: U64 = 0
    cr2: U64 = 0
    cr3: U64 = 0
    cr4: U64 = 0
    cr8: U64 = 0
    efer: U64 = 0
    apic_base: U64 = 0
    #: ``__u64 interrupt_bitmap[(KVM_NR_INTERRUPTS + 63) / 64]``, 256 interrupts
    interrupt_bitmap: tuple[U64, U64, U64, U64] = (0, 0, 0, 0)


@dataclass(slots=True)
class Fpu:
    """``struct kvm_fpu`` (FXSAVE layout): x87 registers, control/status words, XMM, MXCSR."""

    fpr: bytes = bytes(128)
    fcw: U16 = 0x37F
    fsw: U16 = 0
    ftwx: U8 = 0
    last_opcode: U16 = 0
    last_ip: U64 = 0
    last_dp: U64 = 0
    xmm: bytes = bytes(256)
    mxcsr: U32 = 0x1F80


@dataclass(slots=True)
class CpuidEntry:
    """``struct kvm_cpuid_entry2``: one CPUID leaf/subleaf (all ``__u32``)."""

    function: U32
    index: U32 = 0
    flags: U32 = 0
    eax: U32 = 0
    ebx: U32 = 0
    ecx: U32 = 0
    edx: U32 = 0


@dataclass(slots=True)
class VcpuEvents:
    """``struct kvm_vcpu_events``: pending/injected exception, interrupt, NMI and SMI state.

    The header's nested anonymous structs are flattened (``exception.injected`` is
    ``exception_injected``), as in the cffi mirror ``vmsh_vcpu_events``.
    """

    exception_injected: U8 = 0
    exception_nr: U8 = 0
    exception_has_error_code: U8 = 0
    exception_pending: U8 = 0
    exception_error_code: U32 = 0
    interrupt_injected: U8 = 0
    interrupt_nr: U8 = 0
    interrupt_soft: U8 = 0
    interrupt_shadow: U8 = 0
    nmi_injected: U8 = 0
    nmi_pending: U8 = 0
    nmi_masked: U8 = 0
    sipi_vector: U32 = 0
    flags: U32 = 0
    smi_smm: U8 = 0
    smi_pending: U8 = 0
    smi_smm_inside_nmi: U8 = 0
    smi_latched_init: U8 = 0
    triple_fault_pending: U8 = 0
    exception_has_payload: U8 = 0
    exception_payload: U64 = 0


def copy_to_c(obj: Any, cobj: Any) -> None:
    """Copy a mirror dataclass into the cffi struct ``cobj`` of the same field names."""
    for f in dataclasses.fields(obj):
        val = getattr(obj, f.name)
        if dataclasses.is_dataclass(val):
            copy_to_c(val, getattr(cobj, f.name))
        elif isinstance(val, (bytes, tuple)):
            dst = getattr(cobj, f.name)
            for i, v in enumerate(val):
                dst[i] = v
        else:
            setattr(cobj, f.name, val)


def segment_from_c(c: Any) -> Segment:
    """A :class:`Segment` from a cffi ``struct kvm_segment``."""
    return Segment(c.base, c.limit, c.selector, c.type, c.present, c.dpl, c.db, c.s, c.l, c.g,
                   c.avl, c.unusable)


def cpuid_entry_from_c(c: Any) -> CpuidEntry:
    """A :class:`CpuidEntry` from a cffi ``struct kvm_cpuid_entry2``."""
    return CpuidEntry(c.function, c.index, c.flags, c.eax, c.ebx, c.ecx, c.edx)
