"""The machine record every benchmark result carries: CPU model and instruction sets, read at run time."""

from __future__ import annotations

from h2t_edge.core.machine import cpu_info, describe, measured_on

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu
"""


def test_cpu_info_reads_the_model_and_instruction_sets(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    cpu = cpu_info(path)
    assert cpu["model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert cpu["isa"] == ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"]
    assert "avx512_vnni" in describe(cpu)


def test_an_avx2_only_cpu_says_so(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text("model name\t: AMD EPYC\nflags\t\t: sse2 avx avx2 fma\n")
    assert cpu_info(path)["isa"] == ["avx2"]


def test_without_cpuinfo_the_record_still_has_every_field(tmp_path):
    cpu = cpu_info(tmp_path / "missing")
    assert set(cpu) == {"model", "arch", "cores", "isa"} and cpu["isa"] == []
    record = measured_on()
    assert set(record) == {"date", "machine", "cpu"} and record["date"].endswith("UTC")
