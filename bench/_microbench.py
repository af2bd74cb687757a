"""What the pytest-benchmark microbenchmarks share: timing a call (synchronised on CUDA,
so the figure is the device's time, not the launch's) and naming the device."""
from __future__ import annotations

import platform

import torch


def measure(benchmark, fn) -> None:
    """Time ``fn`` with pytest-benchmark; on CUDA each round waits for the device."""
    if torch.cuda.is_available():
        def run():
            fn()
            torch.cuda.synchronize()
        benchmark(run)
    else:
        benchmark(fn)


def device_info() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
