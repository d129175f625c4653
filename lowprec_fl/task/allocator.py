"""Keep freed heap memory in the training process, so each step reuses pages already mapped.

glibc gives large freed blocks back to the kernel (``munmap``, or trimming the heap top once
more than twice its dynamic mmap threshold is free, at most 64 MiB). A float32 training step
stays under that, but a low-precision one keeps a quantized copy of each activation alive and
crosses it: every step then re-faults the same memory. Measured on the ConvNet benchmark step
(batch 32, 2 cores): about 14,000 minor page faults and 17-20 ms of system time per 8-bit step
(some 20% of the step), none per float32 step; with the thresholds below, none for either.

The cost: the process keeps up to its peak heap between steps instead of returning it.
"""

from __future__ import annotations

import ctypes
import functools
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest allowed: bigger blocks still get mmapped
TRIM_THRESHOLD_BYTES = 1 << 30  # free memory at the heap top kept before trimming


@functools.cache
def retain_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process once; False where not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # Setting either fixes both thresholds (glibc stops adapting them), so set both.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
