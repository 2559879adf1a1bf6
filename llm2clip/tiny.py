"""Tiny models built from real HF configs, through the same code paths as real checkpoints.

Tests and the embedded default use these instead of downloaded weights: a `LlamaConfig` with 2
layers is still a Llama, loaded by `AutoModel`, LoRA-targeted by module name, quantised by
bitsandbytes and saved with `save_pretrained`.
"""

from __future__ import annotations

import transformers

# family -> HF config class; each family's extra fields keep it valid at toy sizes
LLM_FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": False}),
    "qwen3": ("Qwen3Config", {"use_sliding_window": False}),
    "gemma": ("GemmaConfig", {}),
    "gemma2": ("Gemma2Config", {"sliding_window": 64}),
    "gemma3": ("Gemma3TextConfig", {"sliding_window": 64}),
}


def tiny_llm_config(family: str = "llama", vocab_size: int = 2048, hidden_size: int = 64, num_layers: int = 2,
                    num_heads: int = 4, num_kv_heads: int | None = None, intermediate_size: int | None = None,
                    max_position_embeddings: int = 1024, **extra) -> transformers.PretrainedConfig:
    """A decoder-LLM config of `family` at toy size (real class, real defaults otherwise)."""
    if family not in LLM_FAMILIES:
        raise ValueError(f"unknown LLM family '{family}'; choose one of {sorted(LLM_FAMILIES)}")
    class_name, family_extra = LLM_FAMILIES[family]
    return getattr(transformers, class_name)(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or max(1, num_heads // 2),
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        **{"tie_word_embeddings": True, **family_extra, **extra},
    )
