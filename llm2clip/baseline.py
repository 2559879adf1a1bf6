"""The baseline: a standard CLIP (transformers' CLIPModel) whose own text encoder stops at 77 tokens.

In the tiny world it is built from configs and pretrained on short captions; with real checkpoints it
is the OpenAI/LAION CLIP named by `vision.model` (its processor and tokenizer come from that folder).
Fine-tuned on the same mixed captions as LLM2CLIP, truncated to 77 tokens, it is the paper's
"plain CLIP fine-tune" row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError


@dataclass
class TextTowerConfig:
    """The tiny world's CLIP text tower (real checkpoints bring their own)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    max_length: int = 77  # CLIP's context window: longer captions are truncated
    tokenizer: str = "${run.out_dir}/data/tokenizer"


def _check_text_pooling(config_eos: int | None, tokenizer) -> None:
    """CLIPTextModel pools at the end-of-text token: the first `eos_token_id` in each row or, when
    the config's eos_token_id is 2 (configs from before transformers#24773), the row's highest
    token id. Either way the tokenizer's end token must be the one found, or the text would be read
    only up to its rarest word."""
    end = tokenizer.eos_token_id
    highest = len(tokenizer) - 1
    if config_eos == 2 and end != highest:
        raise ConfigError(f"this CLIP config has text eos_token_id=2, so transformers pools each caption at its "
                          f"highest token id, but the tokenizer ends captions with id {end}, not the highest id "
                          f"({highest}). Fix: give the tokenizer an end-of-text token last in its vocabulary and set "
                          "text_config.eos_token_id to it")
    if config_eos not in (2, None) and config_eos != end:
        raise ConfigError(f"CLIP text_config.eos_token_id={config_eos} but the tokenizer ends captions with id {end}; "
                          "the text would be pooled at the wrong position. Fix: make them the same token")


class BaselineCLIP(nn.Module):
    """CLIPModel plus its tokenizer, with the same encode_image / encode_text API as LLM2CLIP."""

    def __init__(self, clip: nn.Module, tokenizer, max_length: int = 77):
        super().__init__()
        self.clip, self.tokenizer, self.max_length = clip, tokenizer, max_length
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        _check_text_pooling(clip.config.text_config.eos_token_id, tokenizer)
        self.stats = {"truncated": 0}

    @property
    def vision(self) -> nn.Module:
        return self.clip.vision_model

    @classmethod
    def from_config(cls, vision_config, text: TextTowerConfig, embed_dim: int) -> BaselineCLIP:
        from transformers import AutoTokenizer, CLIPConfig, CLIPModel, CLIPTextConfig

        tokenizer = AutoTokenizer.from_pretrained(text.tokenizer)
        # CLIP's own end-of-text token, last in the vocabulary as in OpenAI's: the text is pooled there
        # (see _check_text_pooling), and the LM tokenizer's </s> is id 2, which transformers reads as
        # "legacy config: pool at the highest id".
        tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=text.hidden_size, intermediate_size=4 * text.hidden_size,
            num_hidden_layers=text.num_layers, num_attention_heads=text.num_heads,
            max_position_embeddings=text.max_length, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        config = CLIPConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(),
                            projection_dim=embed_dim)
        config._attn_implementation = vision_config._attn_implementation
        return cls(CLIPModel(config), tokenizer, text.max_length)

    @classmethod
    def from_pretrained(cls, folder: str | Path, attn_implementation: str | None = None) -> BaselineCLIP:
        from transformers import AutoTokenizer, CLIPModel

        if not (Path(folder) / "config.json").is_file():
            raise ConfigError(f"{folder} is not a CLIP checkpoint folder (no config.json)")
        clip = CLIPModel.from_pretrained(str(folder), attn_implementation=attn_implementation)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        return cls(clip, tokenizer, clip.config.text_config.max_position_embeddings)

    def save_pretrained(self, folder: str | Path, image_processor=None) -> None:
        from .portable import save_portable, save_tokenizer

        save_portable(self.clip, folder)  # a stock CLIPModel folder that transformers 4.x and 5.x read alike
        save_tokenizer(self.tokenizer, folder)
        if image_processor is not None:
            image_processor.save_pretrained(str(folder))

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """BOS + text + EOS, cut to max_length (CLIP pools at the EOS token); padded right."""
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        budget = self.max_length - (bos is not None) - 1
        rows = []
        for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
            self.stats["truncated"] += len(ids) > budget
            rows.append(([bos] if bos is not None else []) + ids[:budget] + [eos])
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[B, 3, H, W] -> [B, E]."""
        features = self.clip.get_image_features(pixel_values=pixel_values)
        features = getattr(features, "pooler_output", features)  # transformers 5 may return an output object
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: Sequence[str] | dict[str, torch.Tensor], normalize: bool = True) -> torch.Tensor:
        """Texts (tokenised and truncated here) or a tokenised batch -> [B, E]."""
        batch = self.tokenize(text) if not isinstance(text, dict) else text
        device = self.clip.logit_scale.device
        features = self.clip.get_text_features(input_ids=batch["input_ids"].to(device),
                                               attention_mask=batch["attention_mask"].to(device))
        features = getattr(features, "pooler_output", features)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, pixel_values: torch.Tensor, tokens: dict[str, torch.Tensor]):
        """-> (image_features [B, E], text_features [B, E], logit_scale (exponentiated), None)."""
        return self.encode_image(pixel_values), self.encode_text(tokens), self.clip.logit_scale.exp(), None

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    def clamp_logit_scale(self) -> None:
        with torch.no_grad():
            self.clip.logit_scale.clamp_(0, 4.6052)  # log(100)
