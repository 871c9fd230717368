"""MSI delivery through KVM GSI routing and irqfd (``vmsh.engine.msi``) into a tiny guest."""

from __future__ import annotations

import time

from tests.engine.conftest import CODE_ADDR, Recorder, TinyVm
from vmsh.engine.kvm import Kvm
from vmsh.engine.msi import GsiRoutes, KvmMsiRouter, default_irqchip_routes
from vmsh.engine.vcpu import install_kick_handler

#: MSI address for LAPIC 0 and data with delivery mode NMI (SDM vol. 3A §10.11.1-2)
MSI_ADDRESS = 0xFEE0_0000
MSI_DATA_NMI = 0x4 << 8


#: the local APIC's spurious-interrupt vector register; bit 8 enables the APIC (SDM §10.9)
APIC_SVR, APIC_SVR_ENABLE = 0xF0, 0x100


class IrqchipVm(TinyVm):
    """A tiny VM with the in-kernel irqchip (created before the vCPU, as KVM requires)."""

    def __init__(self, kvm: Kvm) -> None:
        vm = kvm.create_vm()
        vm.create_irqchip()
        super().__init__(_Reuse(vm))

    def enable_lapic(self) -> None:
        """Software-enable the local APIC, as a guest kernel does first: a disabled one
        takes no MSI, not even an NMI."""
        lapic = bytearray(self.fd.get_lapic())
        lapic[APIC_SVR:APIC_SVR + 4] = (0xFF | APIC_SVR_ENABLE).to_bytes(4, "little")
        self.fd.set_lapic(bytes(lapic))


class _Reuse:
    """Hands TinyVm the VM that already has its irqchip."""

    def __init__(self, vm):
        self._vm = vm

    def create_vm(self):
        return self._vm


def test_default_routes_cover_pic_and_ioapic() -> None:
    routes = default_irqchip_routes()
    assert len(routes) == 24 + 16
    assert (4, 2, 4) in routes and (4, 0, 4) in routes and (12, 1, 4) in routes


def test_an_msi_vector_reaches_the_guest(kvm: Kvm) -> None:
    install_kick_handler()
    tiny = IrqchipVm(kvm)
    router = None
    try:
        out = Recorder()
        tiny.pio.insert(out, 0xE9, 1)
        handler = CODE_ADDR + 0x100
        # main: hlt; jmp main     NMI handler: mov al, 'N'; out 0xe9, al; hlt; jmp $-1
        tiny.long_mode(bytes.fromhex("f4ebfd"))
        tiny.mem.write(handler, bytes.fromhex("b04e e6e9 f4 ebfd"))
        tiny.set_idt_gate(2, handler)
        tiny.enable_lapic()
        routes = GsiRoutes(tiny.vm)
        router = KvmMsiRouter(tiny.vm, routes, vectors=2)
        assert router.gsis == [24, 25]
        router.update(1, MSI_ADDRESS, MSI_DATA_NMI, masked=False)
        tiny.vcpu.start()
        time.sleep(0.2)
        assert out.writes == [], "nothing fired yet"
        router.trigger(1)
        deadline = time.monotonic() + 10
        while not out.writes and time.monotonic() < deadline:
            time.sleep(0.01)
        assert out.writes == [(0, b"N")]
    finally:
        tiny.vcpu.kick()
        tiny.vcpu.join(5)
        if router is not None:
            router.close()
        tiny.close()


def test_a_masked_update_installs_no_route(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    try:
        vm.create_irqchip()
        routes = GsiRoutes(vm)
        router = KvmMsiRouter(vm, routes, vectors=1)
        router.update(0, MSI_ADDRESS, 0x30, masked=True)
        assert routes._msi == {}
        router.update(0, MSI_ADDRESS, 0x30, masked=False)
        assert routes._msi == {24: (MSI_ADDRESS, 0x30)}
        router.update(7, MSI_ADDRESS, 0x30, masked=False)  # no such vector: ignored
        router.trigger(7)
        router.close()
        assert router.fds == []
    finally:
        vm.close()
