"""Stage 1: turn a decoder LLM into a caption embedder (LM pretraining for the tiny world, MNTP,
caption-contrastive LoRA/QLoRA fine-tuning, CRA evaluation, merging)."""
