"""runtime/_memory.py: handing back a weight file's mapped pages, and glibc's pinned mmap threshold.
Resident sizes are read from /proc/self/smaps here, not through the module under test."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys

import numpy as np
import pytest

from answerfirst.runtime import _memory
from answerfirst.runtime._memory import pin_mmap_threshold, release_mapped_pages

pytestmark = pytest.mark.skipif(_memory._libc() is None, reason="glibc on Linux only")

MIB = 1 << 20


def resident_bytes(path) -> int:
    """The resident pages of this process's mappings of `path`, summed (smaps' Rss lines)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if not fields[0].endswith(":"):  # a mapping's header: address perms offset dev inode [path]
                inside = len(fields) >= 6 and fields[5] == str(path.resolve())
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


@pytest.fixture
def weight_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 8 * MIB, dtype=np.uint8).tobytes())
    return path


def test_released_pages_leave_the_rss_and_read_back_the_same_bytes(weight_file):
    with open(weight_file, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        view = np.frombuffer(mapped, dtype=np.uint8)
        checksum = int(view.sum(dtype=np.uint64))  # reads every page
        assert resident_bytes(weight_file) >= 8 * MIB
        assert release_mapped_pages([weight_file]) == 8 * MIB
        assert resident_bytes(weight_file) < MIB
        assert int(view.sum(dtype=np.uint64)) == checksum
        assert np.array_equal(view, np.fromfile(weight_file, dtype=np.uint8))
        del view


def test_a_writable_mapping_is_left_alone(weight_file):
    with open(weight_file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
        mapped[:4] = b"edit"  # private copy-on-write pages: dropping them would lose this
        assert release_mapped_pages([weight_file]) == 0
        assert mapped[:4] == b"edit"
        assert resident_bytes(weight_file) > 0


PROBE = """
import ctypes, sys
from answerfirst.runtime import _memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = _memory._libc()
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
pinned = sys.argv[1] == "pin" and _memory.pin_mmap_threshold()
libc.free(libc.malloc(24 << 20))
before = libc.mallinfo2().hblkhd
block = libc.malloc(12 << 20)
print(pinned, libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.parametrize("pin", [True, False])
def test_the_pinned_threshold_maps_large_blocks_after_a_larger_one_was_freed(pin):
    """Unpinned, glibc raises its threshold to 24 MiB when a mapped 24 MiB block is freed, and the
    12 MiB block that follows comes from the heap (where, freed, it would stay); pinned at 1 MiB, it
    is mapped. A fresh process each: the threshold decides where new memory comes from, and this
    test process's heap already has room (12 MiB: more than the probe's imports leave free)."""
    if not hasattr(_memory._libc(), "mallinfo2"):
        pytest.skip("glibc < 2.33 has no mallinfo2")
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run([sys.executable, "-c", PROBE, "pin" if pin else "no"], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out[0] == str(pin)
    mapped = int(out[1])
    assert (mapped >= 12 * MIB) if pin else (mapped == 0), mapped


def test_the_users_own_threshold_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    pin_mmap_threshold.cache_clear()
    try:
        assert pin_mmap_threshold() is False
    finally:
        pin_mmap_threshold.cache_clear()


def test_nothing_is_released_where_no_mapping_is_found(weight_file):
    assert release_mapped_pages([weight_file, weight_file.with_name("absent.bin")]) == 0
