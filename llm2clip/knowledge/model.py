"""The Knowledge-CLIP model: a standard CLIP (its own text encoder) plus two training heads.

    image  [B, 3, H, W] -> CLIP vision + projection -> f_I [B, E] (unit norm) -> concept head -> [B, K]
    tokens [B, T] (<= 77) -> CLIP text + projection -> f_T [B, E] (unit norm) -> W_e -> [B, D] ≈ LLM(c)
                                                                              -> concept head -> [B, K]

Loss: α·L_clip(f_I, f_T) + β·L_emb + γ·L_concept (paper: α = γ = 1, β = 0.01).

- W_e is a learnable linear map from CLIP's joint space into the LLM's width (the paper's W_e).
- The concept classifier is one linear layer shared by both modalities over the joint space: the
  concept a caption belongs to is the concept its image should predict, and sharing the head pulls
  the two towers' concept geometry together. Its logits are multiplied by a fixed scale, because the
  joint-space features are unit vectors and logits of a unit vector under small init weights
  would give near-uniform predictions for many steps.

A saved folder is a plain HF CLIPModel folder (tokenizer, processor; loadable by `CLIPModel`, usable
as a LLaVA vision tower) plus `knowledge_heads.safetensors` and `knowledge_config.json`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..baseline import BaselineCLIP
from ..errors import ConfigError
from ..losses import embedding_distillation_loss, soft_concept_loss

HEADS, HEAD_CONFIG = "knowledge_heads.safetensors", "knowledge_config.json"


@dataclass
class HeadsConfig:
    llm_dim: int  # width of the LLM vectors W_e predicts (the cache's width)
    num_concepts: int  # K
    concept_on_text: bool = True  # also classify the text features (the paper: "refines the text and image encoders")
    concept_logit_scale: float = 10.0  # logits = scale · head(unit features)


class KnowledgeCLIP(BaselineCLIP):
    """BaselineCLIP (same encode_image / encode_text) with W_e and the concept head under `heads.`."""

    def __init__(self, clip: nn.Module, tokenizer, heads: HeadsConfig, max_length: int = 77,
                 loss_weights: dict[str, float] | None = None):
        super().__init__(clip, tokenizer, max_length)
        self.heads_cfg = heads
        embed_dim = clip.config.projection_dim
        self.heads = nn.ModuleDict({"distill": nn.Linear(embed_dim, heads.llm_dim),  # W_e
                                    "concept": nn.Linear(embed_dim, heads.num_concepts)})
        self.loss_weights = loss_weights or {"clip": 1.0, "emb": 0.01, "concept": 1.0}
        self.info: dict = {}  # saved with the heads' config, e.g. which concepts they were trained on

    @classmethod
    def from_clip(cls, base: BaselineCLIP, heads: HeadsConfig, loss_weights: dict[str, float] | None = None,
                  seed: int = 0) -> KnowledgeCLIP:
        """Heads initialised from `seed` on top of a (pretrained) BaselineCLIP's weights."""
        torch.manual_seed(seed)
        return cls(base.clip, base.tokenizer, heads, base.max_length, loss_weights)

    def concept_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Unit joint-space features [B, E] -> concept logits [B, K]."""
        return self.heads_cfg.concept_logit_scale * self.heads["concept"](features)

    def forward(self, pixel_values: torch.Tensor, batch: dict[str, torch.Tensor]):
        """batch: input_ids, attention_mask [B, T]; for training also `llm` [B, D] (cached LLM vectors)
        and `concepts` [B, K] (soft labels). -> (f_I, f_T, logit_scale, None[, {"emb", "concept"}])."""
        image = self.encode_image(pixel_values)
        text = self.encode_text({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
        scale = self.clip.logit_scale.exp()
        if "llm" not in batch:
            return image, text, scale, None
        llm, labels = batch["llm"], batch["concepts"]
        if llm.shape[-1] != self.heads_cfg.llm_dim:
            raise ConfigError(f"LLM vectors are {llm.shape[-1]} wide but W_e maps into {self.heads_cfg.llm_dim}; "
                              "the cache was made by another LLM than this model was built for")
        terms = {"emb": embedding_distillation_loss(self.heads["distill"](text), llm),
                 "concept": soft_concept_loss(self.concept_logits(image), labels)}
        if self.heads_cfg.concept_on_text:
            terms["concept"] = (terms["concept"] + soft_concept_loss(self.concept_logits(text), labels)) / 2
        return image, text, scale, None, terms

    def distilled_text(self, text) -> torch.Tensor:
        """Texts or a tokenised batch -> E_T(c)·W_e [B, D], the text encoder's estimate of LLM(c)."""
        return self.heads["distill"](self.encode_text(text))

    # -- persistence ------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, image_processor=None) -> None:
        from safetensors.torch import save_file

        super().save_pretrained(folder, image_processor)
        state = {k: v.detach().contiguous() for k, v in self.heads.state_dict().items()}
        save_file(state, str(Path(folder) / HEADS), metadata={"format": "pt"})
        config = {"heads": asdict(self.heads_cfg), "loss_weights": self.loss_weights, **self.info}
        (Path(folder) / HEAD_CONFIG).write_text(json.dumps(config, indent=1) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path, attn_implementation: str | None = None) -> KnowledgeCLIP:
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / HEAD_CONFIG).is_file():
            raise ConfigError(f"{folder} is not a Knowledge-CLIP folder (no {HEAD_CONFIG}); a plain CLIP folder "
                              "loads with BaselineCLIP.from_pretrained")
        config = json.loads((folder / HEAD_CONFIG).read_text())
        base = BaselineCLIP.from_pretrained(folder, attn_implementation)
        model = cls(base.clip, base.tokenizer, HeadsConfig(**config["heads"]), base.max_length,
                    config["loss_weights"])
        model.heads.load_state_dict(load_file(str(folder / HEADS)))
        model.info = {k: v for k, v in config.items() if k not in ("heads", "loss_weights")}
        return model.eval()
