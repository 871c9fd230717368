"""cffi (API mode) builder for ``vmsh._seccomp``: libseccomp's C API plus a SIGSYS reporter.

vmsh's per-thread syscall filters (``vmsh/engine/seccomp.py``) are built with libseccomp
(``<seccomp.h>``, Debian's ``libseccomp-dev``) rather than hand-assembled BPF. This module binds
the few calls that needs (``seccomp_init``, ``seccomp_rule_add``, ``seccomp_load``, name/number
resolution) and adds what Python cannot do itself:

- ``vmsh_seccomp_prepare``: installs a C ``SIGSYS`` handler for filters whose default action is
  ``SECCOMP_RET_TRAP`` (``--seccomp true``). A Python signal handler would run only on the main
  thread, between two bytecodes, long after a vCPU thread hit the forbidden call (if ever: the
  trapping thread would go on). The C handler runs on the thread that made the call, at once: it
  writes one line naming the system call and the thread with ``write(2)`` (async-signal-safe), then
  re-raises ``SIGSYS`` with its default action, so the VMM dies of ``SIGSYS`` as cloud-hypervisor's
  does. The syscall names are resolved here, before any filter exists, into a static table,
  because libseccomp's resolver allocates and so cannot be called in a signal handler.
- ``vmsh_seccomp_set_thread_name``: records the thread's name for the handler (thread-local) and,
  when asked, sets it as the kernel's thread name (``PR_SET_NAME``). vmsh's threads name
  themselves when they start (``vmsh/thread_names.py``), so ``/proc/PID/task/*/comm`` and the
  kernel's audit lines (``--seccomp log``) name the thread with or without a filter.
- ``vmsh_seccomp_forbidden_call``: a test hook that makes one system call no filter allows
  (``ptrace(PTRACE_CONT, 0, ...)``, which fails with ``ESRCH`` when it is let through).

Built by ``setup.py`` (``cffi_modules``), or directly: ``python native/build_seccomp.py``.
"""

from __future__ import annotations

from cffi import FFI

ffibuilder = FFI()

ffibuilder.cdef("""
typedef void *scmp_filter_ctx;
scmp_filter_ctx seccomp_init(uint32_t def_action);
void seccomp_release(scmp_filter_ctx ctx);
int seccomp_rule_add(scmp_filter_ctx ctx, uint32_t action, int syscall, unsigned int arg_cnt);
int seccomp_load(const scmp_filter_ctx ctx);
int seccomp_syscall_resolve_name(const char *name);

#define SCMP_ACT_ALLOW ...
#define SCMP_ACT_TRAP ...
#define SCMP_ACT_LOG ...
#define SCMP_ACT_KILL_PROCESS ...
#define __NR_SCMP_ERROR ...

int vmsh_seccomp_prepare(void);
void vmsh_seccomp_set_thread_name(const char *name, int set_comm);
long vmsh_seccomp_forbidden_call(void);
""")

C_SOURCE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <seccomp.h>

#define VMSH_MAX_SYSCALL 512
#define VMSH_NAME_LEN 32

static char vmsh_syscall_names[VMSH_MAX_SYSCALL][VMSH_NAME_LEN];
static __thread char vmsh_thread_name[VMSH_NAME_LEN];

static size_t vmsh_put(char *buf, size_t pos, size_t cap, const char *s)
{
    while (*s && pos + 1 < cap)
        buf[pos++] = *s++;
    return pos;
}

static size_t vmsh_put_num(char *buf, size_t pos, size_t cap, long v)
{
    char digits[24];
    size_t n = 0;
    if (v < 0) {
        pos = vmsh_put(buf, pos, cap, "-");
        v = -v;
    }
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v && n < sizeof(digits));
    while (n && pos + 1 < cap)
        buf[pos++] = digits[--n];
    return pos;
}

/* Runs on the thread that made the forbidden call; only async-signal-safe calls. */
static void vmsh_sigsys(int sig, siginfo_t *info, void *ctx)
{
    (void)ctx;
    char msg[256];
    size_t n = 0;
    int nr = info->si_syscall;
    n = vmsh_put(msg, n, sizeof(msg), "vmsh: seccomp: thread '");
    n = vmsh_put(msg, n, sizeof(msg), vmsh_thread_name[0] ? vmsh_thread_name : "?");
    n = vmsh_put(msg, n, sizeof(msg), "' made the forbidden system call ");
    if (nr >= 0 && nr < VMSH_MAX_SYSCALL && vmsh_syscall_names[nr][0])
        n = vmsh_put(msg, n, sizeof(msg), vmsh_syscall_names[nr]);
    else
        n = vmsh_put(msg, n, sizeof(msg), "?");
    n = vmsh_put(msg, n, sizeof(msg), " (");
    n = vmsh_put_num(msg, n, sizeof(msg), nr);
    n = vmsh_put(msg, n, sizeof(msg), "); stopping the VMM\n");
    ssize_t w = write(2, msg, n);
    (void)w;
    /* Die of SIGSYS (cloud-hypervisor's end too): default action, then raise it; it is blocked
     * while this handler runs and is delivered as soon as the handler returns. */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof(dfl));
    dfl.sa_handler = SIG_DFL;
    sigaction(sig, &dfl, NULL);
    syscall(SYS_tgkill, (long)getpid(), (long)syscall(SYS_gettid), (long)sig);
}

int vmsh_seccomp_prepare(void)
{
    for (int nr = 0; nr < VMSH_MAX_SYSCALL; nr++) {
        char *name = seccomp_syscall_resolve_num_arch(SCMP_ARCH_NATIVE, nr);
        if (name != NULL) {
            strncpy(vmsh_syscall_names[nr], name, VMSH_NAME_LEN - 1);
            free(name);
        }
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = vmsh_sigsys;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    return sigaction(SIGSYS, &sa, NULL) < 0 ? -errno : 0;
}

void vmsh_seccomp_set_thread_name(const char *name, int set_comm)
{
    strncpy(vmsh_thread_name, name, VMSH_NAME_LEN - 1);
    if (set_comm)
        prctl(PR_SET_NAME, (unsigned long)name, 0, 0, 0);
}

long vmsh_seccomp_forbidden_call(void)
{
    long r = syscall(SYS_ptrace, (long)PTRACE_CONT, 0L, 0L, 0L);
    return r < 0 ? -errno : r;
}
"""

ffibuilder.set_source("vmsh._seccomp", C_SOURCE, libraries=["seccomp"], extra_compile_args=["-O2"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=False)
