"""Disk images behind virtio-blk: one :class:`~vmsh.devices.storage.disk_file.DiskFile`
interface, whatever the format of the image (``open_disk`` detects it as cloud-hypervisor does)."""

from vmsh.devices.storage.detect import ImageFormat, detect_image_format, open_disk
from vmsh.devices.storage.disk_file import DiskFile

__all__ = ["DiskFile", "ImageFormat", "detect_image_format", "open_disk"]
