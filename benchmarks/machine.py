"""What the numbers were measured on: CPU model, cores, threads, load, library versions, GPU if any."""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

# dense bf16 tensor-core peak (FLOP/s) by device name, for model FLOP utilisation; None = unknown device
BF16_PEAK_FLOPS = {"H100 SXM": 989.4e12, "H100 NVL": 835.6e12, "H100 PCIe": 756.0e12, "H100": 989.4e12,
                   "H200": 989.4e12, "A100": 312.0e12, "L40S": 362.1e12, "L4": 121.0e12}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MiB (Linux /proc), None once it has gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def bf16_peak_flops(name: str) -> float | None:
    for key, peak in BF16_PEAK_FLOPS.items():  # most specific names first
        if key in name:
            return peak
    return None


def gpu_description() -> dict[str, Any] | None:
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count(),
            "cuda": torch.version.cuda, "bf16_peak_tflops": (bf16_peak_flops(props.name) or 0) / 1e12 or None}


def describe(threads: int) -> dict[str, Any]:
    import timm

    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": threads,
        "load_average_1_5_15": load_average(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "timm": timm.__version__,
        "platform": platform.platform(),
        "gpu": gpu_description(),
    }
