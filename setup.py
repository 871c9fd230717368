"""Build hook: compiles the cffi modules (``vmsh._native``: KVM; ``vmsh._seccomp``: libseccomp;
``vmsh._blkfast``: virtio-blk's native request path); metadata lives in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["native/build_kvm.py:ffibuilder", "native/build_seccomp.py:ffibuilder",
                      "native/build_blk_fast.py:ffibuilder"])
