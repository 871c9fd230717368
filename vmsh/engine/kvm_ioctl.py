"""The cffi binding every KVM wrapper calls through, and how an ioctl's result is checked.

``vmsh._native`` (built from ``native/build_kvm.py``) declares the ioctl numbers and structs of
``<linux/kvm.h>`` and wraps ``ioctl(2)`` so that it returns ``-errno`` instead of setting
``errno``. :func:`checked` turns a negative result into a :class:`KvmIoctlError`;
:func:`fill_struct` loads raw bytes saved from a struct back into one of the same size. The
wrappers themselves are ``vmsh.engine.kvm`` (system and VM fds) and ``vmsh.engine.kvm_vcpu``.
"""

from __future__ import annotations

import os
from typing import Any

from vmsh.errors import KvmError

try:
    from vmsh._native import ffi, lib
except ImportError as err:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "vmsh._native is missing: reinstall with `pip install -e .` (needs gcc and the kernel headers)"
    ) from err

__all__ = ["KvmIoctlError", "checked", "ffi", "fill_struct", "lib"]


class KvmIoctlError(KvmError):
    """An ioctl failed; ``errno`` holds the error number."""

    def __init__(self, what: str, err: int) -> None:
        super().__init__(f"{what}: {os.strerror(err)} (errno {err})")
        #: the positive errno of the failed call
        self.errno = err


def checked(ret: int, what: str) -> int:
    """``ret`` of the ioctl ``what`` when it is not negative.

    :raises KvmIoctlError: with the errno ``-ret`` otherwise.
    """
    if ret < 0:
        raise KvmIoctlError(what, -ret)
    return ret


def fill_struct(cobj: Any, raw: bytes, what: str) -> None:
    """Copy ``raw`` into the cffi struct ``cobj``.

    :raises KvmError: when ``raw`` is not exactly the struct's size.
    """
    buf = ffi.buffer(cobj)
    if len(raw) != len(buf):
        raise KvmError(f"{what}: {len(raw)} bytes given, the struct has {len(buf)}")
    buf[:] = raw
