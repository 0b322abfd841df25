"""What CPU a figure was measured on, read at run time: model name and the instruction-set
extensions that decide which int8/bf16 kernels the engines use (AVX2 only, AVX-512 with VNNI,
native bf16, AMX). These machines change between sessions; every benchmark records this beside
its figures instead of assuming one CPU."""

from __future__ import annotations

import os
import platform
from pathlib import Path

# /proc/cpuinfo flags that change the kernels ONNX Runtime and OpenVINO pick.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_info(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> dict:
    """{"model": CPU model name, "isa": the ISA_FLAGS present, "cores": logical CPUs this process may
    use, "int8_dot": whether it has an int8 dot-product instruction (VNNI/AMX), "bf16": native bf16}."""
    model, flags = platform.processor() or platform.machine(), set()
    path = Path(cpuinfo)
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    isa = [f for f in ISA_FLAGS if f in flags]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": model, "isa": isa, "cores": cores,
            "int8_dot": any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8")),
            "bf16": any(f in flags for f in ("avx512_bf16", "amx_bf16"))}


def describe(info: dict | None = None) -> str:
    """One line: 'AMD EPYC, 2 cores, avx2 fma (no VNNI, no native bf16)'."""
    info = info or cpu_info()
    return (f"{info['model']}, {info['cores']} cores, {' '.join(info['isa']) or 'no AVX2'} "
            f"({'VNNI' if info['int8_dot'] else 'no VNNI'}, {'native bf16' if info['bf16'] else 'no native bf16'})")
