"""Training processes keep freed tensor memory for reuse instead of handing it back to the OS each step (glibc).

glibc's malloc serves large blocks (a conv layer's activations: megabytes) by mmap and returns them with munmap
when freed, so every step faults the same memory in again, zeroed page by page: on the CPU that is 5-10% of a
conv VAE's step (docs/performance.md). With mmap and trimming thresholds above any block a step uses, freed
blocks stay in the heap and the next step reuses them; the cost is that the process keeps its peak memory.
PyTorch's CPU tuning guide suggests the same effect through jemalloc or tcmalloc; this needs no other library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
KEEP_BELOW = 1 << 30  # bytes: blocks up to 1 GiB come from the heap, and freed memory up to 1 GiB stays there
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")

_done = False


def keep_freed_memory() -> bool:
    """Set glibc's thresholds once per process; True if set. Nothing is changed where the user tuned the
    allocator (the variables above) or where the C library is not glibc."""
    global _done
    if _done:
        return True
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl and others have other tunables
    except (OSError, AttributeError):
        return False
    _done = bool(libc.mallopt(M_MMAP_THRESHOLD, KEEP_BELOW)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_BELOW))
    return _done
