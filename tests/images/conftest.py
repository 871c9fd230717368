"""Fixtures for the guest-image tests: locate built images, or say loudly how to build them.

Outside CI a missing image skips the test with a reason naming ``vmsh images build``;
with ``CI=true`` it fails, because CI builds the images first.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmsh.errors import ImageError


def require_image(name: str) -> Path:
    """Path of the built artifact ``name``, or skip/fail naming the build command."""
    from vmsh.images import image_path

    try:
        return image_path(name)
    except ImageError as err:
        msg = f"guest image {name!r} not built ({err}); run: vmsh images build"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture
def image():
    """``image("vmlinux")`` -> path of a built artifact."""
    return require_image
