"""bitsandbytes 4-bit (QLoRA) layers on CPU: keep the layout that has a backward pass.

Shared by stage 1 (the embedder's probe and LoRA training) and LLaVA's QLoRA fine-tuning.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


def _linear4bit_layers(model: nn.Module) -> list[nn.Module]:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


@contextlib.contextmanager
def cpu_4bit_repacking_disabled(model: nn.Module) -> Iterator[None]:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for its inference kernel the first
    time the layer runs in eval mode without grad. The packed kernel has no backward (gradients to
    earlier layers silently vanish) and the way back is lossy, so probes on a model that may still be
    trained run with repacking off."""
    layers = _linear4bit_layers(model)
    saved = [getattr(m, "support_avx512bf16_for_cpu", False) for m in layers]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for m, flag in zip(layers, saved, strict=True):
            m.support_avx512bf16_for_cpu = flag


def keep_4bit_trainable(model: nn.Module) -> None:
    """Pin 4-bit layers to bitsandbytes' trainable layout for good (see `cpu_4bit_repacking_disabled`),
    unpacking any that an earlier inference pass already repacked."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    for m in _linear4bit_layers(model):
        m.support_avx512bf16_for_cpu = False
        if getattr(m.weight.quant_state, "packing_format_for_cpu", False):
            m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                m.weight.data, m.weight.quant_state)
