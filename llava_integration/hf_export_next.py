"""Export an anyres model to transformers' own `LlavaNextForConditionalGeneration` + `LlavaNextProcessor`.

The same pieces as hf_export.py (merged LM, `<image>` token, `v1` chat template, tower and projector
weights), plus LLaVA-NeXT's: `image_grid_pinpoints` ([height, width], in the config and the image
processor), `image_newline` (model.image_newline) and a `LlavaNextImageProcessor` with the tower's
size, crop and normalisation. transformers implements only 'spatial_unpad' without CLS, so that is
what exports; `select_feature 'patch'` maps to vision_feature_select_strategy 'default'.
Written by `llm2clip.portable.save_portable` (the hub's layout, reload-checked).
"""

from __future__ import annotations

from pathlib import Path

import torch

from llm2clip.errors import ConfigError

from .hf_export import V1_CHAT_TEMPLATE, copy_weights, hf_parts
from .model import LlavaForCausalLM


def next_image_processor(image_processor, pinpoints: list[list[int]]):
    """transformers' LLaVA-NeXT processor with our CLIP processor's settings (the PIL-backed class when
    torchvision is absent, as llm2clip.data.images.make_image_processor chooses)."""
    import transformers

    try:
        import torchvision  # noqa: F401

        cls = transformers.LlavaNextImageProcessor
    except ImportError:
        cls = transformers.LlavaNextImageProcessorPil
    settings = image_processor.to_dict()
    keep = ("size", "crop_size", "image_mean", "image_std", "do_convert_rgb", "do_resize", "resample",
            "do_rescale", "rescale_factor", "do_normalize", "do_center_crop")
    return cls(**{k: settings[k] for k in keep if k in settings}, image_grid_pinpoints=pinpoints, do_pad=True)


def to_hf_llava_next(model: LlavaForCausalLM, tokenizer):
    """(LlavaNextForConditionalGeneration, LlavaNextProcessor) holding our weights; the tokenizer is copied."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor

    tower = model.get_vision_tower()
    pinpoints = getattr(model.config, "image_grid_pinpoints", None)
    if getattr(model.config, "image_aspect_ratio", None) != "anyres" or not pinpoints:
        raise ConfigError("LlavaNext export needs an anyres model (--image_aspect_ratio anyres with "
                          "--image_grid_pinpoints); export this one with export_hf_llava")
    if model.merge_type != "spatial_unpad" or tower.select_feature != "patch":
        raise ConfigError(f"transformers' LlavaNext implements mm_patch_merge_type 'spatial_unpad' on patch "
                          f"features only; this model has '{model.merge_type}' on '{tower.select_feature}'. "
                          "Train with --mm_patch_merge_type spatial_unpad --mm_vision_select_feature patch")
    if not tower.has_cls:
        raise ConfigError("the LlavaNext export is built for CLIP towers (its 'default' strategy drops a CLS "
                          "token); this tower has none (SigLIP): export a square-image model with export_hf_llava")
    lm, text_config, tokenizer, image_token_id = hf_parts(model, tokenizer)
    config = LlavaNextConfig(
        vision_config=tower.config.to_dict(), text_config=text_config.to_dict(), image_token_index=image_token_id,
        projector_hidden_act="gelu", vision_feature_select_strategy="default",
        vision_feature_layer=tower.select_layer, image_grid_pinpoints=[list(p) for p in pinpoints],
        image_seq_length=tower.num_patches, multimodal_projector_bias=True,
        tie_word_embeddings=text_config.tie_word_embeddings)
    hf = LlavaNextForConditionalGeneration(config).to(torch.float32).eval()
    copy_weights(hf, model, lm, len(tokenizer))
    with torch.no_grad():
        hf.model.image_newline.copy_(model.image_newline.float())
    processor = LlavaNextProcessor(image_processor=next_image_processor(tower.image_processor, pinpoints),
                                   tokenizer=tokenizer, patch_size=tower.patch_size,
                                   vision_feature_select_strategy="default", image_token="<image>",
                                   num_additional_image_tokens=1, chat_template=V1_CHAT_TEMPLATE)
    return hf, processor


def export_hf_llava_next(model: LlavaForCausalLM, tokenizer, out: str | Path) -> Path:
    """Write the HF-native folder atomically, in the canonical layout, reload-checked."""
    from llm2clip.files import atomic_dir
    from llm2clip.portable import save_portable

    hf, processor = to_hf_llava_next(model, tokenizer)
    with atomic_dir(out) as tmp:
        save_portable(hf, tmp, processor=processor)
    return Path(out)
