"""Type stub for the cffi extension built from native/build_blk_fast.py (virtio-blk's native request path)."""

from typing import Any

ffi: Any
lib: Any
