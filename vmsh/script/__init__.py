"""The vmsh command language: the same commands at the shell prompt and in script files."""
