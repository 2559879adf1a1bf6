"""bf16 autocast is used where it is the fast path: CUDA, or a CPU with native bf16."""

import torch

from llm2clip import precision


def test_bf16_autocast_follows_the_cpu_and_the_override(monkeypatch):
    x, w = torch.randn(4, 8), torch.nn.Linear(8, 8)
    for env, expected in (("1", torch.bfloat16), ("0", torch.float32)):
        monkeypatch.setenv("LLM2CLIP_CPU_BF16", env)
        precision.cpu_bf16_is_fast.cache_clear()
        with precision.bf16_autocast("cpu"):
            assert w(x).dtype == expected
        with precision.bf16_autocast("cpu", enabled=False):
            assert w(x).dtype == torch.float32  # asked off stays off
    monkeypatch.delenv("LLM2CLIP_CPU_BF16")
    precision.cpu_bf16_is_fast.cache_clear()
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert precision.cpu_bf16_is_fast() is native
    assert precision.bf16_pays("cuda") and precision.bf16_pays("cpu") is native
    precision.cpu_bf16_is_fast.cache_clear()
