"""A test that lacks /dev/kvm or an image fails in CI and is skipped (loudly) elsewhere: the
decision itself, and the engine and guest tests run without KVM in a child pytest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmsh.harness.requirements import SKIP_PREFIX, Outcome, in_ci, outcome

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("value, expected", [
    (None, False), ("", False), ("0", False), ("false", False), ("False", False), ("no", False),
    ("true", True), ("1", True), ("yes", True), ("TRUE", True),
])
def test_in_ci(value: str | None, expected: bool) -> None:
    environ = {"HOME": "/root"} if value is None else {"CI": value}
    assert in_ci(environ) is expected


@pytest.mark.parametrize("available, environ, expected", [
    (True, {"CI": "true"}, None),
    (True, {}, None),
    (False, {"CI": "true"}, Outcome("fail", "needs kvm (CI provides it, so its absence is an error)")),
    (False, {}, Outcome("skip", f"{SKIP_PREFIX}needs kvm")),
    (False, {"CI": "false"}, Outcome("skip", f"{SKIP_PREFIX}needs kvm")),
])
def test_outcome(available: bool, environ: dict[str, str], expected: Outcome | None) -> None:
    assert outcome(available, "needs kvm", environ) == expected


NO_KVM_PLUGIN = """
import vmsh.harness.requirements as requirements
import vmsh.harness.pytest_plugin as plugin

requirements.kvm_available = plugin.kvm_available = lambda: False
"""


def run_without_kvm(tmp_path: Path, ci: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "no_kvm.py").write_text(NO_KVM_PLUGIN)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_XDIST_WORKER", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT), env.get("PYTHONPATH", "")])
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no_kvm", "-p", "no:cacheprovider", "-p", "no:xdist",
                           "--rootdir", str(ROOT), "-q", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)


ENGINE_TEST = "tests/engine/test_kvm.py::test_failed_ioctl_raises_kvm_error"
GUEST_TEST = "tests/guest/test_boot.py::test_reboot_comes_back"


@pytest.mark.parametrize("test", [ENGINE_TEST, GUEST_TEST])
def test_without_kvm_in_ci_fails(tmp_path: Path, test: str) -> None:
    result = run_without_kvm(tmp_path, "true", test)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 error" in result.stdout and "CI provides it, so its absence is an error" in result.stdout, result.stdout


@pytest.mark.parametrize("test", [ENGINE_TEST, GUEST_TEST])
def test_without_kvm_elsewhere_skips_and_says_so_at_the_end(tmp_path: Path, test: str) -> None:
    result = run_without_kvm(tmp_path, None, test)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout, result.stdout
    summary = result.stdout.split("vmsh: tests that did not run (they fail in CI)", 1)
    assert len(summary) == 2 and "need /dev/kvm (read-write)" in summary[1], result.stdout


NEEDS_TEST = """
import pytest

@pytest.mark.needs(False, "frobnicator (apt-get install frob)")
def test_it() -> None:
    pass
"""


@pytest.mark.parametrize("ci, rc, summary", [("true", 1, "1 error"), (None, 0, "1 skipped")])
def test_the_needs_mark_fails_in_ci_and_skips_elsewhere(tmp_path: Path, ci: str | None, rc: int, summary: str) -> None:
    (tmp_path / "test_needs.py").write_text(NEEDS_TEST)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_XDIST_WORKER", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if ci is not None:
        env["CI"] = ci
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
                             "-p", "no:xdist", "-q", "-rs", str(tmp_path / "test_needs.py")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == rc and summary in result.stdout, result.stdout + result.stderr
    assert "frobnicator (apt-get install frob)" in result.stdout, result.stdout
