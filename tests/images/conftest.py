"""Fixtures for the guest-image tests: locate built images, or say loudly how to build them.

Outside CI a missing image skips the test with a reason naming ``vmsh images build``;
in CI it fails, because CI builds the images first (:mod:`vmsh.harness.requirements`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vmsh.errors import ImageError
from vmsh.harness.requirements import unavailable


def require_image(name: str) -> Path:
    """Path of the built artifact ``name``, or skip/fail naming the build command."""
    from vmsh.images import image_path

    try:
        return image_path(name)
    except ImageError as err:
        unavailable(f"guest image {name!r} not built ({err}); run: vmsh images build")


@pytest.fixture
def image():
    """``image("vmlinux")`` -> path of a built artifact."""
    return require_image
