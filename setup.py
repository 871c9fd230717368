"""Build hook: compiles the cffi KVM module (``vmsh._native``); metadata lives in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["native/build_kvm.py:ffibuilder"])
