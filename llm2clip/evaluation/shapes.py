"""`shapes`: the shapes world's own caption sets, as the main job scores them (llm2clip.stage2.evaluate):

    shapes/short             the short caption, one per image
    shapes/long              every long paraphrase (several per image)
    shapes/second_language   the second-language captions (short and long), language 'zh'

Root: the world's data folder (`llm2clip data synth --out DIR`), read with the project's own reader.
"""

from __future__ import annotations

from pathlib import Path

from ..data.readers import CaptionReader, DataConfig, caption_fields
from ..errors import ConfigError
from .base import RETRIEVAL, EvalSet, RetrievalItem, register

SETS = {"short": ("en", ["short_caption"]), "long": ("en", ["long_caption", "long_caption_2"]),
        "second_language": ("zh", ["short_caption_zh", "long_caption_zh"])}


@register("shapes")
def open_shapes(root: Path, strict: bool, name: str, split: str = "test", **_) -> list[EvalSet]:
    path = root / f"{split}.jsonl"
    if not path.is_file():
        raise ConfigError(f"shapes: no {path}. Fix: point --data-root at a folder made by `llm2clip data synth`")
    cfg = DataConfig(path=str(path), strict=strict)
    sets = []
    for set_name, (language, fields) in SETS.items():
        evalset = EvalSet(f"shapes/{set_name}", RETRIEVAL, lambda: iter(()), language=language)

        def items(evalset=evalset, fields=fields):
            reader = CaptionReader(cfg, decode_images=False)
            evalset.stats = reader.stats  # the reader's counts are this set's
            for sample in reader:
                captions = caption_fields(sample, cfg, tuple(f for f in fields if f.endswith("_zh")))
                texts = [captions[f] for f in fields if f in captions]
                if texts:
                    yield RetrievalItem(sample.key, sample.image, texts)

        evalset.items = items
        sets.append(evalset)
    return sets
