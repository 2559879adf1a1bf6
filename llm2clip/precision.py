"""When bf16 autocast pays, decided once per process.

On GPUs and on CPUs with native bf16 (AVX512-BF16 or AMX) bf16 autocast is the fast path (about 3x fp32
on a Sapphire Rapids core). On CPUs without it PyTorch emulates bf16: on an AVX2-only AMD EPYC a bf16
nn.Linear ran 4x slower than fp32 and a bf16 torch.matmul at 0.28 GFLOP/s against 91 in fp32. There,
every `autocast`/`precision: bf16` setting runs in fp32 instead, and says so once.
LLM2CLIP_CPU_BF16=1 (or 0) overrides the detection.
"""

from __future__ import annotations

import logging
import os
from functools import cache

import torch

log = logging.getLogger(__name__)


@cache
def cpu_bf16_is_fast() -> bool:
    forced = os.environ.get("LLM2CLIP_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    fast = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if not fast:
        log.warning("this CPU has no native bf16 (%s): bf16 autocast runs in fp32 here, since emulated bf16 "
                    "is several times slower; LLM2CLIP_CPU_BF16=1 forces it", torch.backends.cpu.get_cpu_capability())
    return fast


def bf16_pays(device: torch.device | str) -> bool:
    """True where bf16 autocast is the fast path on `device`: CUDA, or a CPU with native bf16."""
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and cpu_bf16_is_fast())


def bf16_autocast(device: torch.device | str, enabled: bool = True) -> torch.autocast:
    """`torch.autocast(bf16)` where it pays, else a disabled one (fp32): the one switch every stage uses."""
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=enabled and bf16_pays(device))
