"""Freed memory goes back to the system, so a burst of large requests does not leave the worker
gigabytes bigger for good.

glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MiB), so
later blocks of that size (decoded images, PIL's 16 MiB image blocks, tensors) come from
per-thread heaps that it keeps after they are freed: after six /score requests of 16 images of
4096² at once, with nothing referenced any more, the worker stayed 300 MB bigger (with it: 15 MB).
With a fixed threshold every block over it has a mapping of its own, returned to the system when
freed. Elsewhere (macOS, musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
"""mallopt's parameter numbers in glibc's malloc.h."""


def return_large_blocks_to_the_system(threshold_bytes: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold at `threshold_bytes` for this process; False where there is no
    glibc to tell."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    # Two heaps, not eight per core: the threads that decode images and run batches share them,
    # so what one thread frees another reuses instead of growing a heap of its own.
    done = bool(mallopt(M_MMAP_THRESHOLD, threshold_bytes)) and bool(mallopt(M_ARENA_MAX, 2))
    if not done:
        log.warning("mallopt(M_MMAP_THRESHOLD) refused: freed memory may stay with the worker")
    return done
