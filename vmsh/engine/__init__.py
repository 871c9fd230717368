"""The machine layer of vmsh: KVM wrappers, guest memory, buses, vCPUs and the x86 boot path."""
