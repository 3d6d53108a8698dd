"""Process memory policy for canonflow's own processes (CLI, workers).

Transforms allocate and free a batch-sized working set per group. With Arrow's default
mimalloc pool and glibc's per-thread arenas, freed pages linger and peak RSS creeps up with
every group; the system allocator plus ``malloc_trim`` after each group keeps the peak at
the working set. Library users who call the transform from their own process keep their
own allocator: only canonflow's entry points call :func:`tune`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache

import pyarrow as pa


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


def tune() -> None:
    """Use the system allocator for Arrow buffers in this process."""
    pa.set_memory_pool(pa.system_memory_pool())


def release() -> None:
    """Hand freed heap pages back to the OS (glibc); a no-op elsewhere."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)
