"""The x86_64 boot path: memory layout, kernel loaders, boot tables and initial vCPU state.

Facts from reference/cloud-hypervisor.md §6 (layout, PVH and zero-page contents, register
values); the protocols themselves are Linux Documentation/arch/x86/boot.rst (bzImage) and
Xen's docs/misc/pvh.pandoc with xen/include/public/arch-x86/hvm/start_info.h (PVH).
"""
