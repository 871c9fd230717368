/*
 * The register fuzzer's guest (ci/fuzz/fuzz_registers.py): a PVH "kernel" that enters long
 * mode, maps what the host asks for and then runs the port and MMIO accesses the host writes
 * into a mailbox in guest RAM, chunk after chunk. It has no driver logic of its own: every
 * value it writes comes from the host.
 *
 * Boot: the PVH entry is 32-bit protected mode with paging off (Xen's PVH ABI, as Linux's
 * arch/x86/platform/pvh/head.S takes it); this code loads a GDT, turns on PAE, loads the
 * static page tables below (the low 4 GiB identity-mapped with 2 MiB pages), sets EFER.LME and
 * CR0.PG and jumps to 64-bit code (Intel SDM vol. 3A §9.8.5, "Initializing IA-32e mode").
 *
 * The mailbox protocol (the field offsets are MB_* below and in fuzz_registers.py):
 *   1. the guest clears done/cursor/fault and increments `boots`;
 *   2. the host sees `boots` change, writes up to 16 1 GiB-aligned physical bases to map (the
 *      PCI segments' 64-bit windows) and sets `map_ack` = `boots`;
 *   3. the guest builds page tables for them itself (the host never writes page tables while
 *      the guest runs: a shadow-paging hypervisor would not see it), loads an IDT, masks the
 *      8259s, starts the local APIC timer (1 ms, periodic) and sets `ready` = `boots`;
 *   4. loop: sleep (HLT, woken by the timer) until `go` != `done`; run `count` entries of
 *      24 bytes (u64 address, u64 value, u8 op, u8 size, u16 count), writing each one's index to
 *      `cursor` before doing it and storing what a read returned over `value`; set
 *      `done` = `go`.
 * Interrupts the fuzzed devices raise (any MSI vector 16..255) are acknowledged and counted
 * (in total and per vector, at MB_VECTORS);
 * an exception (vectors 0..15 but NMI) is recorded in `fault` and stops the guest.
 */

    .set LOAD,        0x1000000          /* the PVH load address (tests/engine/tiny_kernel.py) */
    .set MAILBOX,     0x1100000
    .set MB_MAGIC,    MAILBOX + 0x00
    .set MB_BOOTS,    MAILBOX + 0x08
    .set MB_MAP_ACK,  MAILBOX + 0x10
    .set MB_READY,    MAILBOX + 0x18
    .set MB_GO,       MAILBOX + 0x20
    .set MB_DONE,     MAILBOX + 0x28
    .set MB_COUNT,    MAILBOX + 0x30
    .set MB_CURSOR,   MAILBOX + 0x38
    .set MB_FAULT,    MAILBOX + 0x40
    .set MB_FAULT_RIP, MAILBOX + 0x48
    .set MB_MAP_COUNT, MAILBOX + 0x50
    .set MB_IRQS,     MAILBOX + 0x58
    .set MB_MAPPED,   MAILBOX + 0x60
    .set MB_MAP_LIST, MAILBOX + 0x80
    .set MB_VECTORS,  MAILBOX + 0x400        /* u32 per vector: interrupts taken */
    .set MB_ENTRIES,  MAILBOX + 0x1000
    .set MAP_MAX,     16
    .set POOL_PAGES,  2 * MAP_MAX
    .set APIC,        0xFEE00000
    .set TIMER_VECTOR, 0x30
    .set FAULT_STUB,  32                 /* bytes per fault stub */
    .set IRQ_STUB,    16                 /* bytes per interrupt stub */

    .text
    .code32
    .globl _start
_start:
    cli
    lgdt gdt_desc
    mov $0x20, %eax                      /* CR4.PAE */
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx                /* EFER */
    rdmsr
    or $0x100, %eax                      /* LME */
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax                 /* PG | PE */
    mov %eax, %cr0
    ljmp $0x08, $long_mode

    .code64
long_mode:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    mov $stack_top, %rsp
    cld

    movabs $0x5a5a464745524d56, %rax     /* "VMREGFZZ" */
    mov %rax, MB_MAGIC
    movq $0, MB_DONE
    movq $-1, MB_CURSOR
    movq $0, MB_FAULT
    movq $0, MB_IRQS
    movq $0, MB_MAPPED
    mov $MB_VECTORS, %rdi
    xor %eax, %eax
    mov $256, %ecx
    rep stosl
    mov MB_BOOTS, %rax
    inc %rax
    mov %rax, MB_BOOTS
    mov %rax, %r15                       /* this boot's number */

wait_map:
    pause
    cmp MB_MAP_ACK, %r15
    jne wait_map

    /* map the host's list: each base gets a page directory of 512 2 MiB pages */
    mov MB_MAP_COUNT, %rcx
    cmp $MAP_MAX, %rcx
    jbe 1f
    mov $MAP_MAX, %rcx
1:  xor %r8, %r8                         /* list index */
    mov $pool, %r9                       /* next free page of the pool */
    movabs $0x000FFFFFFFFFF000, %r11     /* address bits of an entry */
map_next:
    cmp %rcx, %r8
    jae map_done
    mov MB_MAP_LIST(,%r8,8), %rax
    inc %r8
    and $-0x40000000, %rax               /* 1 GiB aligned */
    mov %rax, %rbx
    shr $39, %rbx
    and $511, %rbx                       /* PML4 index */
    mov pml4(,%rbx,8), %rdx
    test %rdx, %rdx
    jnz 2f
    mov %r9, %rdx
    add $4096, %r9
    or $3, %rdx
    mov %rdx, pml4(,%rbx,8)
2:  and %r11, %rdx                       /* the PDPT */
    mov %rax, %rbx
    shr $30, %rbx
    and $511, %rbx                       /* PDPT index */
    cmpq $0, (%rdx,%rbx,8)
    jne map_next                         /* already mapped (the low 4 GiB, a repeat) */
    mov %r9, %rdi                        /* a new page directory */
    add $4096, %r9
    xor %esi, %esi
3:  mov %rsi, %r10
    shl $21, %r10
    add %rax, %r10
    or $0x83, %r10                       /* present, writable, 2 MiB */
    mov %r10, (%rdi,%rsi,8)
    inc %rsi
    cmp $512, %rsi
    jne 3b
    or $3, %rdi
    mov %rdi, (%rdx,%rbx,8)
    incq MB_MAPPED
    jmp map_next
map_done:
    mov %cr3, %rax
    mov %rax, %cr3                       /* flush */

    /* IDT: 0..15 faults (2, NMI, returns), 16..255 count, acknowledge and return */
    xor %ecx, %ecx
idt_fill:
    lea -16(%rcx), %eax
    shl $4, %eax                          /* IRQ_STUB * (vector - 16) */
    add $irq_stubs, %eax
    cmp $16, %ecx
    jae 4f
    mov $nmi_entry, %rax
    cmp $2, %ecx
    je 4f
    mov %ecx, %eax
    imul $FAULT_STUB, %eax
    add $fault_stubs, %eax
4:  mov %rcx, %rdi
    shl $4, %rdi
    add $idt, %rdi
    mov %ax, (%rdi)                      /* offset 15..0 */
    movw $0x08, 2(%rdi)                  /* selector */
    movw $0x8E00, 4(%rdi)                /* present, DPL 0, 64-bit interrupt gate */
    mov %rax, %rdx
    shr $16, %rdx
    mov %dx, 6(%rdi)                     /* offset 31..16 */
    shr $32, %rax
    mov %eax, 8(%rdi)                    /* offset 63..32 */
    movl $0, 12(%rdi)
    inc %ecx
    cmp $256, %ecx
    jne idt_fill
    lidt idt_desc

    /* the 8259s: remap to 0x20/0x28 and mask every line (KVM's in-kernel PIC) */
    mov $0x11, %al
    out %al, $0x20
    out %al, $0xA0
    mov $0x20, %al
    out %al, $0x21
    mov $0x28, %al
    out %al, $0xA1
    mov $4, %al
    out %al, $0x21
    mov $2, %al
    out %al, $0xA1
    mov $1, %al
    out %al, $0x21
    out %al, $0xA1
    mov $0xFF, %al
    out %al, $0x21
    out %al, $0xA1

    /* local APIC (KVM's): software enable, timer periodic every 1 ms (bus clock 1 GHz / 16) */
    mov $APIC, %edi                      /* (an absolute disp32 would be sign-extended) */
    movl $0x1FF, 0xF0(%rdi)
    movl $0x3, 0x3E0(%rdi)
    movl $(0x20000 | TIMER_VECTOR), 0x320(%rdi)
    movl $62500, 0x380(%rdi)

    mov %r15, MB_READY
    sti

idle:
    mov MB_GO, %rax
    cmp MB_DONE, %rax
    jne run_chunk
    hlt
    jmp idle

run_chunk:
    mov %rax, %r12                       /* the chunk's number */
    mov MB_COUNT, %r13
    mov $MB_ENTRIES, %rsi
    xor %ebx, %ebx
next_entry:
    cmp %r13, %rbx
    jae chunk_done
    mov %rbx, MB_CURSOR
    mov (%rsi), %rdi                     /* address */
    mov 8(%rsi), %rax                    /* value */
    movzbl 16(%rsi), %ecx                /* op */
    movzbl 17(%rsi), %r8d                /* size */
    cmp $0, %ecx
    je port_out
    cmp $1, %ecx
    je port_in
    cmp $2, %ecx
    je mmio_write
    cmp $3, %ecx
    je mmio_read
    cmp $4, %ecx
    je port_outs
    cmp $5, %ecx
    je port_ins
    jmp entry_done

    /* rep outs / rep ins: `count` elements of `size` bytes between the port and RAM at `value` */
port_outs:
    movzwl 18(%rsi), %ecx
    mov %edi, %edx
    push %rsi
    mov %rax, %rsi
    cmp $1, %r8d
    je 1f
    cmp $2, %r8d
    je 2f
    rep outsl
    jmp 3f
1:  rep outsb
    jmp 3f
2:  rep outsw
3:  pop %rsi
    jmp entry_done

port_ins:
    movzwl 18(%rsi), %ecx
    mov %edi, %edx
    mov %rax, %rdi
    cmp $1, %r8d
    je 1f
    cmp $2, %r8d
    je 2f
    rep insl
    jmp entry_done
1:  rep insb
    jmp entry_done
2:  rep insw
    jmp entry_done

port_out:
    mov %edi, %edx
    cmp $1, %r8d
    je 1f
    cmp $2, %r8d
    je 2f
    out %eax, %dx
    jmp entry_done
1:  out %al, %dx
    jmp entry_done
2:  out %ax, %dx
    jmp entry_done

port_in:
    mov %edi, %edx
    xor %eax, %eax
    cmp $1, %r8d
    je 1f
    cmp $2, %r8d
    je 2f
    in %dx, %eax
    jmp read_done
1:  in %dx, %al
    jmp read_done
2:  in %dx, %ax
    jmp read_done

mmio_write:
    cmp $1, %r8d
    je 1f
    cmp $2, %r8d
    je 2f
    cmp $4, %r8d
    je 4f
    mov %rax, (%rdi)
    jmp entry_done
1:  mov %al, (%rdi)
    jmp entry_done
2:  mov %ax, (%rdi)
    jmp entry_done
4:  mov %eax, (%rdi)
    jmp entry_done

mmio_read:
    cmp $1, %r8d
    je 1f
    cmp $2, %r8d
    je 2f
    cmp $4, %r8d
    je 4f
    mov (%rdi), %rax
    jmp read_done
1:  movzbl (%rdi), %eax
    jmp read_done
2:  movzwl (%rdi), %eax
    jmp read_done
4:  mov (%rdi), %eax
read_done:
    mov %rax, 8(%rsi)
entry_done:
    add $24, %rsi
    inc %rbx
    jmp next_entry

chunk_done:
    movq $-1, MB_CURSOR
    mov %r12, MB_DONE
    jmp idle

    /* one stub per vector 16..255: push the vector, count it, EOI */
    .balign IRQ_STUB
irq_stubs:
    .set vec, 16
    .rept 240
    .balign IRQ_STUB
    pushq $vec
    jmp irq_common
    .set vec, vec + 1
    .endr
irq_common:
    push %rax
    mov 8(%rsp), %rax
    incl MB_VECTORS(,%rax,4)
    incq MB_IRQS
    mov $APIC, %eax
    movl $0, 0xB0(%rax)                  /* EOI */
    pop %rax
    add $8, %rsp                         /* the vector */
    iretq

nmi_entry:
    iretq

    /* one stub per vector 0..15 (same size each): record the vector and the word on top of
       the stack (the rip, or the error code), then stop */
    .balign FAULT_STUB
fault_stubs:
    .set vec, 0
    .rept 16
    .balign FAULT_STUB
    movq $(vec + 1), MB_FAULT
    jmp fault_common
    .set vec, vec + 1
    .endr
fault_common:
    mov (%rsp), %rax
    mov %rax, MB_FAULT_RIP
5:  cli
    hlt
    jmp 5b

    .balign 16
gdt:
    .quad 0
    .quad 0x00AF9B000000FFFF             /* 0x08: 64-bit code (accessed already: the CPU */
    .quad 0x00CF93000000FFFF             /* 0x10: data            never writes this page) */
gdt_end:
gdt_desc:
    .word gdt_end - gdt - 1
    .quad gdt
    .balign 16
idt_desc:
    .word 256 * 16 - 1
    .quad idt

    /* page tables: the low 4 GiB identity-mapped with 2 MiB pages */
    .balign 4096
pml4:
    .quad pdpt0 + 3
    .fill 511, 8, 0
pdpt0:
    .quad pd0 + 3, pd0 + 0x1003, pd0 + 0x2003, pd0 + 0x3003
    .fill 508, 8, 0
pd0:
    .set addr, 0
    .rept 2048
    .quad addr + 0x83
    .set addr, addr + 0x200000
    .endr
idt:
    .fill 256 * 16, 1, 0
pool:
    .fill POOL_PAGES * 4096, 1, 0
stack:
    .fill 8192, 1, 0
stack_top:
image_end:
