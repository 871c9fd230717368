"""The console stream waits for the guest like a person at its terminal, without a VM: a fake
guest (a thread) answers what is sent, and the session's guard says whether the VM runs."""

from __future__ import annotations

import re
import threading
import time

import pytest

from vmsh.errors import VmshError
from vmsh.script.console import ConsoleStream


class FakeGuest:
    """Records what is sent; answers the shell set-up and commands as a shell would."""

    def __init__(self, stream: ConsoleStream) -> None:
        self.stream = stream
        self.sent: list[tuple[float, str]] = []
        stream.connect_input(self.take)

    def take(self, data: bytes, deadline: float) -> None:
        text = data.decode()
        self.sent.append((time.monotonic(), text))
        if m := re.search(r"VMSH-SHELL (\S+)", text):
            self.stream.feed(f"VMSH-SHELL_{m.group(1)}\r\n".encode())
        if m := re.search(r"'VMSH-''B(\d+)'; eval (\S+);", text):
            self.stream.feed(f"VMSH-B{m.group(1)}\r\n{m.group(2)}\r\nVMSH-E{m.group(1)}:0\r\n".encode())


def test_run_after_a_boot_waits_for_the_prompt_before_typing() -> None:
    stream = ConsoleStream()
    guest = FakeGuest(stream)
    stream.feed(b"old output # \r\n")  # a prompt from before the boot does not count
    stream.reset_shell(booting=True)
    prompt_at: list[float] = []

    def boot() -> None:
        time.sleep(0.5)
        stream.feed(b"[    1.0] booting\r\nVMSH-READY\r\n")
        time.sleep(0.5)
        prompt_at.append(time.monotonic())
        stream.feed(b"~ # \x1b[6n")

    thread = threading.Thread(target=boot)
    thread.start()
    output, status = stream.run("hello", timeout=10)
    thread.join()
    assert (output, status) == ("hello", 0)
    assert guest.sent[0][0] >= prompt_at[0]  # nothing was typed before the prompt showed
    assert len(guest.sent) == 2  # the set-up line, then the command


def test_run_after_a_boot_times_out_naming_the_prompt() -> None:
    stream = ConsoleStream()
    FakeGuest(stream)
    stream.reset_shell(booting=True)
    with pytest.raises(VmshError, match=r"timeout after 0\.3s waiting for the guest's shell prompt"):
        stream.run("hello", timeout=0.3)


def test_a_paused_vm_fails_at_once_but_output_already_there_still_matches() -> None:
    stream = ConsoleStream()
    guest = FakeGuest(stream)
    state = {"reason": None}
    stream.guard = lambda: state["reason"]
    stream.feed(b"printed before the pause\r\n")
    state["reason"] = "The VM is paused: resume it first"
    started = time.monotonic()
    with pytest.raises(VmshError, match="The VM is paused: resume it first"):
        stream.send("x")
    with pytest.raises(VmshError, match="The VM is paused: resume it first"):
        stream.run("true", timeout=30)
    with pytest.raises(VmshError, match=r"The VM is paused: resume it first \(while waiting for 'never'\)"):
        stream.expect("never", timeout=30)
    assert time.monotonic() - started < 5 and guest.sent == []
    assert stream.expect("before the pause", timeout=30)
