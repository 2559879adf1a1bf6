"""Export to transformers' own `LlavaForConditionalGeneration` (no custom code, no trust_remote_code).

    vision_config  the tower's CLIPVisionConfig or SiglipVisionConfig ('clip_vision_model' /
                   'siglip_vision_model'); SigLIP has no CLS token, so its strategy is 'full'
    projector      mm_projector.0 / .2  ->  multi_modal_projector.linear_1 / linear_2 (mlp2x_gelu only:
                   HF's projector is always Linear-GELU-Linear)
    LLM            the (LoRA-merged) causal LM as text_config / language_model + lm_head
    tokenizer      gains "<image>" as a special token (image_token_index) and the embeddings grow by one
    processor      LlavaProcessor: CLIPImageProcessor + tokenizer + patch_size, which expands "<image>" to
                   one token per patch, plus a chat template that writes our `v1` prompt

Stock `LlavaForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained` load the folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llm2clip.errors import ConfigError

from .conversation import V1_SYSTEM
from .model import LlavaForCausalLM

# Renders the same text as conversation.render(..., v1): "SYSTEM USER: <image>\nQ ASSISTANT: A</s>..."
V1_CHAT_TEMPLATE = (
    "{{ '" + V1_SYSTEM.replace("'", "\\'") + " ' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %} ASSISTANT:"
    "{% else %} "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}</s>"
    "{% endif %}{% endfor %}"
)


def _merged_lm(model: LlavaForCausalLM):
    from peft import PeftModel

    lm = model.language_model
    if isinstance(lm, PeftModel):
        if getattr(lm.get_base_model(), "is_quantized", False):
            raise ConfigError("a 4/8-bit LLM cannot be merged for export; reload the LoRA output in 16-bit "
                              "(load_pretrained_model without load_4bit) and export that")
        lm = lm.merge_and_unload()
    return lm


def hf_parts(model: LlavaForCausalLM, tokenizer):
    """What both HF exports share: (merged LM, its text config without our keys, a tokenizer copy with
    "<image>", that token's id). The projector must map onto HF's Linear-GELU-Linear."""
    import copy

    if getattr(model.config, "mm_projector_type", None) != "mlp2x_gelu":
        raise ConfigError(f"HF Llava's projector is Linear-GELU-Linear; this model's mm_projector_type is "
                          f"'{model.config.mm_projector_type}'. Train with --mm_projector_type mlp2x_gelu to export")
    lm = _merged_lm(model)
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    text_config = copy.deepcopy(lm.config)
    for key in [k for k in vars(text_config) if k.startswith(("mm_", "tokenizer_", "llava_"))] + \
            ["use_mm_proj", "version", "image_aspect_ratio", "image_grid_pinpoints", "llm2clip_run_dir"]:
        text_config.__dict__.pop(key, None)
    return lm, text_config, tokenizer, tokenizer.convert_tokens_to_ids("<image>")


def copy_weights(hf, model: LlavaForCausalLM, lm, vocab_size: int) -> None:
    """Tower, projector and LM into an HF Llava(-Next)ForConditionalGeneration, then one more embedding row."""
    projector = model.mm_projector
    hf.model.vision_tower.load_state_dict(model.get_vision_tower().vision_tower.float().state_dict())
    hf.model.multi_modal_projector.linear_1.load_state_dict(projector[0].float().state_dict())
    hf.model.multi_modal_projector.linear_2.load_state_dict(projector[2].float().state_dict())
    hf.model.language_model.load_state_dict(lm.get_decoder().float().state_dict())
    hf.lm_head.load_state_dict(lm.get_output_embeddings().float().state_dict())
    # the new "<image>" row is never looked up: image features replace it
    hf.resize_token_embeddings(vocab_size, mean_resizing=False)


def to_hf_llava(model: LlavaForCausalLM, tokenizer):
    """(LlavaForConditionalGeneration, LlavaProcessor) holding our weights; the tokenizer is copied."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    if model.is_anyres:
        raise ConfigError("this model is anyres / spatially merged: export it with "
                          "hf_export_next.export_hf_llava_next (LlavaNextForConditionalGeneration)")
    tower = model.get_vision_tower()
    lm, text_config, tokenizer, image_token_id = hf_parts(model, tokenizer)
    # 'default' drops the CLS token, which only CLIP has; SigLIP's tokens are all patches
    full = tower.select_feature == "cls_patch" or not tower.has_cls
    extra = int(tower.has_cls)  # image tokens besides the patches (LlavaProcessor's count)
    config = LlavaConfig(
        vision_config=tower.config.to_dict(), text_config=text_config.to_dict(), image_token_index=image_token_id,
        projector_hidden_act="gelu", vision_feature_select_strategy="full" if full else "default",
        vision_feature_layer=tower.select_layer, image_seq_length=tower.num_patches + int(full) * extra,
        multimodal_projector_bias=True, tie_word_embeddings=text_config.tie_word_embeddings)
    hf = LlavaForConditionalGeneration(config).to(torch.float32).eval()
    copy_weights(hf, model, lm, len(tokenizer))
    processor = LlavaProcessor(image_processor=tower.image_processor, tokenizer=tokenizer,
                               patch_size=tower.patch_size, vision_feature_select_strategy=config.
                               vision_feature_select_strategy, image_token="<image>",
                               num_additional_image_tokens=extra, chat_template=V1_CHAT_TEMPLATE)
    return hf, processor


def export_hf_llava(model: LlavaForCausalLM, tokenizer, out: str | Path) -> Path:
    """Write the HF-native folder atomically."""
    from llm2clip.files import atomic_dir
    from llm2clip.portable import save_portable

    hf, processor = to_hf_llava(model, tokenizer)
    with atomic_dir(out) as tmp:
        save_portable(hf, tmp, processor)  # the hub's layout, reloaded and checked (transformers 4.x reads it)
    return Path(out)
