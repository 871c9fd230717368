"""Snapshot and restore on KVM with a tiny kernel that prints a, b, c... one letter a second:
a restored VM, in a new process, goes on with the next letter; a bad snapshot is refused."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.engine import tiny_kernel
from vmsh.api.client import ApiClient, ApiError
from vmsh.config import model as m
from vmsh.engine.persist import SnapshotError
from vmsh.harness.waiting import wait_until

LAUNCH = [sys.executable, "-m", "vmsh", "launch"]


def wait_for_socket(path: Path, proc: subprocess.Popen) -> None:
    wait_until(path.exists, 30, f"the VMM's API socket {path}", process=proc)


def read_available(proc: subprocess.Popen, wait: float) -> bytes:
    """Everything the guest prints within ``wait`` seconds."""
    assert proc.stdout is not None
    out = b""
    end = time.monotonic() + wait
    while time.monotonic() < end:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            out += chunk
    return out


def read_printed(proc: subprocess.Popen, timeout: float = 30) -> bytes:
    """What the guest printed, as soon as it printed anything (a letter a second when it runs)."""
    return wait_until(lambda: read_available(proc, 0.1), timeout, "the guest to print", interval=0, process=proc)


def drain(proc: subprocess.Popen) -> bytes:
    """What is already in the serial pipe (the serial device writes it from the vCPU thread, so
    once a pause returned, everything printed before it is there)."""
    assert proc.stdout is not None
    out = b""
    while select.select([proc.stdout], [], [], 0)[0] and (chunk := os.read(proc.stdout.fileno(), 4096)):
        out += chunk
    return out


@pytest.fixture
def snapshot(tmp_path: Path):
    """A running letters VM, paused and snapshotted; yields (snapshot dir, last letter printed)."""
    k = tmp_path / "letters.elf"
    k.write_bytes(tiny_kernel.letters())
    api, snap = tmp_path / "api.sock", tmp_path / "snap"
    snap.mkdir()
    proc = subprocess.Popen([*LAUNCH, "--kernel", str(k), "--serial", "tty", "--console", "off", "--api-socket",
                             str(api)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_socket(api, proc)
        printed = read_printed(proc)
        with ApiClient(str(api)) as client:
            client.put("vm.pause")
            printed += drain(proc)
            client.put("vm.snapshot", {"destination_url": f"file://{snap}"})
            with pytest.raises(ApiError) as info:  # files exist now: refused, VM unharmed
                client.put("vm.snapshot", {"destination_url": f"file://{snap}"})
            assert info.value.status == 500 and "already exists" in info.value.messages[-1]
            client.put("vm.resume")
            assert client.get("vm.info")["state"] == "Running"
    finally:
        proc.kill()
        proc.wait()
    yield snap, printed.decode()[-1]


def test_snapshot_files(snapshot) -> None:
    snap, _ = snapshot
    assert sorted(p.name for p in snap.iterdir()) == ["config.json", "memory-ranges", "state.json"]
    tree = json.loads((snap / "state.json").read_text())
    assert set(tree["snapshots"]) == {"cpu-manager", "memory-manager", "device-manager"}
    assert set(tree["snapshots"]["device-manager"]["snapshots"]) >= {"__serial", "__cmos"}
    assert (snap / "memory-ranges").stat().st_size == json.loads((snap / "config.json").read_text())["memory"]["size"]


def test_restore_continues_in_a_new_process(snapshot, tmp_path: Path) -> None:
    snap, last = snapshot
    ev = tmp_path / "restore-events"
    proc = subprocess.Popen([*LAUNCH, "--restore", f"source_url=file://{snap},resume=on", "--event-monitor",
                             f"path={ev}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        printed = read_printed(proc).decode()
        expected = chr((ord(last) - ord("a") + 1) % 26 + ord("a"))
        assert printed[0] == expected, f"last letter before the snapshot {last!r}, first after restore {printed[:5]!r}"
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
    events = [f"{r['source']} {r['event']}" for r in (json.loads(t) for t in ev.read_text().split("\n\n") if t.strip())]
    assert events[:5] == ["vmm starting", "vm restoring", "vm restored", "vm resuming", "vm resumed"]


def test_restored_clones_run_side_by_side(snapshot) -> None:
    snap, _ = snapshot
    procs = [subprocess.Popen([*LAUNCH, "--restore", f"source_url=file://{snap},resume=on"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
    try:
        # each clone must print; wait for it (a loaded host may take seconds to start four VMMs)
        outputs = [b""] * len(procs)

        def all_printed() -> bool:
            for i, p in enumerate(procs):
                outputs[i] = outputs[i] or read_available(p, 0.1)
            return all(outputs)

        wait_until(all_printed, 60, "every clone to print", interval=0)
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_restore_stays_paused_without_resume(snapshot, tmp_path: Path) -> None:
    snap, _ = snapshot
    api = tmp_path / "restored.sock"
    proc = subprocess.Popen([*LAUNCH, "--restore", f"source_url=file://{snap}", "--api-socket", str(api)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_socket(api, proc)
        with ApiClient(str(api)) as client:
            assert client.get("vm.info")["state"] == "Paused"
            # Nothing may come out while paused: a running guest would print within 1.5 s.
            assert read_available(proc, 1.5) == b""
            client.put("vm.resume")
            assert read_printed(proc)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "state.json").unlink(), "state.json is missing"),
        (lambda d: (d / "state.json").write_text("{not json"), "is not JSON"),
        (lambda d: (d / "memory-ranges").write_bytes(b"short"), "holds 5 bytes"),
        (lambda d: (d / "config.json").write_text(
            '{"cpus": {"boot_vcpus": 2, "max_vcpus": 2}, "payload": {"kernel": "/k"}}'),
         "vCPUs"),
        (lambda d: (d / "state.json").write_text(json.dumps({"snapshots": {},
                                                             "snapshot_data": {"state": '{"version": 99}'}})),
         "Unsupported snapshot format"),
    ],
)
def test_bad_snapshot_is_refused(snapshot, damage, message: str) -> None:
    snap, _ = snapshot
    damage(snap)
    result = subprocess.run([*LAUNCH, "--restore", f"source_url=file://{snap}"], capture_output=True, timeout=60,
                            check=False)
    assert result.returncode == 1
    assert message.encode() in result.stderr and b"Traceback" not in result.stderr


def test_corrupt_vcpu_state_is_refused(snapshot) -> None:
    snap, _ = snapshot
    tree = json.loads((snap / "state.json").read_text())
    vcpu = tree["snapshots"]["cpu-manager"]["snapshots"]["0"]
    state = json.loads(vcpu["snapshot_data"]["state"])
    state["regs"]["rip"] = "not a number"
    vcpu["snapshot_data"]["state"] = json.dumps(state)
    (snap / "state.json").write_text(json.dumps(tree))
    result = subprocess.run([*LAUNCH, "--restore", f"source_url=file://{snap}"], capture_output=True, timeout=60,
                            check=False)
    assert result.returncode == 1 and b"vcpu0.regs.rip" in result.stderr


@pytest.mark.parametrize(("group", "key", "value", "field"), [
    ("regs", "rip", 2**64, "vcpu0.regs.rip"),
    ("sregs", "cs", -1, "vcpu0.sregs.cs.selector"),
])
def test_out_of_range_vcpu_register_is_refused(snapshot, group: str, key: str, value: int, field: str) -> None:
    """A register that does not fit its <linux/kvm.h> width is a snapshot error naming it, not
    an OverflowError from cffi."""
    snap, _ = snapshot
    tree = json.loads((snap / "state.json").read_text())
    vcpu = tree["snapshots"]["cpu-manager"]["snapshots"]["0"]
    state = json.loads(vcpu["snapshot_data"]["state"])
    if key == "cs":
        state[group][key]["selector"] = value
    else:
        state[group][key] = value
    vcpu["snapshot_data"]["state"] = json.dumps(state)
    (snap / "state.json").write_text(json.dumps(tree))
    result = subprocess.run([*LAUNCH, "--restore", f"source_url=file://{snap}"], capture_output=True, timeout=60,
                            check=False)
    assert result.returncode == 1, result.stderr
    assert field.encode() + b": " in result.stderr, result.stderr
    assert b"Traceback" not in result.stderr


def test_vcpu_state_decoder_checks_every_kvm_width() -> None:
    from vmsh.engine.kvm_state import VcpuState, VmKvmState
    from vmsh.engine.kvm_types import CpuidEntry, Regs, Sregs, VcpuEvents
    from vmsh.engine.persist import from_plain, to_plain

    good = VcpuState(vcpu_id=0, cpuid=(CpuidEntry(1, eax=0x806F8),), mp_state=0, regs=Regs(rip=(1 << 64) - 1),
                     sregs=Sregs(), xsave=bytes(16), xcrs=((0, 7),), debugregs=b"", lapic=b"",
                     msrs=((0x10, (1 << 64) - 1),), events=VcpuEvents(), tsc_khz=2_000_000)
    plain = json.loads(json.dumps(to_plain(good)))
    assert from_plain(VcpuState, plain, "vcpu0") == good  # the largest values still fit
    cases = [
        (lambda p: p["regs"].__setitem__("rip", 1 << 64), "vcpu0.regs.rip: expected a 64-bit integer"),
        (lambda p: p["regs"].__setitem__("rip", -1), "vcpu0.regs.rip: -1 is out of range 0..18446744073709551615"),
        (lambda p: p["sregs"]["cs"].__setitem__("selector", -1), "vcpu0.sregs.cs.selector: -1 is out of range"),
        (lambda p: p["sregs"]["cs"].__setitem__("type", 256), "vcpu0.sregs.cs.type: 256"),
        (lambda p: p["sregs"]["gdt"].__setitem__("limit", 0x10000), "vcpu0.sregs.gdt.limit: 65536"),
        (lambda p: p["sregs"]["interrupt_bitmap"].__setitem__(3, -2), "vcpu0.sregs.interrupt_bitmap[3]: -2"),
        (lambda p: p["cpuid"][0].__setitem__("eax", 1 << 32), "vcpu0.cpuid[0].eax: 4294967296"),
        (lambda p: p["msrs"][0].__setitem__(0, 1 << 32), "vcpu0.msrs[0][0]: 4294967296"),
        (lambda p: p["events"].__setitem__("nmi_pending", 256), "vcpu0.events.nmi_pending: 256"),
        (lambda p: p.__setitem__("tsc_khz", -1), "vcpu0.tsc_khz: -1"),
    ]
    for corrupt, message in cases:
        bad = json.loads(json.dumps(plain))
        corrupt(bad)
        with pytest.raises(SnapshotError) as err:
            from_plain(VcpuState, bad, "vcpu0")
        assert str(err.value).startswith(message), (message, str(err.value))
    vm = {"pic_master": "", "pic_slave": "", "ioapic": "", "pit": "", "clock": -1}
    with pytest.raises(SnapshotError, match=r"^vm\.kvm\.clock: -1 is out of range"):
        from_plain(VmKvmState, vm, "vm.kvm")


def test_restored_fd_backed_nets_need_new_fds() -> None:
    from vmsh.engine.builder import apply_restored_net_fds

    def config() -> m.VmConfig:
        return m.VmConfig(net=[m.NetConfig(id="net0", fds=[7, 8]), m.NetConfig(id="net1", tap="vmtap9")])

    cfg = config()
    apply_restored_net_fds(cfg, [m.RestoredNetConfig(id="net0", num_fds=2, fds=[30, 31])])
    assert cfg.net[0].fds == [30, 31] and cfg.net[1].fds is None
    cases = [
        (None, "net0 was created from fds: restore it with net_fds=\\[net0@"),
        ([m.RestoredNetConfig(id="net1", num_fds=1, fds=[30])], "no net device net1 created from fds"),
        ([m.RestoredNetConfig(id="nope", num_fds=1, fds=[30])], "no net device nope"),
        ([m.RestoredNetConfig(id="net0", num_fds=1, fds=[30])], "net0 needs 2 fds, got 1"),
    ]
    for net_fds, message in cases:
        with pytest.raises(SnapshotError, match=message):
            apply_restored_net_fds(config(), net_fds)
