"""Stage 2: CLIP vision training against the frozen LLM (cached embeddings), the CLIP baseline, and
retrieval evaluation."""
