"""The CLIP baseline's text side: pooled where CLIP pools, whatever transformers' legacy rules say."""

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig

from llm2clip.baseline import BaselineCLIP, TextTowerConfig
from llm2clip.errors import ConfigError


def test_clip_text_is_pooled_at_its_end_token_not_at_the_rarest_word(world):
    """CLIPTextModel reads eos_token_id=2 as 'pool at the highest id': our CLIP gets its own end token."""
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=16)
    model = BaselineCLIP.from_config(vision, TextTowerConfig(hidden_size=32, num_layers=1, num_heads=2,
                                                             tokenizer=str(world / "tokenizer")), 16)
    assert model.tokenizer.eos_token_id == len(model.tokenizer) - 1 == model.clip.config.text_config.eos_token_id
    with torch.no_grad():
        a, b = model.encode_text(["a photo of a large red circle", "a photo of a large blue circle"])
        batch = model.tokenize(["a photo of a large red circle"])
        hidden = model.clip.text_model(**batch).last_hidden_state  # [1, T, W]
        manual = F.normalize(model.clip.text_projection(hidden[0, -1]), dim=-1)  # the end token's state
    assert (a @ b) < 0.9999  # the words after the rarest token count
    assert torch.allclose(a, manual, atol=1e-5)
    model.tokenizer.eos_token = "</s>"  # id 2, not the highest: the legacy rule would pool elsewhere
    model.clip.config.text_config.eos_token_id = 2
    with pytest.raises(ConfigError, match="highest token id"):
        BaselineCLIP(model.clip, model.tokenizer)
