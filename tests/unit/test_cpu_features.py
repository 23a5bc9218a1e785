"""The CPU int8 kernel family from CPU flags: the mapping, and this machine's detection."""

from __future__ import annotations

import platform

import pytest

from trtpipe.cpu_features import (
    INT8_FAMILIES,
    cpuinfo_flags,
    family_from_flags,
    int8_kernel_family,
)

# Flag sets as /proc/cpuinfo lists them (abridged) for real CPU generations.
ZEN3_AVX2 = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx fma f16c avx2 bmi1 bmi2 vaes"
SKYLAKE_X = ZEN3_AVX2 + " avx512f avx512dq avx512cd avx512bw avx512vl"
CASCADE_LAKE = SKYLAKE_X + " avx512_vnni"
ALDER_LAKE = ZEN3_AVX2 + " avx_vnni"
SAPPHIRE_RAPIDS = CASCADE_LAKE + " avx_vnni avx512_bf16 amx_bf16 amx_tile amx_int8"


@pytest.mark.parametrize(
    ("flags", "machine", "family"),
    [
        (ZEN3_AVX2, "x86_64", "avx2"),
        (SKYLAKE_X, "x86_64", "avx512bw"),
        (CASCADE_LAKE, "x86_64", "avx512vnni"),
        (ALDER_LAKE, "x86_64", "avxvnni"),
        (SAPPHIRE_RAPIDS, "x86_64", "amx"),
        (SAPPHIRE_RAPIDS.replace(" amx_int8", ""), "x86_64", "avx512vnni"),
        ("fpu sse sse2 ssse3 avx", "x86_64", "x86"),
        (ZEN3_AVX2, "AMD64", "avx2"),  # Windows spells the machine this way
        ("fp asimd asimddp i8mm", "aarch64", "arm64"),
        ("", "arm64", "arm64"),
        ("", "riscv64", "other"),
    ],
)
def test_family_from_flags(flags: str, machine: str, family: str) -> None:
    assert family_from_flags(flags.split(), machine) == family
    assert family in INT8_FAMILIES


def test_cpuinfo_flags_reads_the_first_flags_line() -> None:
    text = (
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 sse\n\n"
        "processor\t: 1\nflags\t\t: fpu\n"
    )
    assert cpuinfo_flags(text) == {"fpu", "avx2", "sse"}
    assert cpuinfo_flags("Features\t: fp asimd\n") == {"fp", "asimd"}
    assert cpuinfo_flags("processor: 0\n") == set()


def test_this_machine_has_a_family() -> None:
    family = int8_kernel_family()
    assert family in INT8_FAMILIES
    if platform.machine().lower() in ("x86_64", "amd64"):
        # Every x86-64 CPU ONNX Runtime wheels target has at least AVX2.
        assert family not in ("arm64", "other")
