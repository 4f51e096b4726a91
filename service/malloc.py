"""How a long-running process hands memory back: glibc's malloc tuned once at start-up, and trimmed on demand.

Imports nothing but ``ctypes``, so that the listener and the web server can use it without paying for the
worker's imports. Elsewhere than glibc both functions are no-ops.

Why it matters. glibc gives each thread that allocates an arena of its own (up to 8 per core) and keeps freed
memory in it, and after the first large buffer is freed it raises its mmap threshold to that buffer's size, so
later large buffers come from the heap and stay there. A worker's decoded images and activations, and a
listener's received instances (pynetdicom gathers each in memory, one thread per association), are exactly
such buffers: without tuning, a listener that took 8 concurrent associations of 2000 px radiographs held
about 90 MiB more than idle afterwards, and the web server after 24 uploads about 30 MiB more
(`bench/bench_load.py`; README, "Performance").
"""

from __future__ import annotations

from typing import Any

_LIBC: Any = None
_LOADED = False
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def _libc() -> Any:
    global _LIBC, _LOADED
    if not _LOADED:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:
            _LIBC = None
        _LOADED = True
    return _LIBC


def tune_malloc(mmap_threshold: int = 1 << 20, arena_max: int = 2) -> bool:
    """Allocations of ``mmap_threshold`` bytes or more (decoded images, float copies, activations, received
    instances) get their own mapping and go back to the system when freed, instead of glibc raising the
    threshold after the first free and keeping later ones in its heap; at most ``arena_max`` malloc arenas
    (the default is 8 per core, each keeping freed memory). What ``MALLOC_MMAP_THRESHOLD_`` and
    ``MALLOC_ARENA_MAX`` would do, set from inside the process before its threads start. True if applied."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_ARENA_MAX, arena_max))
    mallopt(_M_TRIM_THRESHOLD, 2 * mmap_threshold)
    return ok


def release_memory() -> None:
    """Hand freed heap memory back to the system (glibc ``malloc_trim``; else nothing)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)
