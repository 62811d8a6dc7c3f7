"""What this machine's CPU can do, as Linux lists it: the features that decide how fast the
encoder and vLLM's CPU build multiply matrices (read at start-up, never per request)."""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The first CPU's feature flags (empty where there is no such file: not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def native_bfloat16(flags: frozenset[str]) -> bool:
    """Multiplies bfloat16 in hardware (AVX-512 BF16 or AMX); elsewhere it is emulated."""
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def has_vnni(flags: frozenset[str]) -> bool:
    """Accumulates int8 products in 32 bits (VNNI); without it fbgemm sums pairs in 16."""
    return bool(flags & {"avx512_vnni", "avx_vnni"})
