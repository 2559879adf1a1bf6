"""LLaVA-style MLLM integration for the LLM2CLIP vision tower (issue #5).

Uses only `llm2clip`'s public API and the folders it exports.
"""
