"""The x86_64 boot path: memory layout, kernel loaders, boot tables and initial vCPU state.

Facts as cloud-hypervisor's ``arch/src/x86_64/`` has them (``layout.rs``, ``mod.rs``,
``regs.rs``: layout, PVH and zero-page contents, register values); the protocols themselves are
Linux Documentation/arch/x86/boot.rst (bzImage) and Xen's docs/misc/pvh.pandoc with
xen/include/public/arch-x86/hvm/start_info.h (PVH).
"""
