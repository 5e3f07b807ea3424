"""What the CPU is: shown in ``/info`` and in every benchmark report, and read by the batch-budget default.

A throughput figure or a tuned default means little without the CPU it came from: the same model runs at very
different speeds, and bfloat16 helps or hurts, depending on the instruction sets torch can use (AVX2, AVX-512,
AVX-512 BF16, AMX). Everything here comes from torch's own CPU detection (``torch.cpu.get_capabilities``, built on
the cpuinfo library) and ``/proc/cpuinfo``; nothing is assumed about the vendor.
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def cpu_capabilities() -> Mapping[str, Any]:
    """torch's view of this CPU: instruction-set flags (``amx_bf16``, ``avx512_bf16``, ...), core counts, name."""
    import torch

    get = getattr(torch.cpu, "get_capabilities", None)  # absent from older torch releases
    return get() if get is not None else {}


def matrix_units(dtype: str, capabilities: Mapping[str, Any] | None = None) -> bool:
    """Whether this CPU multiplies ``dtype`` matrices in dedicated matrix units (Intel AMX: ``amx_bf16`` for
    bfloat16, ``amx_fp16`` for float16). Only there do half-precision forwards keep getting cheaper per token with
    batches twice as large as float32's (docs/benchmarks.md, "Batch budget")."""
    caps = cpu_capabilities() if capabilities is None else capabilities
    unit = {"bfloat16": "amx_bf16", "float16": "amx_fp16"}.get(dtype)
    return bool(unit and caps.get(unit) and caps.get("amx_tile"))


def _model_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")) and ":" in line:  # x86, then ARM boards
                name = line.split(":", 1)[1].strip()
                if name:
                    return name
    except OSError:
        pass
    return None


@functools.lru_cache(maxsize=1)
def describe_cpu() -> dict[str, Any]:
    """The CPU in a few fields: ``model`` (its marketing name), ``architecture``, ``isa`` (the widest vector
    instruction set torch's kernels use here: ``DEFAULT``, ``AVX2``, ``AVX512``, ``SVE256``, ...), ``amx`` (matrix
    units for bfloat16), ``avx512_bf16``, ``physical_cores``, ``logical_cpus`` and ``usable_cpus`` (what this
    process may run on: a container's CPU set, not the host's)."""
    import torch

    caps = cpu_capabilities()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    return {
        "model": _model_name() or caps.get("cpu_name") or platform.processor() or "unknown",
        "architecture": platform.machine(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "amx": matrix_units("bfloat16", caps),
        "avx512_bf16": bool(caps.get("avx512_bf16")),
        "physical_cores": caps.get("num_physical_cores"),
        "logical_cpus": caps.get("num_logical_cores") or os.cpu_count(),
        "usable_cpus": usable,
    }


def cpu_summary(cpu: Mapping[str, Any] | None = None) -> str:
    """One line for logs and report headers, e.g. ``AMD EPYC (x86_64, AVX512, avx512_bf16, no AMX), 2 CPUs``."""
    cpu = describe_cpu() if cpu is None else cpu
    features = [cpu.get("architecture"), cpu.get("isa")]
    if cpu.get("avx512_bf16"):
        features.append("avx512_bf16")
    features.append("AMX" if cpu.get("amx") else "no AMX")
    return f"{cpu.get('model')} ({', '.join(f for f in features if f)}), {cpu.get('usable_cpus')} CPUs"
