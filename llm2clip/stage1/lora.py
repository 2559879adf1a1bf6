"""LoRA / QLoRA through peft, with llm2vec's defaults (r=16, alpha=32, dropout 0.05, all projections)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

LLAMA_STYLE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_STYLE_TARGETS))


def add_lora(model: nn.Module, lora: LoraSettings, *, quantized: bool = False,
             gradient_checkpointing: bool = False) -> nn.Module:
    """Freeze `model`, add trainable LoRA. `quantized`: bitsandbytes 4-bit base (QLoRA)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        from ..quantization import keep_4bit_trainable

        keep_4bit_trainable(model)
        # casts norms to fp32 and enables input grads so checkpointing works through frozen 4-bit layers
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                        target_modules=list(lora.target_modules))
    return get_peft_model(model, config)
