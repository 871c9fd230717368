/*
 * QEMU TCG plugin (QEMU 7.2 plugin API, version 1): count the guest instructions
 * executed at kernel addresses (>= 0xffff800000000000), by translation block.
 * Used by ci/bench/kernel_insns.py; built with `gcc -O2 -shared -fPIC`.
 *
 * Arguments: out=<file> (required), bucket=<n> (flush counts every n kernel
 * instructions, default 250000), watch=<file> (hex addresses, one a line: an
 * "E" line is written, after a flush, whenever a block starting at one of them
 * runs, so the counts between two entries are exact).
 *
 * Output lines: "B <kernel insns so far> <other insns so far>" followed by
 * "<block address hex> <kernel insns in the block since the last flush>"
 * lines; "E <address hex> <kernel insns so far>".
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
typedef struct qemu_info_t qemu_info_t;
typedef void (*tb_trans_cb_t)(qemu_plugin_id_t, struct qemu_plugin_tb *);
typedef void (*udata_cb_t)(unsigned int, void *);
extern void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t, tb_trans_cb_t);
extern size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *);
extern uint64_t qemu_plugin_tb_vaddr(const struct qemu_plugin_tb *);
extern void qemu_plugin_register_vcpu_tb_exec_cb(struct qemu_plugin_tb *, udata_cb_t, int, void *);
extern void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *, int, void *, uint64_t);
extern void qemu_plugin_register_atexit_cb(qemu_plugin_id_t, void (*)(qemu_plugin_id_t, void *), void *);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

#define QEMU_PLUGIN_CB_NO_REGS 0
#define QEMU_PLUGIN_INLINE_ADD_U64 0
#define KERNEL_START 0xffff800000000000ULL

struct block { uint64_t vaddr, n, count; int touched, watched; };

static struct block **touched;
static size_t ntouched, cap;
static uint64_t *watch;
static size_t nwatch;
static uint64_t kernel_insns, other_insns, bucket = 250000, next_flush;
static FILE *out;

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void flush(void)
{
    fprintf(out, "B %llu %llu\n", (unsigned long long)kernel_insns, (unsigned long long)other_insns);
    for (size_t i = 0; i < ntouched; i++) {
        struct block *b = touched[i];
        fprintf(out, "%llx %llu\n", (unsigned long long)b->vaddr, (unsigned long long)(b->count * b->n));
        b->count = 0;
        b->touched = 0;
    }
    ntouched = 0;
    next_flush = kernel_insns + bucket;
}

static void on_exec(unsigned int vcpu, void *udata)
{
    struct block *b = udata;
    (void)vcpu;
    if (b->watched) {
        flush();
        fprintf(out, "E %llx %llu\n", (unsigned long long)b->vaddr, (unsigned long long)kernel_insns);
    }
    if (!b->touched) {
        if (ntouched == cap) {
            cap = cap ? 2 * cap : 4096;
            touched = realloc(touched, cap * sizeof *touched);
        }
        touched[ntouched++] = b;
        b->touched = 1;
    }
    b->count++;
    kernel_insns += b->n;
    if (kernel_insns >= next_flush)
        flush();
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    uint64_t vaddr = qemu_plugin_tb_vaddr(tb);
    size_t n = qemu_plugin_tb_n_insns(tb);
    (void)id;
    if (vaddr < KERNEL_START) {
        qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &other_insns, n);
        return;
    }
    struct block *b = calloc(1, sizeof *b);
    b->vaddr = vaddr;
    b->n = n;
    b->watched = nwatch && bsearch(&vaddr, watch, nwatch, sizeof *watch, cmp_u64);
    qemu_plugin_register_vcpu_tb_exec_cb(tb, on_exec, QEMU_PLUGIN_CB_NO_REGS, b);
}

static void on_atexit(qemu_plugin_id_t id, void *p)
{
    (void)id; (void)p;
    flush();
    fclose(out);
}

static void read_watch(const char *path)
{
    FILE *f = fopen(path, "r");
    unsigned long long a;
    size_t room = 0;
    while (f && fscanf(f, "%llx", &a) == 1) {
        if (nwatch == room) {
            room = room ? 2 * room : 1024;
            watch = realloc(watch, room * sizeof *watch);
        }
        watch[nwatch++] = a;
    }
    if (f)
        fclose(f);
    qsort(watch, nwatch, sizeof *watch, cmp_u64);
}

__attribute__((visibility("default")))
int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv)
{
    const char *path = NULL;
    (void)info;
    for (int i = 0; i < argc; i++) {
        if (!strncmp(argv[i], "out=", 4))
            path = argv[i] + 4;
        else if (!strncmp(argv[i], "bucket=", 7))
            bucket = strtoull(argv[i] + 7, NULL, 10);
        else if (!strncmp(argv[i], "watch=", 6))
            read_watch(argv[i] + 6);
    }
    if (!path || !(out = fopen(path, "w")))
        return -1;
    next_flush = bucket;
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_atexit_cb(id, on_atexit, NULL);
    return 0;
}
