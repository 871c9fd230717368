"""Legacy PC devices: 16550A UART, i8042 reset, POST port and debug console."""
