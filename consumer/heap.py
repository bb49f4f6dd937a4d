"""Freed memory kept for reuse in a CPU training process (glibc's malloc).

glibc serves each allocation above its mmap threshold (at most 32 MiB) with a fresh mapping
and gives it back to the kernel when it is freed. A CPU training step frees and allocates its
large tensors again every step (the weight gradients, the sparse products' outputs): at 768 ×
16384 latents and batch 4096, 31–37 thousand pages a step that the kernel maps and zeroes
anew, 60–90 ms of system time in a 1.4 s step. With malloc's own mappings off (M_MMAP_MAX = 0)
and the heap's top given back only beyond 2 GiB (M_TRIM_THRESHOLD), a block the step frees
stays in the heap and the next step reuses it.

The price is memory: what the process frees stays resident — its peak, plus holes where freed
blocks do not fit the next requests (tensors whose size changes, such as AuxK's over a
changing number of dead latents). `release_freed_memory` (malloc_trim) gives all of it back;
the consumer calls it after each snapshot, so what is kept is what one stretch between
snapshots leaves (without snapshots, holes are reused as sizes recur, and free space up to the
2 GiB threshold may stay at the heap's top). Only the main thread's allocations are affected
(the training step's); other threads' arenas map blocks beyond 64 MiB as before. Applied only
where the SAE trains on the CPU: on a GPU the step's tensors are not malloc's.
"""

from __future__ import annotations

import ctypes
import logging
import platform

from saestream.common.native import switch

log = logging.getLogger(__name__)

ENV = "SAESTREAM_KEEP_FREED_MEMORY"
"""0/false/no/off: leave glibc's malloc as it is (1/true/yes/on, empty or unset: configure it;
anything else is a UserError, `native.switch`)."""
_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1
"""Free bytes at the heap's top kept rather than given back (mallopt takes an int)."""

_applied: list[bool] = []


def keep_freed_memory() -> bool:
    """Configure this process's malloc as the module docstring says (once); returns whether
    the setting is in force. Does nothing where the C library is not glibc, or where
    SAESTREAM_KEEP_FREED_MEMORY turns it off; UserError where it is neither on nor off."""
    if _applied:
        return _applied[0]
    on = switch(ENV)
    if on and platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        try:
            mallopt = ctypes.CDLL(None).mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            # The threshold first: mmap off with glibc's small default threshold would be
            # the worst of both.
            on = bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(mallopt(_M_MMAP_MAX, 0))
        except (OSError, AttributeError):
            on = False
    else:
        on = False
    if on:
        log.info("malloc: freed memory kept for reuse by the training step (no mmap per "
                 "allocation, heap trimmed at snapshots); %s=0 turns this off", ENV)
    _applied.append(on)
    return on


def release_freed_memory() -> None:
    """Give the memory kept for reuse back to the kernel (glibc's malloc_trim(0), which also
    releases free pages inside the heap): after one-off work, whose freed blocks the step
    would never reuse. The next step faults its own blocks in once. A no-op unless
    `keep_freed_memory` is in force."""
    if _applied and _applied[0]:
        ctypes.CDLL(None).malloc_trim(ctypes.c_size_t(0))
