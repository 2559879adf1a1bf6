"""LLM2CLIP: an LLM teaches CLIP's vision encoder.

Pipeline, one module per stage (data flows one way):
data -> stage 1 (caption embedder) -> embedding cache -> stage 2 (CLIP vision) -> eval/export
-> llava_integration. See docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0.dev0"
