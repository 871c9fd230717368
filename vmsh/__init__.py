"""vmsh: a KVM virtual machine monitor in Python.

Nothing heavy is imported here: ``vmsh launch`` must start fast.
"""

__version__ = "0.1.0"
