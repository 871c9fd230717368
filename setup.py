"""Build hook: compiles the cffi modules (``vmsh._native``: KVM; ``vmsh._seccomp``: libseccomp);
metadata lives in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["native/build_kvm.py:ffibuilder", "native/build_seccomp.py:ffibuilder"])
