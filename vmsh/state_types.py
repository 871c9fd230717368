"""Width-annotated integer types for plain-data state: ``U8``, ``U16``, ``U32``, ``U64``, ``S64``.

A state field that holds a register or a C struct member says its width with one of these
(``typing.Annotated`` over ``int`` with an :class:`IntRange`). The snapshot decoder
(``vmsh.engine.persist.from_plain``) and the devices' restore checks
(``vmsh.devices.state.expect_state``) read the :class:`IntRange` and refuse a value outside it,
naming the field, before the value reaches a device model or a cffi struct.

This module is in the bottom layer: the device states and the KVM register mirrors
(``vmsh.engine.kvm_types``) both use it, so it imports nothing else of vmsh.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated


@dataclasses.dataclass(frozen=True, slots=True)
class IntRange:
    """``typing.Annotated`` metadata: an integer field holds ``lo..hi`` (inclusive)."""

    lo: int
    hi: int


U8 = Annotated[int, IntRange(0, 0xFF)]
U16 = Annotated[int, IntRange(0, 0xFFFF)]
U32 = Annotated[int, IntRange(0, 0xFFFF_FFFF)]
U64 = Annotated[int, IntRange(0, (1 << 64) - 1)]
#: a signed 64-bit value (a clock offset)
S64 = Annotated[int, IntRange(-(1 << 63), (1 << 63) - 1)]
