"""Peak-RSS helpers shared by the benchmarks that compare training-step memory in fresh subprocesses."""

from __future__ import annotations

import ctypes
import gc
from pathlib import Path


def proc_status_mib(field: str) -> float:
    """VmRSS / VmHWM of this process image. (ru_maxrss is not used: Linux keeps it across execve, so a
    child would inherit its parent's peak.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def settle() -> float:
    """Return freed memory to the OS and reset the peak (VmHWM) to the current RSS; returns RSS MiB."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return proc_status_mib("VmRSS")
