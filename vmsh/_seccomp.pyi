"""Type stub for the cffi extension built from native/build_seccomp.py (libseccomp, SIGSYS reporter)."""

from typing import Any

ffi: Any
lib: Any
