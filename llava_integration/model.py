"""A compact LLaVA: any HF causal LM, the vision tower and the projector, composed (not subclassed).

    images [B, 3, H, W] -> tower -> [B, N, C] -> mm_projector -> [B, N, D]
    input_ids with IMAGE_TOKEN_INDEX -> text embeddings with the N image rows spliced in -> LM
    anyres (LLaVA-NeXT): [1 + tiles, 3, S, S] per image + image_sizes -> anyres.merge_crops -> [T_i, D] each

Composition keeps the LM family-agnostic (Llama, Mistral, Qwen2, Gemma ...) and means 4-bit loading
only ever quantises the LM: the projector stays a plain Linear stack (LLaVA #744). The multimodal
settings live on the LM's config (`mm_vision_tower`, `mm_hidden_size`, ...), as in LLaVA.
"""

from __future__ import annotations

import torch
from torch import nn

from llm2clip.errors import ConfigError

from .constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

MM_KEYS = ("mm_vision_tower", "mm_vision_select_layer", "mm_vision_select_feature", "mm_projector_type",
           "mm_hidden_size", "tokenizer_model_max_length", "tokenizer_padding_side", "image_aspect_ratio",
           "use_mm_proj", "version", "mm_patch_merge_type", "image_grid_pinpoints")


class LlavaForCausalLM(nn.Module):
    # HF Trainer would count label tokens before the splice and truncation and pass that count as the
    # loss denominator, under-weighting truncated batches; each batch's loss is its own token mean.
    accepts_loss_kwargs = False

    def __init__(self, language_model: nn.Module, vision_tower: nn.Module, mm_projector: nn.Module):
        super().__init__()
        self.language_model, self.vision_tower, self.mm_projector = language_model, vision_tower, mm_projector
        self.check_widths()
        if "unpad" in self.merge_type:  # LLaVA-NeXT's learned end-of-row embedding, initialised as it does
            width = language_model.get_input_embeddings().weight.shape[1]
            dtype = next(mm_projector.parameters(), language_model.get_input_embeddings().weight).dtype
            self.image_newline = nn.Parameter(torch.randn(width, dtype=dtype) / width ** 0.5)

    @property
    def merge_type(self) -> str:
        return getattr(self.config, "mm_patch_merge_type", None) or "flat"

    @property
    def is_anyres(self) -> bool:
        """Images arrive as [1 + tiles, 3, S, S] crops (or plain images under a spatial merge)."""
        return getattr(self.config, "image_aspect_ratio", None) == "anyres" or self.merge_type != "flat"

    @property
    def config(self):
        return self.language_model.config

    @property
    def device(self) -> torch.device:
        return self.language_model.get_input_embeddings().weight.device

    def get_vision_tower(self) -> nn.Module:
        tower = self.vision_tower
        return tower[0] if isinstance(tower, list | nn.ModuleList) else tower  # FSDP holds [tower]

    def check_widths(self) -> None:
        """The projector's input must be the tower's width (DreamLIP #16 fed 768 into a 1024 projector)."""
        first = next((m for m in self.mm_projector.modules() if isinstance(m, nn.Linear)), None)
        tower_width = self.get_vision_tower().hidden_size
        if first is not None and first.in_features != tower_width:
            raise ConfigError(f"the projector takes {first.in_features}-wide features but the vision tower's "
                              f"hidden_size is {tower_width}; pretrain a projector for this tower "
                              f"(mm_hidden_size={tower_width})")

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        features = self.get_vision_tower()(images)  # [B, N, C]
        projector_dtype = next(self.mm_projector.parameters(), features).dtype
        return self.mm_projector(features.to(projector_dtype))  # [B, N, D]

    def encode_anyres(self, images, image_sizes) -> list[torch.Tensor]:
        """LLaVA-NeXT's path: images [B, 1 + tiles, 3, S, S] (or a list of [n_i, 3, S, S]; zero-padded
        tiles beyond an image's own count are dropped) with image_sizes (width, height) -> [T_i, D] each."""
        from .anyres import grid_shape, merge_crops, parse_grid_pinpoints

        tower = self.get_vision_tower()
        tile = tower.image_size
        raw = getattr(self.config, "image_grid_pinpoints", None)
        anyres = getattr(self.config, "image_aspect_ratio", None) == "anyres"
        pinpoints = parse_grid_pinpoints(raw, tile) if raw and anyres else None
        crops = [im.reshape(-1, *im.shape[-3:]) for im in images]  # [n_i, 3, S, S]
        if pinpoints is not None:
            if image_sizes is None or len(image_sizes) != len(crops):
                raise ConfigError("anyres images need image_sizes: the (width, height) of each original image")
            sizes = [(int(s[1]), int(s[0])) for s in image_sizes]  # (height, width)
            wanted = [1 + rows * cols if len(c) > 1 else 1
                      for c, (rows, cols) in zip(crops, (grid_shape(s, pinpoints, tile) for s in sizes), strict=True)]
            if any(len(c) < n for c, n in zip(crops, wanted, strict=True)):
                raise ConfigError(f"anyres images hold {[len(c) for c in crops]} crops but their sizes need "
                                  f"{wanted}; process them with llava_integration.anyres.process_anyres_image")
            crops = [c[:n] for c, n in zip(crops, wanted, strict=True)]
        else:
            sizes = [(tile, tile)] * len(crops)
        features = self.encode_images(torch.cat(crops)).split([len(c) for c in crops])  # [n_i, N, D] each
        newline = getattr(self, "image_newline", None)
        return [merge_crops(f, s, pinpoints, tile, self.merge_type, newline)
                for f, s in zip(features, sizes, strict=True)]

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Checkpoint the LLM's layers (HF Trainer's --gradient_checkpointing). Non-reentrant by default: the
        LLM's inputs are spliced embeddings, which need not require grad when the LLM is frozen."""
        self.language_model.activation_checkpointing_enable(
            activation_checkpointing_kwargs=activation_checkpointing_kwargs or {"use_reentrant": False},
            every_n_layers=every_n_layers, offload=offload)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    # -- LLaVA's splice ------------------------------------------------------------------------------
    def prepare_inputs_labels_for_multimodal(self, input_ids, position_ids, attention_mask, past_key_values,
                                             labels, images, image_sizes=None):
        """LLaVA's contract: returns (None, position_ids, attention_mask, past_key_values, inputs_embeds,
        labels), with every IMAGE_TOKEN_INDEX replaced by the image's N feature rows (labelled
        IGNORE_INDEX), sequences truncated to tokenizer_model_max_length and padded per
        tokenizer_padding_side."""
        if images is None or input_ids.shape[1] == 1:  # text only, or a decoding step with a KV cache
            return input_ids, position_ids, attention_mask, past_key_values, None, labels
        if self.is_anyres:
            features = self.encode_anyres(images, image_sizes)  # [T_i, D] per image
        else:
            if isinstance(images, list):
                images = torch.stack([im.reshape(*im.shape[-3:]) for im in images])
            features = self.encode_images(images)  # [B_img, N, D]
        embed = self.language_model.get_input_embeddings()
        no_labels = labels is None
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        labels = torch.full_like(input_ids, IGNORE_INDEX) if no_labels else labels
        rows_embeds, rows_labels, next_image = [], [], 0
        for ids, lab, keep in zip(input_ids, labels, attention_mask.bool(), strict=True):
            ids, lab = ids[keep], lab[keep]
            where = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
            bounds = [-1, *where, len(ids)]
            text_embeds = embed(ids.clamp(min=0))  # placeholders embed as id 0, then get replaced
            parts, part_labels = [], []
            for k in range(len(bounds) - 1):
                parts.append(text_embeds[bounds[k] + 1: bounds[k + 1]])
                part_labels.append(lab[bounds[k] + 1: bounds[k + 1]])
                if k < len(where):
                    if next_image >= len(features):
                        raise ConfigError(f"input_ids hold more {IMAGE_TOKEN_INDEX} placeholders than the "
                                          f"{len(features)} images passed")
                    image = features[next_image].to(text_embeds.dtype)
                    parts.append(image)
                    part_labels.append(torch.full((len(image),), IGNORE_INDEX, dtype=lab.dtype, device=lab.device))
                    next_image += 1
            if not where:  # text-only sample: its (zero) image is skipped but stays in the graph
                parts.append(features[next_image][:0].to(text_embeds.dtype) if next_image < len(features)
                             else text_embeds[:0])
                next_image += 1
            rows_embeds.append(torch.cat(parts))
            rows_labels.append(torch.cat(part_labels))
        limit = getattr(self.config, "tokenizer_model_max_length", None)
        if limit:
            rows_embeds = [r[:limit] for r in rows_embeds]
            rows_labels = [r[:limit] for r in rows_labels]
        return (None, *self._pad(rows_embeds, rows_labels, past_key_values, no_labels))

    def _pad(self, rows_embeds, rows_labels, past_key_values, no_labels):
        longest = max(len(r) for r in rows_embeds)
        batch, width = len(rows_embeds), rows_embeds[0].shape[-1]
        ref = rows_embeds[0]
        embeds = ref.new_zeros(batch, longest, width)
        labels = torch.full((batch, longest), IGNORE_INDEX, dtype=rows_labels[0].dtype, device=ref.device)
        mask = torch.zeros(batch, longest, dtype=torch.long, device=ref.device)
        positions = torch.zeros(batch, longest, dtype=torch.long, device=ref.device)
        left = getattr(self.config, "tokenizer_padding_side", "right") == "left"
        for i, (row, lab) in enumerate(zip(rows_embeds, rows_labels, strict=True)):
            n = len(row)
            span = slice(longest - n, longest) if left else slice(0, n)
            embeds[i, span], labels[i, span], mask[i, span] = row, lab, 1
            positions[i, span] = torch.arange(n, device=ref.device)
        return positions, mask, past_key_values, embeds, None if no_labels else labels

    # -- forward / generate -----------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, images=None, image_sizes=None, **kwargs):
        if inputs_embeds is None:
            (input_ids, position_ids, attention_mask, past_key_values, inputs_embeds,
             labels) = self.prepare_inputs_labels_for_multimodal(input_ids, position_ids, attention_mask,
                                                                 past_key_values, labels, images, image_sizes)
        if past_key_values is not None:  # transformers 5.x warns on the name even when None is passed
            kwargs["past_key_values"] = past_key_values
        return self.language_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   inputs_embeds=inputs_embeds, labels=labels, **kwargs)

    @torch.inference_mode()
    def generate(self, input_ids, images=None, attention_mask=None, image_sizes=None,
                 **generate_kwargs) -> torch.Tensor:
        """Greedy/sampled generation from a prompt with images; returns only the new tokens."""
        padding_side = getattr(self.config, "tokenizer_padding_side", "right")
        self.config.tokenizer_padding_side = "left"  # decoding appends on the right
        try:
            _, _, mask, _, embeds, _ = self.prepare_inputs_labels_for_multimodal(
                input_ids, None, attention_mask, None, None, images, image_sizes)
        finally:
            self.config.tokenizer_padding_side = padding_side
        if embeds is None:
            embeds, mask = self.language_model.get_input_embeddings()(input_ids), attention_mask
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=mask, **generate_kwargs)
