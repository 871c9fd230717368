"""An x86 instruction decoder and emulator for a small, explicit set of instructions.

``decode`` turns instruction bytes into an ``Insn``; ``Emulator`` carries one out on a register
file and a guest-access interface (virtual memory, FPU state, MXCSR). Neither knows where the
instruction came from: the PVM glue (``vmsh/engine/pvm.py``) feeds them the instructions a PVM
host's in-kernel emulator rejects. Semantics follow the Intel SDM vol. 2.
"""
