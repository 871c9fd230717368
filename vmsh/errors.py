"""The one error tree of vmsh.

::

    VmshError
    ├── ConfigError          a configuration that cannot be parsed or is invalid
    │   ├── UsageError           a launcher command line that is not well formed (exit status 2)
    │   ├── OptionParseError     ``Error parsing --<option>``: the option grammar or a value
    │   └── ValidationError      a rule across fields (``Queue count ... must not exceed ...``)
    │       └── DuplicateError       a second device with the same id or path
    ├── ImageError           guest images: a missing tool, package or build failure
    ├── KvmError             an ioctl on /dev/kvm failed
    ├── GuestMemoryError     a guest physical address or length outside guest RAM
    ├── StateError           a lifecycle request illegal in the current state
    ├── SnapshotError        a snapshot that cannot be written or read back
    ├── MigrationError       a live migration refused, broken or abandoned
    ├── DeviceStateError     a device's saved state that does not fit it (names the field)
    ├── NotFoundError        no VM, no VM config, or no device with that id
    ├── BusyError            a request that must wait for an earlier one to finish
    └── DeviceError          a host-side device failure (never a guest's misbehaviour)
        ├── VirtQueueError       a guest's virtqueue breaks the spec; the device stops until reset
        └── VhostUserError       a vhost-user backend that cannot be reached or misbehaves

Messages are short, one line, and do not repeat their cause; the cause is chained
with ``raise ... from err`` and shown by the front-ends as a numbered chain.
"""

from __future__ import annotations


class VmshError(Exception):
    """Base of every error vmsh raises on purpose."""


class ConfigError(VmshError):
    """A configuration that cannot be parsed or is not valid."""


class UsageError(ConfigError):
    """A command line that is not well formed: an unknown flag, a missing value."""


class OptionParseError(ConfigError):
    """An option string or JSON value that does not follow the grammar or type."""


class ValidationError(ConfigError):
    """A configuration that parses but breaks a rule across fields."""


class DuplicateError(ValidationError):
    """A second device with an id or a path that is already used."""


class ImageError(VmshError):
    """A guest image cannot be built or found."""


class KvmError(VmshError):
    """An operation on /dev/kvm failed."""


class GuestMemoryError(VmshError):
    """An access outside guest RAM."""


class StateError(VmshError):
    """A lifecycle request that the VM's current state does not allow."""


class SnapshotError(VmshError):
    """A snapshot that cannot be written, or read back."""


class MigrationError(VmshError):
    """A live migration that was refused, broke off or was abandoned (the source VM runs on)."""


class DeviceStateError(VmshError):
    """A saved device state that the device refuses: a wrong state class or a field out of range.

    ``field`` is the dotted path of the offending value inside the state (``ier``,
    ``queues[1].size``, ``device.cols``); ``str()`` reads ``"<field>: <message>"``. The engine
    wraps it in a :class:`SnapshotError` that adds the device id.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message

    def within(self, prefix: str) -> DeviceStateError:
        """The same error with ``prefix`` put in front of its field (``queues[1]`` + ``size``)."""
        if not self.field:
            field = prefix
        elif self.field.startswith("["):
            field = prefix + self.field
        else:
            field = f"{prefix}.{self.field}"
        return DeviceStateError(field, self.message)


class NotFoundError(VmshError):
    """The VM, its config, or the named device does not exist."""


class BusyError(VmshError):
    """The request conflicts with one still in progress (for example a pending vCPU removal)."""


class DeviceError(VmshError):
    """A host-side device failure."""


class VirtQueueError(DeviceError):
    """A malformed virtqueue (bad index, address, loop); caught by the device, which then needs a reset."""


def error_chain(err: BaseException) -> list[str]:
    """Return the messages of ``err`` and of its chained causes, outermost first."""
    chain: list[str] = []
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        text = str(cur)
        if text:
            chain.append(text)
        cur = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)
    return chain


class VhostUserError(DeviceError):
    """A vhost-user backend that cannot be reached, went away, or broke the protocol."""
