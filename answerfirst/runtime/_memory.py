"""Process memory housekeeping for an engine that keeps its own copy of the weights (OpenVINO).

Two things held OpenVINO's RSS well above what it needs. Peak over the calls one `make bench`
worker makes, static int8 of the random-weight Qwen3-0.6B export, 2-core Sapphire Rapids-class
Xeon (`bench/openvino_memory.py EXPORT --variant int8-static --bench-sequence [--without ...]`;
README "OpenVINO memory"): 2.81 GB with neither step below, 1.96 GB with the first, 1.52 GB with both.

- glibc's allocator raises its mmap threshold (up to 32 MiB) each time a mapped block is freed,
  after which blocks of that size come from the heap arenas, where they stay resident once freed.
  The CPU plugin allocates a buffer again whenever a new input shape needs it larger (freeing the
  old one), so the heap grew with the shapes seen. `pin_mmap_threshold` fixes the threshold (once
  per process; a MALLOC_MMAP_THRESHOLD_ the user set wins): large blocks are mapped, and unmapped
  when freed.
- The plugin repacks the int8 weights into buffers of its own at the first inference, reading them
  from the IR's .bin, which it maps read-only; the pages it read (0.43 GB) stay counted in the RSS
  though nothing reads them again. `release_mapped_pages` hands a file's mapped pages back (the
  kernel's page cache still holds them: a later read faults them back in, with the same bytes).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MADV_DONTNEED = 4  # Linux's madvise advice (asm-generic/mman-common.h)
MMAP_THRESHOLD_BYTES = 1 << 20  # blocks of 1 MiB and over are mapped, and unmapped when freed


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, where this process runs on it (Linux); None elsewhere (macOS, musl, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


@functools.cache
def pin_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD_BYTES for this process (see the module
    docstring), unless MALLOC_MMAP_THRESHOLD_ says otherwise. True where it is now pinned."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False  # the user's own setting, which glibc read at start-up
    libc = _libc()
    if libc is None:
        return False
    pinned = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    logger.debug("glibc mmap threshold %s at %d bytes", "pinned" if pinned else "NOT pinned", MMAP_THRESHOLD_BYTES)
    return pinned


def read_only_mappings(files: Iterable[Path]) -> list[tuple[int, int]]:
    """(start, end) of this process's read-only mappings of `files` (/proc/self/maps)."""
    wanted = {str(Path(f).resolve()) for f in files}
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n") in wanted and fields[1][1] == "-":
                start, end = (int(address, 16) for address in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def release_mapped_pages(files: Iterable[Path]) -> int:
    """Drop this process's resident pages of its read-only mappings of `files`; the bytes of
    mappings released. Writable mappings are left alone (dropping their pages would lose writes).
    Nothing is lost: a read-only page is reread from the file (the page cache) when next touched."""
    libc = _libc()
    if libc is None:
        return 0
    released = 0
    for start, end in read_only_mappings(files):
        if libc.madvise(start, end - start, MADV_DONTNEED) == 0:
            released += end - start
        else:
            logger.debug("madvise(%#x, %d) failed: errno %d", start, end - start, ctypes.get_errno())
    return released


__all__ = ["MMAP_THRESHOLD_BYTES", "pin_mmap_threshold", "read_only_mappings", "release_mapped_pages"]
