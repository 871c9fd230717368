"""The VM lifecycle state machine: the states and the one transition table.

A new VM starts ``Created`` (``Paused`` when rebuilt from a snapshot). Every lifecycle
request checks its transition here; an illegal one is a :class:`StateError` naming both
states, as cloud-hypervisor's ``InvalidStateTransition`` does.
"""

from __future__ import annotations

import enum

from vmsh.errors import StateError


class VmState(enum.Enum):
    """A VM's lifecycle state, spelled as ``vm.info`` reports it."""

    CREATED = "Created"
    RUNNING = "Running"
    SHUTDOWN = "Shutdown"
    PAUSED = "Paused"
    BREAKPOINT = "BreakPoint"


_C, _R, _S, _P, _B = VmState.CREATED, VmState.RUNNING, VmState.SHUTDOWN, VmState.PAUSED, VmState.BREAKPOINT

#: from-state -> the states it may move to
TRANSITIONS: dict[VmState, frozenset[VmState]] = {
    _C: frozenset({_R, _P, _S, _B}),
    _R: frozenset({_P, _S, _B}),
    _P: frozenset({_R, _S}),
    _S: frozenset({_R}),
    _B: frozenset({_C, _R}),
}


def check_transition(current: VmState, target: VmState) -> None:
    """Raise unless ``current`` may move to ``target``.

    :raises StateError: ``Invalid transition from <current> to <target>``.
    """
    if target not in TRANSITIONS[current]:
        raise StateError(f"Invalid transition from {current.value} to {target.value}")
