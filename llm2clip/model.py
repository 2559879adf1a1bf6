"""The LLM2CLIP model: a CLIP vision encoder and a small adapter on frozen LLM caption embeddings.

    image  [B, 3, H, W] -> CLIP/SigLIP vision model -> pooled [B, W] -> visual_projection -> [B, E]
    vector [B, D] (cached LLM embedding) -> L2-normalise -> TextAdapter -> [B, E]

`TextAdapter` is LLM2CLIP's TextProj (FuseMix's inverted-bottleneck MLP): `depth` pre-LayerNorm
residual blocks Linear(D, 2D) -> GELU -> Linear(2D, D), then LayerNorm and Linear(D, E). The visual
projection is initialised fresh, as LLM2CLIP re-initialises CLIP's. The pooled image feature is the
vision model's pooler_output: CLIP's post-LayerNorm CLS token, SigLIP's attention-pooling head.

A saved folder holds config.json, model.safetensors and preprocessor_config.json; `encode_text` takes
LLM vectors, or texts when the folder names the stage-1 embedder it was trained against.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .guards import require_finite_vectors
from .portable import canonical_key, load_vision_layout, portable_config
from .vision import build_vision, check_pooled, vision_inputs

MODEL_TYPE = "llm2clip"


@dataclass
class ModelConfig:
    embed_dim: int = 1280  # shared image-text space (1280 for the OpenAI/EVA configs)
    adapter_depth: int = 4  # residual MLP blocks in the text adapter (paper: 4 beats 0, 1, 2)
    adapter_expansion: int = 2  # hidden width of each block, in multiples of the LLM width
    center_vectors: bool = True  # subtract the training vectors' mean before normalising (see TextAdapter)
    loss: str = "clip"  # clip (InfoNCE) | siglip (sigmoid, learnable bias)
    init_logit_scale: float = math.log(1 / 0.07)  # siglip: log(10)
    inherit_logit_scale: bool = True  # clip loss: start from the pretrained CLIPModel's logit_scale, if any
    init_logit_bias: float | None = None  # siglip: -10

    def validate(self) -> None:
        if self.loss not in ("clip", "siglip"):
            raise ConfigError("stage2.model.loss must be 'clip' or 'siglip'")
        if self.embed_dim < 1 or self.adapter_depth < 0 or self.adapter_expansion < 1:
            raise ConfigError("stage2.model: embed_dim >= 1, adapter_depth >= 0, adapter_expansion >= 1")

    def logit_bias_init(self) -> float | None:
        """SigLIP needs a bias; its default starts every pair at 'negative' (open_clip: -10)."""
        if self.init_logit_bias is not None:
            return self.init_logit_bias
        return -10.0 if self.loss == "siglip" else None


class ResidualMLP(nn.Module):
    def __init__(self, width: int, expansion: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, expansion * width)
        self.fc2 = nn.Linear(expansion * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class TextAdapter(nn.Module):
    """[B, D] LLM embeddings -> [B, E].

    `center` (a buffer, zero unless set) is subtracted before the L2 normalisation: LLM embeddings
    are anisotropic (all captions in a narrow cone; mean pairwise cosine 0.66-0.86 for the tiny
    world's CC embedder), and centring them on the training set's mean vector lets the adapter see
    what differs between captions from the first step. `set_center` fixes it once, from cached or
    live training vectors; it is saved with the model."""

    def __init__(self, llm_dim: int, embed_dim: int, depth: int = 4, expansion: int = 2):
        super().__init__()
        self.register_buffer("center", torch.zeros(llm_dim))
        self.blocks = nn.Sequential(*(ResidualMLP(llm_dim, expansion) for _ in range(depth)))
        self.norm = nn.LayerNorm(llm_dim)
        self.proj = nn.Linear(llm_dim, embed_dim)

    def set_center(self, vectors: torch.Tensor) -> None:
        """vectors [N, D]: a sample of the training captions' LLM embeddings."""
        self.center.copy_(vectors.float().mean(0))

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        x = F.normalize(vectors.to(self.proj.weight.dtype) - self.center.to(self.proj.weight.dtype), dim=-1)
        return self.proj(self.norm(self.blocks(x)))


class LLM2CLIP(nn.Module):
    def __init__(self, vision: nn.Module, llm_dim: int, cfg: ModelConfig, embedder_ref: dict | None = None):
        """`vision`: a transformers CLIP/Siglip/Siglip2VisionModel (llm2clip.vision). `embedder_ref`:
        {'config', 'fingerprint'} of the stage-1 embedder whose vectors the adapter reads (lets encode_text
        take texts)."""
        super().__init__()
        cfg.validate()
        check_pooled(vision)
        self.cfg, self.llm_dim, self.embedder_ref = cfg, llm_dim, embedder_ref
        self.vision = vision
        self.visual_projection = nn.Linear(vision.config.hidden_size, cfg.embed_dim, bias=False)
        self.text_adapter = TextAdapter(llm_dim, cfg.embed_dim, cfg.adapter_depth, cfg.adapter_expansion)
        self.logit_scale = nn.Parameter(torch.tensor(cfg.init_logit_scale))
        bias = cfg.logit_bias_init()
        self.logit_bias = nn.Parameter(torch.tensor(bias)) if bias is not None else None
        self._embedder = None

    # -- encoders --------------------------------------------------------------------------------------
    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[B, 3, H, W] -> [B, E]."""
        inputs = vision_inputs(self.vision.config, pixel_values)  # SigLIP 2: patchified, llm2clip.vision
        pooled = self.vision(**inputs).pooler_output  # [B, W]: CLS (CLIP) / head (SigLIP)
        features = self.visual_projection(pooled)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor | Sequence[str], normalize: bool = True) -> torch.Tensor:
        """LLM vectors [B, D] (e.g. from the cache), or texts (encoded by the stage-1 embedder as saved at
        training time, with the caption instruction the cache used: cache.instruction) -> [B, E]."""
        if not isinstance(text, torch.Tensor):
            text = self.embedder().encode(list(text)).to(self.visual_projection.weight.device)
        require_finite_vectors(text)
        return self._text_features(text, normalize)

    def _text_features(self, llm_vectors: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        if llm_vectors.shape[-1] != self.llm_dim:
            raise ConfigError(f"LLM vectors are {llm_vectors.shape[-1]} wide but this model's adapter reads "
                              f"{self.llm_dim}; were they made by another LLM?")
        features = self.text_adapter(llm_vectors)  # [B, E]
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, pixel_values: torch.Tensor, llm_vectors: torch.Tensor):
        """-> (image_features [B, E], text_features [B, E], logit_scale (exponentiated), logit_bias).
        The training path: no finiteness check (no host sync per step); a non-finite input shows up as a
        non-finite loss, which the loop's guard stops or skips (`nonfinite`)."""
        return (self.encode_image(pixel_values), self._text_features(llm_vectors), self.logit_scale.exp(),
                self.logit_bias)

    def clamp_logit_scale(self) -> None:
        """CLIP clamps the temperature after each optimizer step so logits stay <= 100x."""
        with torch.no_grad():
            self.logit_scale.clamp_(0, math.log(100))

    def embedder(self):
        """The stage-1 embedder named at save time, loaded once; refused if its weights changed."""
        if self._embedder is None:
            from .cache import check_fingerprint, fingerprint
            from .embedder import CaptionEmbedder, EmbedderConfig

            if not self.embedder_ref:
                raise ConfigError("this model names no stage-1 embedder; pass LLM vectors to encode_text")
            emb_cfg = EmbedderConfig(**self.embedder_ref["config"])
            expected = self.embedder_ref["fingerprint"]
            check_fingerprint(fingerprint(emb_cfg, expected["storage_dtype"]), expected,
                              f"the stage-1 embedder at {emb_cfg.model}")
            self._embedder = CaptionEmbedder.load(emb_cfg)
        return self._embedder

    # -- persistence -----------------------------------------------------------------------------------
    def config_dict(self) -> dict:
        return {"model_type": MODEL_TYPE, "llm_dim": self.llm_dim, **asdict(self.cfg),
                "vision_config": self.vision.config.to_dict(), "embedder": self.embedder_ref}

    def save_pretrained(self, folder: str | Path, image_processor=None) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = self.config_dict()
        config["vision_config"] = portable_config(config["vision_config"])
        (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        # the vision weights in the hub's layout (vision.vision_model.*), which transformers 4.x and 5.x both read
        vision_class = type(self.vision).__name__
        state = {("vision." + canonical_key(vision_class, k[len("vision."):]) if k.startswith("vision.") else k):
                 v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        if image_processor is not None:
            image_processor.save_pretrained(str(folder))

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> LLM2CLIP:
        from safetensors.torch import load_file

        folder = Path(folder)
        config_file = folder / "config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        if config.get("model_type") != MODEL_TYPE:
            raise ConfigError(f"{folder} is not an LLM2CLIP model folder (config.json model_type must be "
                              f"'{MODEL_TYPE}'); for a vision tower alone use llm2clip.vision.load_vision_model")
        names = {f for f in ModelConfig.__dataclass_fields__}
        cfg = ModelConfig(**{k: v for k, v in config.items() if k in names})
        vision = build_vision(config["vision_config"])
        model = cls(vision, config["llm_dim"], cfg, config.get("embedder"))
        state = load_vision_layout(load_file(str(folder / "model.safetensors"), device=str(device)), "vision.")
        model.load_state_dict(state)
        return model.to(device).eval()
