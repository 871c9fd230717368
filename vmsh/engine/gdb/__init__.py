"""A gdb stub: the GDB remote serial protocol on ``--gdb path=SOCKET``.

- :mod:`.packets`: the protocol's framing (``$data#cs``, acks, escapes, Ctrl-C);
- :mod:`.registers`: the x86-64 target description and the ``g``/``G`` register block;
- :mod:`.guest_debug`: ``KVM_SET_GUEST_DEBUG`` (single step, hardware breakpoints and
  watchpoints in the debug registers, software breakpoints' exits);
- :mod:`.target`: the stopped VM as gdb sees it (threads = vCPUs, memory by guest virtual
  address through the guest's page tables, breakpoints);
- :mod:`.session`: attach, stop, resume or step, wait, detach (the stub's and the shell's);
- :mod:`.stub`: the ``gdb`` thread that serves one debugger connection at a time.
"""
