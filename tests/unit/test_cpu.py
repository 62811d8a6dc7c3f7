"""Reading the CPU's features: the flags line of /proc/cpuinfo and what they mean here."""

from __future__ import annotations

from pathlib import Path

from proxy.cpu import cpu_flags, has_vnni, native_bfloat16


def test_the_first_flags_line_is_read(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512_bf16\n\n"
        "processor\t: 1\nflags\t\t: fpu\n"
    )
    flags = cpu_flags(info)
    assert flags == {"fpu", "avx2", "avx512_bf16"}
    assert native_bfloat16(flags) and not has_vnni(flags)
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_what_the_flags_mean() -> None:
    assert native_bfloat16(frozenset({"amx_bf16"}))
    assert not native_bfloat16(frozenset({"avx512f", "avx2"}))
    assert has_vnni(frozenset({"avx_vnni"})) and has_vnni(frozenset({"avx512_vnni"}))
    assert not has_vnni(frozenset({"avx2", "fma"}))
