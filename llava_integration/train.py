"""Pretraining (projector only, `plain`) and instruction tuning (full, LoRA or QLoRA, `v1`) with HF Trainer.

Mirrors llava/train/train.py: the same flags, the same k-bit setup (BitsAndBytesConfig skipping
mm_projector, prepare_model_for_kbit_training, norms to fp32), LoRA on every LLM Linear but never the
tower or projector, a separate projector learning rate, and LLaVA's output layouts. Runs under plain
python, torchrun or the deepspeed launcher (--deepspeed configs/deepspeed/zero{2,3,3_offload}.json).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
from torch import nn

from .arguments import DataArguments, ModelArguments, TrainingArguments, validate
from .checkpoint import _load_lm, assemble, restore_trainables, save_llava
from .data import DataCollator, LlavaDataset
from .layout import llava_folder_name, tower_location
from .model import LlavaForCausalLM


def compute_dtype(args: TrainingArguments) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def find_all_linear_names(model: nn.Module) -> list[str]:
    """LLaVA's LoRA targets: leaf names of every Linear in the LLM, without lm_head. (Tower and projector
    live outside the LLM here, so they can never be wrapped.)"""
    names = {name.split(".")[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    names.discard("lm_head")
    return sorted(names)


def build_model(model_args: ModelArguments, training_args: TrainingArguments,
                data_args: DataArguments | None = None) -> tuple[LlavaForCausalLM, object]:
    from transformers import AutoTokenizer

    transformers.set_seed(training_args.seed)  # the projector's (and LoRA's) initialisation is reproducible
    dtype = compute_dtype(training_args)
    bits = training_args.bits
    _ = training_args.device  # joins the process group first: ZeRO-3 partitions the LLM as it loads
    if training_args.deepspeed:
        import deepspeed

        deepspeed.init_distributed()  # adopts torch's group, so zero.Init sees the real world size
    frozen_lm = model_args.tune_mm_mlp_adapter or model_args.freeze_backbone
    # A frozen or LoRA-adapted LLM is held in the compute dtype; a fully trained one keeps fp32 master
    # weights under autocast (DeepSpeed keeps its own fp32 copy, so it gets the compute dtype too).
    lm_dtype = dtype if (frozen_lm or training_args.lora_enable or bits < 16 or training_args.deepspeed) \
        else torch.float32
    lm = _load_lm(model_args.model_name_or_path, bits, lm_dtype, None, model_args.trust_remote_code,
                  model_args.attn_implementation, training_args.double_quant, training_args.quant_type)
    lm.config.use_cache = False
    lm.config.llava_base_model = str(model_args.model_name_or_path)
    if frozen_lm:
        lm.requires_grad_(False)
    if bits in (4, 8):
        from peft import prepare_model_for_kbit_training

        from llm2clip.quantization import keep_4bit_trainable

        keep_4bit_trainable(lm)  # CPU bitsandbytes: keep the layout that has a backward pass
        lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=training_args.gradient_checkpointing,
                                             gradient_checkpointing_kwargs={"use_reentrant": False})
    if training_args.lora_enable:
        from peft import LoraConfig, get_peft_model

        lm = get_peft_model(lm, LoraConfig(
            r=training_args.lora_r, lora_alpha=training_args.lora_alpha, lora_dropout=training_args.lora_dropout,
            bias=training_args.lora_bias, target_modules=find_all_linear_names(lm), task_type="CAUSAL_LM"))
    mm = SimpleNamespace(
        mm_vision_tower=model_args.vision_tower, mm_vision_select_layer=model_args.mm_vision_select_layer,
        mm_vision_select_feature=model_args.mm_vision_select_feature, mm_projector_type=model_args.mm_projector_type,
        tokenizer_model_max_length=training_args.model_max_length, tokenizer_padding_side="right",
        use_mm_proj=True, version=model_args.version, llm2clip_run_dir=model_args.llm2clip_run_dir,
        unfreeze_mm_vision_tower=model_args.unfreeze_mm_vision_tower,
        mm_patch_merge_type=model_args.mm_patch_merge_type,
        **({"image_aspect_ratio": data_args.image_aspect_ratio} if data_args else {}))
    model = assemble(lm, mm, dtype, model_args.pretrain_mm_mlp_adapter)
    if data_args is not None and data_args.image_aspect_ratio == "anyres":
        from .anyres import parse_grid_pinpoints

        model.config.image_grid_pinpoints = parse_grid_pinpoints(data_args.image_grid_pinpoints,
                                                                 model.get_vision_tower().image_size)
    model.config.mm_hidden_size = model.get_vision_tower().hidden_size
    model.config.mm_vision_tower = tower_location(model.get_vision_tower())  # not an alias: stock LLaVA reads it
    model.config.mm_patch_merge_type = model_args.mm_patch_merge_type
    model.config.mm_projector_lr = training_args.mm_projector_lr
    model.config.llm2clip_run_dir = model_args.llm2clip_run_dir
    if model_args.tune_mm_mlp_adapter:
        model.requires_grad_(False)
        model.mm_projector.requires_grad_(True)
    model.mm_projector.requires_grad_(not training_args.freeze_mm_mlp_adapter)
    if hasattr(model, "image_newline"):  # trained with the projector, as in LLaVA-NeXT's mm_mlp_adapter
        model.image_newline.requires_grad_(not training_args.freeze_mm_mlp_adapter)
    if model_args.unfreeze_mm_vision_tower:
        model.get_vision_tower().vision_tower.requires_grad_(True)
    if bits in (4, 8):
        _kbit_casts(model, dtype)
    # Every trainable weight (projector, LoRA, LLM, tower) is an fp32 master under autocast; DeepSpeed wants
    # them all in `dtype` and keeps its own fp32 masters.
    master = dtype if training_args.deepspeed else torch.float32
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(master)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, model_max_length=training_args.
                                              model_max_length, padding_side="right",
                                              trust_remote_code=model_args.trust_remote_code)
    if tokenizer.pad_token is None:  # LLaVA uses unk as pad for every template but v0
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return model, tokenizer


def _kbit_casts(model: LlavaForCausalLM, dtype: torch.dtype) -> None:
    """LLaVA's casts after k-bit setup: every '*norm*' module to fp32 (the tower's LayerNorms included:
    the tower copes, see tower.py), frozen embeddings and lm_head to the compute dtype. (LLaVA also casts
    LoRA layers to bf16; here trainable weights follow one rule, see build_model.)"""
    for name, module in model.named_modules():
        if "norm" in name:
            module.to(torch.float32)
        if ("lm_head" in name or "embed_tokens" in name) and hasattr(module, "weight") \
                and module.weight.dtype == torch.float32:
            module.to(dtype)


class LlavaTrainer(transformers.Trainer):
    """HF Trainer with LLaVA's optimizer groups (projector/tower learning rates) and output layouts."""

    def __init__(self, *args, projector_only: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.projector_only = projector_only

    def create_optimizer(self):
        if self.optimizer is not None:
            return self.optimizer
        args, decay = self.args, set(self.get_decay_parameter_names(self.model))
        special = {"mm_projector.": args.mm_projector_lr, "vision_tower.": args.mm_vision_tower_lr}
        groups: dict[tuple, dict] = {}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            lr = next((v for k, v in special.items() if name.startswith(k) and v is not None), args.learning_rate)
            wd = args.weight_decay if name in decay else 0.0
            groups.setdefault((lr, wd), {"params": [], "lr": lr, "weight_decay": wd})["params"].append(p)
        optimizer_cls, optimizer_kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args, self.model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(list(groups.values()), **optimizer_kwargs)
        return self.optimizer

    def _get_train_sampler(self, *args, **kwargs):
        if self.args.train_sampling_strategy == "group_by_length" and not self.args.group_by_modality_length:
            # --group_by_length: HF's sampler would measure each sample by loading it (its image too); the
            # lengths are known
            from transformers.trainer_pt_utils import LengthGroupedSampler

            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=[abs(n) for n in self.train_dataset.modality_lengths])
        if not self.args.group_by_modality_length:
            return super()._get_train_sampler(*args, **kwargs)
        return ModalityGroupedSampler(self.train_dataset.modality_lengths,
                                      self.args.train_batch_size * self.args.world_size, self.args.seed)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        save_llava(self.model, self.processing_class, output_dir or self.args.output_dir,
                   projector_only=self.projector_only, is_main=self.args.should_save, state_dict=state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Our checkpoints hold LLaVA's layout (as save_model writes it), not the Trainer's."""
        restore_trainables(self.model, resume_from_checkpoint)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Every rank joins: gathering ZeRO-3 partitions is collective."""
        if self.is_deepspeed_enabled and self.accelerator.deepspeed_config["zero_optimization"]["stage"] == 3:
            state_dict = self.accelerator.get_state_dict(self.deepspeed)  # full 16-bit weights, rank 0 only
            if self.args.should_save:
                self._save(output_dir, state_dict)
            return
        self._save(output_dir)


class ModalityGroupedSampler(torch.utils.data.Sampler):
    """LLaVA's group_by_modality_length: each batch holds image samples or text-only samples."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        rng = random.Random(self.seed + self.epoch)
        self.epoch += 1
        batches = []
        for keep in (lambda n: n > 0, lambda n: n < 0):
            idx = [i for i, n in enumerate(self.lengths) if keep(n)]
            rng.shuffle(idx)
            batches += [idx[k: k + self.batch_size] for k in range(0, len(idx), self.batch_size)]
        rng.shuffle(batches)
        return iter([i for b in batches for i in b])


def train(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments,
          progress: bool = True) -> dict:
    """Build, train, save. Returns a summary (losses, skips, tokens/s) also written to summary.json."""
    import time

    validate(model_args, data_args, training_args)
    model, tokenizer = build_model(model_args, training_args, data_args)
    tower = model.get_vision_tower()
    dataset = LlavaDataset(data_args, tokenizer, tower.image_processor, model_args.version,
                           training_args.model_max_length, image_token_count(model), progress=progress,
                           grid_pinpoints=getattr(model.config, "image_grid_pinpoints", None)
                           if data_args.image_aspect_ratio == "anyres" else None)
    print(dataset.report(), flush=True)
    trainer = LlavaTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer,
                           data_collator=DataCollator(tokenizer.pad_token_id),
                           projector_only=model_args.tune_mm_mlp_adapter)
    start = time.perf_counter()
    # LLaVA's rule: a run whose output_dir holds checkpoints resumes from them
    resume = training_args.resume_from_checkpoint or resumable_checkpoint(training_args.output_dir)
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - start
    trainer.save_model()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    steps = trainer.state.global_step
    mean_length = sum(min(abs(n), training_args.model_max_length) for n in dataset.modality_lengths) / len(dataset)
    tokens = steps * training_args.train_batch_size * training_args.gradient_accumulation_steps * \
        training_args.world_size * mean_length  # after truncation, padding excluded
    summary = {"steps": steps, "seconds": round(seconds, 1), "train_loss": result.training_loss,
               "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
               "tokens_per_second": round(tokens / seconds, 1), "skipped": dict(dataset.skips.counts),
               "mismatched": dataset.mismatch.mismatched, "truncated": dataset.truncated,
               "truncated_answers": dataset.answers_cut, "answers": dataset.answers,
               "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if training_args.should_save:
        Path(training_args.output_dir, "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        if note := llava_folder_name(training_args.output_dir, training_args.lora_enable):
            print(f"[llava] note: {note} (docs/LLAVA.md, 'Stock LLaVA')", flush=True)
    return summary


def image_token_count(model: LlavaForCausalLM):
    """Rows one image takes in the LM: a number, or (anyres) a function of the image's (height, width)."""
    from functools import partial

    from .anyres import num_image_tokens

    tower = model.get_vision_tower()
    crop = tower.image_processor.crop_size
    if model.is_anyres and (crop["height"], crop["width"]) != (tower.image_size, tower.image_size):
        from llm2clip.errors import ConfigError

        raise ConfigError(f"anyres tiles are the processor's {crop['height']}x{crop['width']} crops but the tower "
                          f"takes {tower.image_size} px; fix the tower folder's preprocessor_config.json")
    pinpoints = getattr(model.config, "image_grid_pinpoints", None) \
        if getattr(model.config, "image_aspect_ratio", None) == "anyres" else None
    count = partial(num_image_tokens, pinpoints=pinpoints, tile=tower.image_size, side=tower.num_patches_per_side,
                    merge_type=model.merge_type)
    if not model.is_anyres:
        return tower.num_patches
    return count if pinpoints else count((tower.image_size, tower.image_size))


def resumable_checkpoint(output_dir: str | Path) -> str | None:
    """The newest complete `checkpoint-N` in output_dir, or None. The Trainer writes trainer_state.json
    last, so a folder without a readable one was cut short by a kill and is passed over."""
    found = []
    for folder in Path(output_dir).glob("checkpoint-*"):
        try:
            json.loads((folder / "trainer_state.json").read_text())
            found.append((int(folder.name.split("-")[1]), folder))
        except (OSError, ValueError, IndexError):
            print(f"[llava] passing over incomplete checkpoint {folder}", flush=True)
    return str(max(found)[1]) if found else None
