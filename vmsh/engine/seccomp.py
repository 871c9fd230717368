"""Per-thread seccomp filters (``--seccomp true|log|false``), as cloud-hypervisor installs them.

Each kind of thread gets an allowlist of system calls, installed by the thread itself once its
setup is done (:func:`apply`): the vCPU threads, the device I/O loop, the API server and its
connections, the console input threads and the rest of the VMM (the launcher's main thread, which
runs the control loop). A call outside the list:

- ``true`` (the default): traps (``SECCOMP_RET_TRAP``); a C ``SIGSYS`` handler in
  ``vmsh._seccomp`` writes ``vmsh: seccomp: thread 'vcpu0' made the forbidden system call
  ptrace (101); stopping the VMM`` to stderr and the process dies of ``SIGSYS``;
- ``log``: the kernel logs it (``SECCOMP_RET_LOG``, an ``audit: type=1326`` line in the kernel
  log naming the thread and the call's number) and the call goes ahead;
- ``false``: no filter is installed.

Why the lists are as wide as they are: the threads run CPython, which allocates (``mmap``,
``munmap``, ``brk``, ``madvise``), waits on its locks (``futex``), reads the clock, takes signals
and, on the first use of a module, imports it (``openat``, ``newfstatat``, ``getdents64``,
``read``) on whichever thread got there first. Those calls are in every list (:data:`BASE`).
A thread's filter is inherited by the threads it starts, and filters stack (the strictest
verdict wins), so a thread that starts VMs must allow what a VM's creation does: the API
threads run actions such as ``vm.boot`` and ``vm.add-net`` themselves (cloud-hypervisor's API
thread hands them to its VMM thread instead), so their list is the VMM's. The lists were taken
from the launcher's workloads (the guest test suite) run under ``--seccomp log``.

What no thread may do, whatever the mode ``true`` forbids: ``execve`` (the VMM never starts a
program), ``ptrace``, ``mount``, ``bpf``, module loading, ``kexec``, ``reboot``, keyrings,
namespaces (``unshare``, ``setns``), ``chroot``, ``perf_event_open``, ``process_vm_writev``, ... :
everything not listed below.

:func:`configure` is called by the launcher with the mode; until then :func:`apply` does nothing
(the shell, ``vmsh run`` and the engine tests run without filters).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from enum import Enum
from typing import Any

from vmsh.errors import VmshError
from vmsh.thread_names import kernel_name, name_current_thread

LOG = logging.getLogger(__name__)

#: Test hook: a vCPU thread whose name equals this variable's value makes one forbidden system
#: call just after its filter is installed. It is read from the VMM's own environment when the
#: thread starts; a guest has no way to set it.
FORBIDDEN_CALL_ENV = "VMSH_TEST_SECCOMP_FORBIDDEN_CALL"


class ThreadKind(Enum):
    """The kinds of thread that have their own list."""

    VMM = "vmm"
    VCPU = "vcpu"
    IO = "io"
    API_SERVER = "api-server"
    API_CONNECTION = "api-connection"
    CONSOLE = "console"
    GDB = "gdb"


def _names(text: str) -> frozenset[str]:
    """The system call names in ``text`` (separated by white space)."""
    return frozenset(text.split())


#: Every CPython thread: memory, locks, time, signals, thread start and end, lazy imports,
#: logging, and the file descriptors the thread already holds.
BASE: frozenset[str] = _names("""
    read write readv writev pread64 pwrite64 preadv pwritev preadv2 pwritev2 lseek close
    fstat newfstatat stat lstat statx openat open getdents64 readlink readlinkat access
    faccessat faccessat2 getcwd fcntl dup dup2 dup3 ioctl
    mmap munmap mprotect mremap madvise brk mincore membarrier
    futex get_robust_list set_robust_list rseq clone clone3 exit exit_group
    gettid getpid getppid getuid geteuid getgid getegid getresuid getresgid
    tgkill tkill rt_sigaction rt_sigprocmask rt_sigreturn rt_sigtimedwait rt_sigsuspend
    sigaltstack restart_syscall
    clock_gettime clock_getres clock_nanosleep nanosleep gettimeofday time getrandom
    sched_yield sched_getaffinity sched_setaffinity sched_getparam sched_getscheduler
    select pselect6 poll ppoll epoll_wait epoll_pwait epoll_pwait2 epoll_ctl
    eventfd2 prctl seccomp uname sysinfo getrlimit prlimit64 getrusage
    fsync fdatasync msync fallocate ftruncate fadvise64 readahead getcpu
    sendmsg recvmsg sendto recvfrom shutdown getsockopt getsockname getpeername
    timerfd_settime timerfd_gettime
""")

#: The device I/O loop: virtqueue kicks, tap and socket input, block I/O, rate-limit timers.
IO: frozenset[str] = BASE | _names("""
    accept accept4 setsockopt connect socket sendmmsg recvmmsg splice copy_file_range
    sync_file_range timerfd_create
    io_uring_enter io_submit io_getevents
""")

#: vCPU threads: KVM_RUN and the exits' device accesses. A register write may do what the I/O
#: loop does (a queue notification that has no ioeventfd is handled on the vCPU thread: block
#: I/O, a vsock connection, a tap write), start the watchdog's thread or arm a rate limiter.
VCPU: frozenset[str] = IO

#: Console input (a tty, a file, a pty, a listening unix socket).
CONSOLE: frozenset[str] = BASE | _names("""
    accept accept4 setsockopt
""")

#: The rest of the VMM: creating, booting, changing, snapshotting and restoring VMs (memory
#: files, taps, sockets, KVM, hugepages, NUMA binding, migration), and the control loop.
VMM: frozenset[str] = BASE | IO | _names("""
    socket socketpair bind listen accept accept4 connect setsockopt
    epoll_create epoll_create1 memfd_create timerfd_create signalfd4 pipe pipe2
    unlink unlinkat rename renameat renameat2 mkdir mkdirat rmdir symlink symlinkat link linkat
    chmod fchmod fchmodat fchown fchownat chown lchown utimensat utime utimes futimesat
    truncate flock umask statfs fstatfs sendfile sync syncfs
    mbind set_mempolicy get_mempolicy mlock mlock2 munlock mlockall munlockall
    getpriority setpriority sched_setscheduler sched_setparam
    wait4 waitid kill getpgid getsid setsid getgroups inotify_init1 inotify_add_watch
    inotify_rm_watch io_setup io_destroy io_submit io_getevents io_uring_setup io_uring_register
    getxattr lgetxattr fgetxattr setxattr lsetxattr fsetxattr listxattr llistxattr flistxattr
""")

LISTS: dict[ThreadKind, frozenset[str]] = {
    ThreadKind.VMM: VMM,
    ThreadKind.VCPU: VCPU,
    ThreadKind.IO: IO,
    # The API threads start VMs (and so their vCPU and I/O threads, which inherit the filter).
    ThreadKind.API_SERVER: VMM,
    ThreadKind.API_CONNECTION: VMM,
    ThreadKind.CONSOLE: CONSOLE,
    # The gdb stub pauses and resumes the VM (vm.pause / vm.resume, which start vCPU threads).
    ThreadKind.GDB: VMM,
}


class SeccompMode(Enum):
    """``--seccomp``'s values."""

    TRUE = "true"
    LOG = "log"
    FALSE = "false"


class SeccompError(VmshError):
    """A filter could not be built or installed."""


_mode = SeccompMode.FALSE
_prepared = False
_prepare_lock = threading.Lock()


def configure(mode: str) -> None:
    """Set the mode for the threads that call :func:`apply` from now on (the launcher).

    :raises SeccompError: for ``true``, when the ``SIGSYS`` reporter cannot be installed.
    """
    global _mode, _prepared
    chosen = SeccompMode(mode)
    if chosen is SeccompMode.TRUE:
        lib = _lib()
        with _prepare_lock:
            if not _prepared:
                err = lib.vmsh_seccomp_prepare()
                if err < 0:
                    raise SeccompError(f"Cannot install the seccomp SIGSYS handler: {os.strerror(-err)}")
                _prepared = True
    elif chosen is SeccompMode.LOG:
        _lib()
    _mode = chosen


def mode() -> SeccompMode:
    """The configured mode (``false`` until :func:`configure`)."""
    return _mode


def apply(kind: ThreadKind, name: str | None = None) -> bool:
    """Install ``kind``'s filter on the calling thread (nothing under ``--seccomp false``).

    :param name: the thread's name for the violation message (defaults to the Python thread's
        name).
    :returns: True if a filter was installed.
    :raises SeccompError: when libseccomp refuses the filter.
    """
    if _mode is SeccompMode.FALSE:
        return False
    from vmsh._seccomp import ffi, lib

    thread_name = name or threading.current_thread().name
    default = lib.SCMP_ACT_TRAP if _mode is SeccompMode.TRUE else lib.SCMP_ACT_LOG
    ctx = lib.seccomp_init(default)
    if ctx == ffi.NULL:
        raise SeccompError("Cannot create a seccomp filter")
    try:
        for call in sorted(LISTS[kind]):
            nr = lib.seccomp_syscall_resolve_name(call.encode())
            if nr == lib.__NR_SCMP_ERROR:
                continue  # not a system call on this architecture (e.g. an old alias)
            rc = lib.seccomp_rule_add(ctx, lib.SCMP_ACT_ALLOW, nr, 0)
            if rc < 0:
                raise SeccompError(f"Cannot allow {call} in the {kind.value} seccomp filter: "
                                   f"{os.strerror(-rc)}")
        rc = lib.seccomp_load(ctx)
        if rc < 0:
            raise SeccompError(f"Cannot install the {kind.value} seccomp filter: {os.strerror(-rc)}")
    finally:
        lib.seccomp_release(ctx)
    # The name the SIGSYS report gives; the kernel's name (audit lines, /proc) the thread gave
    # itself when it started (vmsh.thread_names), whatever the mode.
    lib.vmsh_seccomp_set_thread_name(kernel_name(thread_name), 0)
    LOG.debug("seccomp: %s filter (%s) installed on %s", kind.value, _mode.value, thread_name)
    if kind is ThreadKind.VCPU and os.environ.get(FORBIDDEN_CALL_ENV) == thread_name:
        LOG.warning("seccomp: %s makes a forbidden system call (%s)", thread_name, FORBIDDEN_CALL_ENV)
        lib.vmsh_seccomp_forbidden_call()
    return True


def _lib() -> Any:
    try:
        from vmsh._seccomp import lib
    except ImportError as err:
        raise SeccompError("Seccomp needs the vmsh._seccomp module (libseccomp); "
                           "build it, or run with --seccomp false") from err
    return lib


def confined(kind: ThreadKind, body: Callable[..., None]) -> Callable[..., None]:
    """``body`` as a thread target that first names its thread for the kernel (its Python name)
    and installs ``kind``'s filter on it.

    A thread whose filter cannot be installed does not run ``body`` (an unfiltered thread would
    silently weaken ``--seccomp``): the error is logged.
    """
    def run(*args: Any) -> None:
        name_current_thread()
        try:
            apply(kind)
        except SeccompError as err:
            LOG.error("%s: %s", threading.current_thread().name, err)
            return
        body(*args)

    return run
