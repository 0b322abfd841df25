"""Where and when a measurement was taken: the record every benchmark result carries.

The machines that run h2t-edge differ (AVX2 only; AVX-512 with VNNI and bf16; AMX), and the speed
of an int8 or bf16 graph depends on which, so a result names the CPU model and the instruction
sets detected at run time, never assumed. The documentation shows this record beside every figure.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

# /proc/cpuinfo flags that decide which kernels ONNX Runtime, OpenVINO and oneDNN pick (sha_ni: hashing).
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "sha_ni")


def cpu_info(cpuinfo: str | Path = "/proc/cpuinfo") -> dict:
    """This CPU: {"model", "arch", "cores", "isa"}; isa lists the ISA_FLAGS it has (empty where
    /proc/cpuinfo is unreadable, e.g. off Linux)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():  # the first processor's block is enough
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name" and value:
            model = value
        elif key == "flags":
            flags = set(value.split())
            break
    return {"model": model, "arch": platform.machine(), "cores": os.cpu_count(),
            "isa": [flag for flag in ISA_FLAGS if flag in flags]}


def describe(cpu: dict) -> str:
    """One line for a `cpu_info()` record, e.g. 'AMD EPYC (x86_64, 2 cores; avx2)'."""
    isa = ", ".join(cpu.get("isa") or []) or "no AVX2"
    return f"{cpu['model']} ({cpu['arch']}, {cpu['cores']} cores; {isa})"


def measured_on() -> dict:
    """The fields every benchmark result records: {"date", "machine", "cpu"} (machine: `describe(cpu)`)."""
    cpu = cpu_info()
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": describe(cpu), "cpu": cpu}
