"""Device register models. Devices never import KVM, the buses or the engine."""
