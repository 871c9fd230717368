"""The interface a block device sees of its image, whatever the image's format.

Offsets and lengths are in bytes of the *virtual* disk (what the guest sees), whole 512-byte
sectors (virtio-blk's unit), checked by the caller against :attr:`DiskFile.size`. Data moves
between the image and ``memoryview`` s of guest RAM; a format translates virtual offsets to
places in its file (or in a backing file).

A format whose data the kernel can move asynchronously also has ``open_async`` (the
:class:`~vmsh.devices.storage.async_io.AsyncCapable` extension: raw images); the others are
served synchronously, as cloud-hypervisor v40 serves qcow2 and VHDX.
"""

from __future__ import annotations

from typing import Protocol


class DiskFile(Protocol):
    """An open disk image.

    Every method may raise ``OSError``: the device turns it into an I/O error for that request
    (VIRTIO_BLK_S_IOERR), never into a VMM failure. A format that finds its metadata corrupt
    raises ``OSError(EIO, ...)`` naming what is wrong, and never writes through a corrupt table.
    """

    #: the image's path, for messages
    path: str
    #: virtual size in bytes
    size: int
    #: opened read-only: ``write``, ``discard`` and ``write_zeroes`` are never called
    readonly: bool
    #: (st_dev, st_rdev, st_ino) of the image file: cloud-hypervisor's default disk serial
    identity: tuple[int, int, int]
    #: the host's preferred I/O size for the file (st_blksize): the advertised physical block
    block_size: int

    def read(self, views: list[memoryview], offset: int) -> None:
        """Fill ``views`` with the bytes at ``offset``; bytes past the end of the data read as zeros."""

    def write(self, views: list[memoryview], offset: int) -> None:
        """Write ``views`` at ``offset`` (all of them, or raise)."""

    def flush(self) -> None:
        """Make every completed write durable (the data and the metadata that finds it)."""

    def discard(self, offset: int, length: int) -> None:
        """The guest no longer needs the range: free it where the format can (a hint)."""

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Make the range read as zeros; ``unmap`` lets the image free it."""

    def close(self) -> None:
        """Release the file(s); a second call does nothing."""
