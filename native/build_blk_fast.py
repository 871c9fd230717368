"""cffi (API mode) builder for ``vmsh._blkfast``: virtio-blk's native request path
(``blk_fast.c``; used by ``vmsh/devices/virtio/block_fast.py``, issue #18).

A module of its own, apart from ``vmsh._native`` (the KVM ABI), because devices never import
KVM (the layers ``tests/unit/test_layers.py`` checks): it knows guest RAM only as the regions
it is given.
cffi releases the GIL around ``vmsh_blk_fast``, so vCPU threads run while it reads the disk;
``vmsh_blk_server_*`` run a queue's server thread, which never takes the GIL.

Built by ``setup.py`` (``cffi_modules``) at ``pip install``, or in place with
``python3 setup.py build_ext --inplace``.
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

ffibuilder = FFI()

CDEF_BLK_FAST = """
typedef struct { uint64_t start, size, host; } vbf_region;
typedef struct {
    uint64_t desc_table, avail_ring, used_ring;
    uint32_t size;
    int indirect;
    int event_idx;
    uint16_t next_avail, next_used, shadow_avail;
} vbf_queue;
typedef struct { int fd; int readonly; uint64_t capacity; } vbf_disk;
typedef struct {
    uint64_t read_ops, read_bytes, write_ops, write_bytes, flush_ops, errors;
    int stop;
    int err;
} vbf_counts;
typedef struct { ...; } vbf_scratch;
#define VBF_STOP_EMPTY ...
#define VBF_STOP_PYTHON ...
#define VBF_STOP_ERROR ...
int vmsh_blk_fast(vbf_queue *q, const vbf_region *regs, int nregs, const vbf_disk *disk,
                  vbf_counts *c, vbf_scratch *s);
#define VBS_HANDOFF_QUEUE ...
#define VBS_HANDOFF_SIGNAL ...
typedef struct {
    vbf_queue q;
    vbf_counts c;
    vbf_scratch *scratch;
    const vbf_region *regs;
    int nregs;
    const vbf_disk *disk;
    int kick_fd;
    int wake_fd;
    int python_fd;
    int irq_fd;
    int stop;
    int handoff;
    int signalled_valid;
    uint16_t signalled_used;
    char name[16];
    ...;
} vbs_server;
int vmsh_blk_server_start(vbs_server *s);
void vmsh_blk_server_stop(vbs_server *s);
int vmsh_blk_server_take(vbs_server *s);
void vmsh_blk_server_set_irq_fd(vbs_server *s, int fd);
"""


ffibuilder.cdef(CDEF_BLK_FAST)
ffibuilder.set_source("vmsh._blkfast", (Path(__file__).resolve().parent / "blk_fast.c").read_text(),
                      extra_compile_args=["-O2", "-pthread"], extra_link_args=["-pthread"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=False)
