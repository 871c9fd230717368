"""vmsh.thread_names: threads give themselves their name for the kernel when they start."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from vmsh.thread_names import NamedThread, NamedTimer, kernel_name, name_current_thread


def _comm(native_id: int | None = None) -> str:
    tid = threading.get_native_id() if native_id is None else native_id
    return Path(f"/proc/self/task/{tid}/comm").read_text().strip()


def _run(name: str) -> list[str]:
    seen: list[str] = []
    thread = NamedThread(target=lambda: seen.append(_comm()), name=name)
    thread.start()
    thread.join()
    return seen


def test_named_thread_shows_its_name_to_the_kernel() -> None:
    assert _run("vcpu3") == ["vcpu3"]
    # Linux keeps 15 bytes of a name (cloud-hypervisor's vmm_signal_handler shows as vmm_signal_hand)
    assert _run("vmm_signal_handler") == ["vmm_signal_hand"]
    assert kernel_name("vmm_signal_handler") == b"vmm_signal_hand"


def test_a_plain_thread_does_not_and_name_current_thread_does() -> None:
    seen: list[str] = []

    def body() -> None:
        seen.append(_comm())
        name_current_thread()
        seen.append(_comm())

    thread = threading.Thread(target=body, name="http-server")
    thread.start()
    thread.join()
    assert seen[0] != "http-server" and seen[1] == "http-server"


def test_named_timer_shows_its_name() -> None:
    seen: list[str] = []
    timer = NamedTimer(0, lambda: seen.append(_comm()))
    timer.name = "rate-limit"
    timer.start()
    timer.join()
    assert seen == ["rate-limit"]


def test_the_main_thread_keeps_the_process_name() -> None:
    code = ("from pathlib import Path; from vmsh.thread_names import name_current_thread; "
            "before = Path('/proc/self/comm').read_text(); name_current_thread('vmm'); "
            "print(before == Path('/proc/self/comm').read_text())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout == "True\n"
