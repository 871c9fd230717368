"""Type stub for the cffi extension built from native/build_kvm.py (constants, structs, calls)."""

from typing import Any

ffi: Any
lib: Any
