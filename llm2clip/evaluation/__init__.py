"""Benchmark evaluation by local path: `llm2clip eval` (docs/EVALUATION.md).

    base            items, EvalSet, the dataset registry (open_dataset)
    wds             CLIP_benchmark webdataset shards, read one sample behind (retrieval and classification)
    retrieval_sets  Flickr30k, COCO (Karpathy, BLIP and COCO-format files), CLIP_benchmark's wds layout
    retrieval_long_multilingual  Urban-1k, DOCCI, ShareGPT4V-1k, DCI, XM3600, Flickr30k-CN, COCO-CN
    classification  ImageNet / ImageFolder / wds zero-shot classification, OpenAI's prompt ensembling
    shapes          the shapes world's caption sets (the main job's)
    models          any model folder as encode_images / encode_texts (LLM vectors cached by fingerprint)
    protocols       streaming retrieval (COCO 1k folds) and classification
    report          CLIP_benchmark records, terminal / markdown / CSV tables
"""

from .base import CLASSIFICATION, RETRIEVAL, EvalSet, open_dataset

__all__ = ["CLASSIFICATION", "RETRIEVAL", "EvalSet", "open_dataset"]
