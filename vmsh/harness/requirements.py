"""What a test does when the host lacks something it needs (``/dev/kvm``, a built guest image):
it fails in CI and is skipped elsewhere, with the reason, so that no test passes in CI without
having run.

CI services set ``CI`` (GitHub Actions, GitLab CI and most others set ``CI=true``); an empty
value, ``0``, ``false`` or ``no`` means a developer's machine. The skips are also listed at the end
of the run by the pytest plugin, so a machine without KVM does not look like a green run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal, NamedTuple, NoReturn

#: starts every skip reason given here, so the plugin's summary can find them
SKIP_PREFIX = "NOT RUN: "
KVM_REASON = "need /dev/kvm (read-write) to run guests under KVM"


class Outcome(NamedTuple):
    action: Literal["fail", "skip"]
    message: str


def in_ci(environ: Mapping[str, str]) -> bool:
    """True when ``environ`` is a CI job's."""
    return environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def outcome(available: bool, reason: str, environ: Mapping[str, str]) -> Outcome | None:
    """None when the requirement is there; otherwise fail (in CI) or skip, saying ``reason``."""
    if available:
        return None
    if in_ci(environ):
        return Outcome("fail", f"{reason} (CI provides it, so its absence is an error)")
    return Outcome("skip", f"{SKIP_PREFIX}{reason}")


def require(available: bool, reason: str) -> None:
    """Fail or skip the running test (or fixture) unless ``available``."""
    result = outcome(available, reason, os.environ)
    if result is None:
        return
    import pytest  # only ever called from inside a pytest run

    if result.action == "fail":
        pytest.fail(result.message, pytrace=False)
    pytest.skip(result.message)


def unavailable(reason: str) -> NoReturn:
    """Fail or skip the running test: something it needs is missing."""
    require(False, reason)
    raise AssertionError("unreachable: require(False, ...) always raises")


def kvm_available() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def tsc_restorable() -> bool:
    """Whether a restore can set a guest's TSC back (KVM's TSC offset). Not on a PVM host
    (:func:`vmsh.engine.pvm.is_pvm_host`): there the guest reads the host's TSC, whatever
    MSR_IA32_TSC the snapshot holds."""
    from vmsh.engine.pvm import is_pvm_host

    return not is_pvm_host()
