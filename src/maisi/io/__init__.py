"""Safe file I/O: atomic writes, checkpoints, volumes."""
