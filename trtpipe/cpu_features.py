"""Which int8 kernel family ONNX Runtime's CPU execution provider uses on this machine.

ONNX Runtime's int8 GEMMs (MLAS) pick their kernel from the CPU's instruction set, and the
kernels do not all compute the same numbers: on AVX2 and AVX-512BW without VNNI a uint8 x int8
product is summed in pairs into int16 (``vpmaddubsw``), which can saturate; VNNI
(``vpdpbusd``) and AMX accumulate in int32 exactly. An int8 engine's accuracy is therefore
certified per family, recorded in its manifest and compared at load.

Families, best first: ``amx``, ``avx512vnni``, ``avxvnni``, ``avx512bw``, ``avx2``; ``x86`` for
an x86-64 CPU without AVX2, ``arm64`` and ``other`` elsewhere. The flags come from the kernel's
``/proc/cpuinfo`` (Linux), else from numpy's runtime CPU dispatch table.
"""

from __future__ import annotations

import functools
import importlib
import platform
from collections.abc import Iterable
from pathlib import Path

INT8_FAMILIES = ("amx", "avx512vnni", "avxvnni", "avx512bw", "avx2", "x86", "arm64", "other")
# Families whose u8s8 kernels add int8 products in int16 pairs (saturation is possible).
SATURATING_FAMILIES = ("avx512bw", "avx2")
# (family, /proc/cpuinfo flag that selects it), checked in order.
_X86_FLAGS = (
    ("amx", "amx_int8"),
    ("avx512vnni", "avx512_vnni"),
    ("avxvnni", "avx_vnni"),
    ("avx512bw", "avx512bw"),
    ("avx2", "avx2"),
)
_X86_MACHINES = ("x86_64", "amd64", "i386", "i686", "x86")
_ARM_MACHINES = ("aarch64", "arm64")
# numpy's __cpu_features__ names for the same flags (no AMX-INT8 entry: AMX is not detected
# without /proc/cpuinfo and such a CPU reports avx512vnni, its closest kernel family).
_NUMPY_NAMES = {"AVX512_VNNI": "avx512_vnni", "AVX512BW": "avx512bw", "AVX2": "avx2"}


def family_from_flags(flags: Iterable[str], machine: str) -> str:
    """The int8 kernel family for a CPU with these (lower-case, cpuinfo-style) flags."""
    machine = machine.lower()
    if machine in _ARM_MACHINES:
        return "arm64"
    if machine not in _X86_MACHINES:
        return "other"
    present = {f.lower() for f in flags}
    for family, flag in _X86_FLAGS:
        if flag in present:
            return family
    return "x86"


def cpuinfo_flags(text: str) -> set[str]:
    """The flags of the first processor in a ``/proc/cpuinfo`` text (empty if none listed)."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def machine_flags() -> set[str]:
    """CPU flags of this machine: /proc/cpuinfo, else numpy's detected features."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags = cpuinfo_flags(cpuinfo.read_text(errors="replace"))
        if flags:
            return flags
    features: dict[str, bool] = {}
    for module in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):
        try:
            features = importlib.import_module(module).__cpu_features__
            break
        except (ImportError, AttributeError):  # numpy 1.x has the second name
            continue
    return {flag for name, flag in _NUMPY_NAMES.items() if features.get(name)}


@functools.cache
def int8_kernel_family() -> str:
    """This machine's int8 kernel family (see the module docstring), detected once."""
    return family_from_flags(machine_flags(), platform.machine())
