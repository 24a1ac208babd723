"""Handing the heap's free pages back to the OS.

glibc keeps what a process frees for its next allocations, so the tens of MB a tokenizer's JSON parse, the
weights' reading or the kernel timing frees would stay in the process's RSS for good (and under what is
allocated next). It keeps more than it reuses where torch allocates: a CPU tensor is a posix_memalign of
64-byte alignment, and this glibc (2.36; 2.38 merges the pieces) seldom fits such a request into the chunk the
last one of its size freed, so allocating and freeing a tensor of a few MB over and over holds two to three
times its size. The loader trims after each phase of the load, the kernel timing after each shape.
"""

from __future__ import annotations

import ctypes


def trim_heap() -> None:
    """Return every free heap page to the OS (glibc's malloc_trim; a millisecond or so)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except AttributeError:  # a C library without malloc_trim: nothing to hand back this way
        pass
