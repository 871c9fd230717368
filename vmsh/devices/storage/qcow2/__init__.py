"""qcow2 images (QEMU's docs/interop/qcow2.txt): :class:`Qcow2File` serves versions 2 and 3."""

from vmsh.devices.storage.qcow2.image import Qcow2File

__all__ = ["Qcow2File"]
