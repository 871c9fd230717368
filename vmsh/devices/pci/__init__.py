"""PCI: configuration space models, the host bridge, and config access (0xcf8 and ECAM)."""
