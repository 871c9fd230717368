"""Virtio: split virtqueues, the device base class, the virtio-pci transport and device models."""
