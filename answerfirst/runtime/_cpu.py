"""What this CPU can do, read once at run time: the adapters pick their kernels from it.

The same wheel runs on CPUs that differ a lot for our kernels (measured in README "Speed levers"):
an AMD EPYC Zen 4 (AVX-512 with VNNI and BF16, no AMX), an EPYC with AVX2 only, and an Intel Xeon
of the Sapphire Rapids class (AVX-512 VNNI/BF16 and AMX tiles for int8 and bf16). bf16 matmuls are
2x fp32 on Zen 4, 5x on the AMX Xeon and 7x SLOWER than fp32 on the AVX2-only EPYC, so no adapter
may choose a precision by the machine it was measured on: it asks `features()`.

Linux reports the flags in /proc/cpuinfo; where that file is missing (macOS, Windows) every flag
reads as absent, which selects the portable kernels.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

# The instruction-set flags that change which kernel is fastest here (names as Linux spells them).
ISA_FLAGS = (
    "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
)


@dataclass(frozen=True)
class CpuFeatures:
    model: str
    flags: frozenset[str]  # the ISA_FLAGS this CPU has

    @property
    def amx_bf16(self) -> bool:
        """bf16 matrix tiles (Sapphire Rapids and later Xeons): bf16 matmuls several times fp32's rate."""
        return {"amx_tile", "amx_bf16"} <= self.flags

    @property
    def amx_int8(self) -> bool:
        return {"amx_tile", "amx_int8"} <= self.flags

    @property
    def int8_dot(self) -> bool:
        """A native int8 dot-product instruction (AVX-512 VNNI or AVX-VNNI)."""
        return bool({"avx512_vnni", "avx_vnni"} & self.flags)

    @property
    def fast_bf16(self) -> bool:
        """Whether bf16 compute beats fp32 here: AMX tiles or AVX-512 BF16. Without either, bf16 is
        emulated and far slower than fp32 (7x on an AVX2-only EPYC)."""
        return self.amx_bf16 or "avx512_bf16" in self.flags

    def describe(self) -> dict[str, object]:
        return {"cpu_model": self.model, "cpu_flags": [f for f in ISA_FLAGS if f in self.flags]}


@functools.cache
def features() -> CpuFeatures:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    first: dict[str, str] = {}  # the first processor's lines (every core reports the same)
    for line in text.splitlines():
        key, _, value = line.partition(":")
        first.setdefault(key.strip(), value.strip())
    model = first.get("model name") or platform.processor() or "unknown"
    flags = set(first.get("flags", "").split())
    return CpuFeatures(model, frozenset(f for f in ISA_FLAGS if f in flags))


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


__all__ = ["ISA_FLAGS", "CpuFeatures", "features", "usable_cores"]
