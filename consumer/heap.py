"""Freed memory kept for reuse in a training process (glibc's malloc).

glibc serves each allocation above its mmap threshold (at most 32 MiB) with a fresh mapping
and gives it back to the kernel when it is freed. A CPU training step frees and allocates its
large tensors again every step (the weight gradients, the sparse products' outputs): at 768 ×
16384 latents, 26–36 thousand pages per step that the kernel maps and zeroes anew, 60–90 ms of
system time in a 1.4 s step. With malloc's own mappings off (M_MMAP_MAX = 0) and the heap's top
given back only beyond 2 GiB (M_TRIM_THRESHOLD), a freed block stays in the heap and the next
step reuses it. The price is that memory the process freed stays in its resident set until it
exits (or, past 2 GiB at the top of the heap, is trimmed): what a training process at a steady
state wants, and what PyTorch's caching allocator does on a GPU.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

ENV = "SAESTREAM_KEEP_FREED_MEMORY"
"""0/false/no/off: leave glibc's malloc as it is."""
_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1
"""Free bytes at the heap's top kept rather than given back (mallopt takes an int)."""

_applied: list[bool] = []


def keep_freed_memory() -> bool:
    """Configure this process's malloc as the module docstring says (once; before the
    process starts its threads); returns whether the setting is in force. Does nothing where
    the C library is not glibc, or where SAESTREAM_KEEP_FREED_MEMORY turns it off."""
    if _applied:
        return _applied[0]
    on = os.environ.get(ENV, "1").strip().lower() not in {"0", "false", "no", "off"}
    if on and platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        try:
            mallopt = ctypes.CDLL(None).mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            on = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        except (OSError, AttributeError):
            on = False
    else:
        on = False
    if on:
        log.info("malloc: freed memory kept for reuse (no mmap per allocation, heap trimmed "
                 "past 2 GiB); %s=0 turns this off", ENV)
    _applied.append(on)
    return on
