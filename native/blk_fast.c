/* virtio-blk fast path (see vmsh/devices/virtio/block_fast.py): serve a kick's plain requests
 * - IN, OUT and FLUSH on a raw image with synchronous I/O - in one call, so that a request runs
 * a few hundred instructions of C instead of a few thousand of cold Python (issue #18).
 *
 * The rings and buffers are guest memory, written by a hostile driver: every address and length
 * is checked to lie in one of the RAM regions given, every descriptor is copied before it is
 * used, and a walk is bounded by the table size (virtio 1.2 §2.7.5, §2.7.5.3). Anything this
 * code does not serve exactly as vmsh/devices/virtio/queue.py and block.py would - an error, an
 * unusual layout, another request type - is left in the ring for the Python path, which then
 * behaves as it always did (raising VirtQueueError, answering UNSUPP, ...). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#define VBF_DESC_F_NEXT 1
#define VBF_DESC_F_WRITE 2
#define VBF_DESC_F_INDIRECT 4

/* The interface (declared again for cffi in native/build_kvm.py). */
typedef struct { uint64_t start, size, host; } vbf_region;  /* guest RAM: guest address, bytes, host address */
typedef struct {
    uint64_t desc_table, avail_ring, used_ring;
    uint32_t size;       /* a power of two, checked by the transport at activation */
    int indirect;        /* VIRTIO_F_INDIRECT_DESC was negotiated */
    int event_idx;       /* VIRTIO_F_EVENT_IDX was negotiated */
    uint16_t next_avail, next_used, shadow_avail;  /* in/out: the queue's positions */
} vbf_queue;
typedef struct { int fd; int readonly; uint64_t capacity; } vbf_disk;  /* capacity in sectors */
typedef struct {
    uint64_t read_ops, read_bytes, write_ops, write_bytes, flush_ops, errors;  /* added to */
    int stop;            /* why the call returned: VBF_STOP_* */
    int err;             /* errno of a failed request (VBF_STOP_ERROR) */
} vbf_counts;
#define VBF_STOP_EMPTY 0   /* the ring is empty (with EVENT_IDX: avail_event re-armed and checked again) */
#define VBF_STOP_PYTHON 1  /* the next chain is for the Python path */
#define VBF_STOP_ERROR 2   /* the last request completed with IOERR (err says why) */
struct vbf_desc { uint64_t addr; uint32_t len; uint16_t flags; uint16_t next; };
#define VBF_MAX_SEGS 1024  /* IOV_MAX: more goes the Python way */
#define VBF_MAX_INDIRECT 1024  /* entries of an indirect table copied here */
typedef struct {
    struct iovec riov[VBF_MAX_SEGS], wiov[VBF_MAX_SEGS], io[VBF_MAX_SEGS];
    struct vbf_desc itab[VBF_MAX_INDIRECT];
} vbf_scratch;  /* per queue: kept off the stack */

/* Host pointer of [addr, addr+len) if it lies in one region, else NULL (len 0: any region addr). */
static uint8_t *vbf_ptr(const vbf_region *r, int nr, uint64_t addr, uint64_t len)
{
    for (int i = 0; i < nr; i++) {
        if (addr >= r[i].start && addr - r[i].start <= r[i].size && len <= r[i].size - (addr - r[i].start))
            return (uint8_t *)(uintptr_t)(r[i].host + (addr - r[i].start));
    }
    return NULL;
}

/* Gather up to n bytes at offset off of the iovec list into out; returns bytes copied. */
static size_t vbf_gather(const struct iovec *iov, int cnt, size_t off, uint8_t *out, size_t n)
{
    size_t done = 0;
    for (int i = 0; i < cnt && done < n; i++) {
        size_t l = iov[i].iov_len;
        if (off >= l) { off -= l; continue; }
        size_t take = l - off < n - done ? l - off : n - done;
        memcpy(out + done, (uint8_t *)iov[i].iov_base + off, take);
        done += take;
        off = 0;
    }
    return done;
}

/* Build the iovecs of [off, off+len) of iov into out; returns their count. */
static int vbf_window(const struct iovec *iov, int cnt, size_t off, size_t len, struct iovec *out)
{
    int k = 0;
    for (int i = 0; i < cnt && len; i++) {
        size_t l = iov[i].iov_len;
        if (off >= l) { off -= l; continue; }
        size_t take = l - off < len ? l - off : len;
        out[k].iov_base = (uint8_t *)iov[i].iov_base + off;
        out[k].iov_len = take;
        k++;
        len -= take;
        off = 0;
    }
    return k;
}

/* preadv/pwritev all of iov (as RawFile._pread_all/_pwrite_all): 0 or -errno. */
static int vbf_rw_all(int fd, struct iovec *iov, int cnt, uint64_t offset, int write)
{
    while (cnt > 0) {
        ssize_t n = write ? pwritev(fd, iov, cnt, (off_t)offset) : preadv(fd, iov, cnt, (off_t)offset);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0) {
            if (write)
                return -EIO;
            for (int i = 0; i < cnt; i++)  /* past the end of a file that shrank: zeros */
                memset(iov[i].iov_base, 0, iov[i].iov_len);
            return 0;
        }
        offset += (uint64_t)n;
        while (cnt > 0 && (size_t)n >= iov->iov_len) {
            n -= (ssize_t)iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt > 0 && n) {
            iov->iov_base = (uint8_t *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
    return 0;
}

/* Walk the chain from head into riov/wiov; 0, or -1 for anything the Python path must see. */
static int vbf_walk(const vbf_queue *q, const vbf_region *regs, int nregs, const struct vbf_desc *table,
                    uint16_t head, struct iovec *riov, int *nr, uint64_t *rlen,
                    struct iovec *wiov, int *nw, uint64_t *wlen, struct vbf_desc *itab)
{
    const struct vbf_desc *tab = table;
    uint32_t tlen = q->size, index = head, count = 0;
    int indirect = 0, seen_w = 0;
    *nr = *nw = 0;
    *rlen = *wlen = 0;
    for (;;) {
        if (index >= tlen || ++count > tlen)
            return -1;
        struct vbf_desc d;
        memcpy(&d, &tab[index], sizeof(d));  /* one read of each descriptor */
        if (d.flags & VBF_DESC_F_INDIRECT) {
            /* only a chain that is one indirect descriptor (what drivers make) */
            if (indirect || !q->indirect || (d.flags & VBF_DESC_F_NEXT) || *nr || *nw || seen_w
                || d.len == 0 || d.len % 16 || d.len / 16 > q->size || d.len / 16 > VBF_MAX_INDIRECT)
                return -1;
            const uint8_t *src = vbf_ptr(regs, nregs, d.addr, d.len);
            if (!src)
                return -1;
            memcpy(itab, src, d.len);  /* the driver cannot change it under the walk */
            tab = itab;
            tlen = d.len / 16;
            index = 0;
            count = 0;
            indirect = 1;
            continue;
        }
        int w = (d.flags & VBF_DESC_F_WRITE) != 0;
        if (w)
            seen_w = 1;
        else if (seen_w)
            return -1;
        if (d.len) {
            uint8_t *p = vbf_ptr(regs, nregs, d.addr, d.len);
            if (!p)
                return -1;  /* outside RAM, or across two regions */
            if (w) {
                if (*nw >= VBF_MAX_SEGS)
                    return -1;
                wiov[*nw].iov_base = p;
                wiov[(*nw)++].iov_len = d.len;
                *wlen += d.len;
            } else {
                if (*nr >= VBF_MAX_SEGS)
                    return -1;
                riov[*nr].iov_base = p;
                riov[(*nr)++].iov_len = d.len;
                *rlen += d.len;
            }
        }
        if (!(d.flags & VBF_DESC_F_NEXT))
            return 0;
        index = d.next;
    }
}

int vmsh_blk_fast(vbf_queue *q, const vbf_region *regs, int nregs, const vbf_disk *disk,
                  vbf_counts *c, vbf_scratch *s)
{
    uint32_t n = q->size;
    const struct vbf_desc *table = (const struct vbf_desc *)vbf_ptr(regs, nregs, q->desc_table, 16ull * n);
    volatile uint16_t *avail = (volatile uint16_t *)vbf_ptr(regs, nregs, q->avail_ring, 6ull + 2ull * n);
    uint8_t *used = vbf_ptr(regs, nregs, q->used_ring, 6ull + 8ull * n);
    int done = 0, rearmed = 0;
    c->stop = VBF_STOP_PYTHON;
    c->err = 0;
    if (!table || !avail || !used || n == 0 || (n & (n - 1)))
        return 0;
    for (;;) {
        uint16_t idx = __atomic_load_n(&avail[1], __ATOMIC_ACQUIRE);
        q->shadow_avail = idx;
        uint16_t pend = (uint16_t)(idx - q->next_avail);
        if (pend == 0) {
            /* as VirtQueue.pop: with EVENT_IDX, ask for a kick at the next entry (avail_event,
             * §2.7.10), then look once more so an entry added meanwhile is not missed */
            if (!q->event_idx || rearmed) {
                c->stop = VBF_STOP_EMPTY;
                return done;
            }
            memcpy(used + 4 + 8 * n, &q->next_avail, 2);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            rearmed = 1;
            continue;
        }
        rearmed = 0;
        if (pend > n)
            return done;
        uint16_t head = avail[2 + q->next_avail % n];
        if (head >= n)
            return done;
        int nr, nw;
        uint64_t rlen, wlen;
        if (vbf_walk(q, regs, nregs, table, head, s->riov, &nr, &rlen, s->wiov, &nw, &wlen, s->itab) < 0)
            return done;
        if (wlen < 1 || rlen < 16)
            return done;
        uint8_t hdr[16];
        vbf_gather(s->riov, nr, 0, hdr, 16);
        uint32_t rtype;
        uint64_t sector;
        memcpy(&rtype, hdr, 4);
        memcpy(&sector, hdr + 8, 8);
        uint64_t written = 0;
        int r = 0;
        if (rtype == 0 || rtype == 1) {  /* IN, OUT */
            uint64_t length = rtype == 0 ? wlen - 1 : rlen - 16;
            if (rtype == 1 && disk->readonly)
                return done;
            if (length % 512 || sector > disk->capacity || (length >> 9) > disk->capacity - sector)
                return done;  /* IOERR, answered by the Python path */
            int k = rtype == 0 ? vbf_window(s->wiov, nw, 0, length, s->io)
                               : vbf_window(s->riov, nr, 16, length, s->io);
            r = vbf_rw_all(disk->fd, s->io, k, sector << 9, rtype == 1);
            if (!r) {
                if (rtype == 0) {
                    c->read_ops++;
                    c->read_bytes += length;
                    written = length;
                } else {
                    c->write_ops++;
                    c->write_bytes += length;
                }
            }
        } else if (rtype == 4) {  /* FLUSH */
            if (!disk->readonly) {
                while ((r = fdatasync(disk->fd)) < 0 && errno == EINTR)
                    ;
                if (r < 0)
                    r = -errno;
            }
            if (!r)
                c->flush_ops++;
        } else {
            return done;
        }
        uint8_t status = 0;
        if (r) {
            status = 1;  /* VIRTIO_BLK_S_IOERR */
            written = 0;
            c->errors++;
            c->err = -r;
        }
        /* the status: the last byte of the last non-empty writable buffer (§5.2.6) */
        struct iovec *last = &s->wiov[nw - 1];
        ((uint8_t *)last->iov_base)[last->iov_len - 1] = status;
        q->next_avail = (uint16_t)(q->next_avail + 1);
        uint32_t elem[2] = {head, (uint32_t)(written + 1)};
        memcpy(used + 4 + 8 * (q->next_used % n), elem, 8);
        q->next_used = (uint16_t)(q->next_used + 1);
        /* the element before the idx (§2.7.13.3) */
        __atomic_store_n((uint16_t *)(used + 2), q->next_used, __ATOMIC_RELEASE);
        done++;
        if (r) {
            c->stop = VBF_STOP_ERROR;  /* Python logs the error, then goes on */
            return done;
        }
    }
}


/* ---- The queue server: a thread that serves one queue's kicks without Python ------------------
 *
 * For a real guest the request itself is not what costs (the C call above is a few µs); the
 * wake-up of the Python I/O loop after the guest's milliseconds between requests is (README,
 * Benchmarks). A server thread polls the queue's kick eventfd (KVM's ioeventfd), runs
 * vmsh_blk_fast and writes the queue vector's irqfd itself, so a plain request never reaches
 * Python. Ownership (docs/threading.md): while the thread runs it alone touches the queue's
 * positions (q, signalled_used) and the counts; Python stops it (vmsh_blk_server_stop joins it)
 * before it reads them. Whatever is Python's to do makes the thread hand over:
 * - a chain for the Python path, or a failed request to log: the thread sets VBS_HANDOFF_QUEUE,
 *   writes python_fd and ends; the I/O loop joins it and serves the queue in Python;
 * - an interrupt while the vector cannot be written directly (irq_fd < 0: MSI-X masked or off,
 *   no vector): VBS_HANDOFF_SIGNAL and python_fd; Python raises it through the MSI-X model,
 *   which keeps it pending while masked. The thread goes on serving. */

#define VBS_HANDOFF_QUEUE 1
#define VBS_HANDOFF_SIGNAL 2

typedef struct {
    vbf_queue q;
    vbf_counts c;              /* added to by the thread; Python takes them once it is stopped */
    vbf_scratch *scratch;
    const vbf_region *regs;
    int nregs;
    const vbf_disk *disk;
    int kick_fd;               /* the queue's ioeventfd */
    int wake_fd;               /* Python -> thread: look at `stop` */
    int python_fd;             /* thread -> Python: look at `handoff` */
    int irq_fd;                /* the vector's irqfd while it may be raised directly, else -1 */
    int stop;                  /* Python asks the thread to end */
    int handoff;               /* VBS_HANDOFF_* bits for Python */
    int signalled_valid;       /* signalled_used holds the used index of the last interrupt */
    uint16_t signalled_used;
    char name[16];             /* the thread's name for the kernel */
    pthread_t thread;
} vbs_server;

static void vbs_write_one(int fd)
{
    uint64_t one = 1;
    while (write(fd, &one, sizeof(one)) < 0 && errno == EINTR)
        ;  /* EAGAIN: the counter is saturated, a wake-up is pending anyway */
}

/* Whether the driver wants an interrupt for what was used since the last one (virtio 1.2
 * §2.7.10; as VirtQueue.needs_notification). */
static int vbs_needs_interrupt(vbs_server *s)
{
    uint32_t n = s->q.size;
    volatile uint16_t *avail = (volatile uint16_t *)vbf_ptr(s->regs, s->nregs, s->q.avail_ring, 6ull + 2ull * n);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);  /* the used idx before the driver's flags */
    if (!avail)
        return 1;
    if (s->q.event_idx) {
        uint16_t used_event = avail[2 + n], old = s->signalled_used, new_idx = s->q.next_used;
        int first = !s->signalled_valid;
        s->signalled_used = new_idx;
        s->signalled_valid = 1;
        return first || (uint16_t)(new_idx - used_event - 1) < (uint16_t)(new_idx - old);
    }
    return !(avail[0] & 1);  /* VRING_AVAIL_F_NO_INTERRUPT */
}

static void vbs_hand_over(vbs_server *s, int what)
{
    __atomic_or_fetch(&s->handoff, what, __ATOMIC_SEQ_CST);
    vbs_write_one(s->python_fd);
}

/* Serve the ring until it is empty (0) or something is Python's (1: the thread ends). */
static int vbs_serve(vbs_server *s)
{
    for (;;) {
        int done = vmsh_blk_fast(&s->q, s->regs, s->nregs, s->disk, &s->c, s->scratch);
        if (done && vbs_needs_interrupt(s)) {
            int fd = __atomic_load_n(&s->irq_fd, __ATOMIC_ACQUIRE);
            if (fd >= 0)
                vbs_write_one(fd);
            else
                vbs_hand_over(s, VBS_HANDOFF_SIGNAL);
        }
        if (s->c.stop == VBF_STOP_EMPTY)
            return 0;
        vbs_hand_over(s, VBS_HANDOFF_QUEUE);
        return 1;
    }
}

static void *vbs_main(void *arg)
{
    vbs_server *s = arg;
    struct pollfd fds[2] = {{.fd = s->kick_fd, .events = POLLIN}, {.fd = s->wake_fd, .events = POLLIN}};
    uint64_t count;
    for (;;) {
        if (__atomic_load_n(&s->stop, __ATOMIC_ACQUIRE))
            return NULL;
        /* first round: what the driver queued before the thread started */
        if (vbs_serve(s))
            return NULL;
        while (poll(fds, 2, -1) < 0 && errno == EINTR)
            ;
        if (fds[1].revents)
            (void)!read(s->wake_fd, &count, sizeof(count));
        if (fds[0].revents)
            (void)!read(s->kick_fd, &count, sizeof(count));
    }
}

/* Start the thread: 0, or -errno. */
int vmsh_blk_server_start(vbs_server *s)
{
    __atomic_store_n(&s->stop, 0, __ATOMIC_RELEASE);
    int rc = pthread_create(&s->thread, NULL, vbs_main, s);
    if (!rc)  /* named before this returns, so the thread never shows the creator's name */
        pthread_setname_np(s->thread, s->name);
    return -rc;
}

/* Ask the thread to end and wait until it has (it may have ended on its own already). */
void vmsh_blk_server_stop(vbs_server *s)
{
    __atomic_store_n(&s->stop, 1, __ATOMIC_RELEASE);
    vbs_write_one(s->wake_fd);
    pthread_join(s->thread, NULL);
}

/* The VBS_HANDOFF_* bits set since the last call (the thread may set more meanwhile). */
int vmsh_blk_server_take(vbs_server *s)
{
    return __atomic_exchange_n(&s->handoff, 0, __ATOMIC_SEQ_CST);
}

/* Let the thread raise the vector through fd from now on (-1: hand interrupts to Python). */
void vmsh_blk_server_set_irq_fd(vbs_server *s, int fd)
{
    __atomic_store_n(&s->irq_fd, fd, __ATOMIC_RELEASE);
}
