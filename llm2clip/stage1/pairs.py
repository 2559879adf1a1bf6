"""Training pairs for caption-contrastive fine-tuning, as LLM2CLIP builds them.

A pair is (query, positive, hard negative, query instruction). Captions of one image are positives;
the hard negative is the same kind of caption as the positive, from a random other image (or, with
`neighbour_batches`, every row and negative from one neighbourhood of similar scenes). Each batch
holds one kind of pair (llm2vec and LLM2CLIP batch per task). Within a short<->long batch the official
CC3M task draws the direction per row (`mixed_directions`), so a batch holds short->long and
long->short queries, each with its own instruction, and long and short candidates.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import instructions
from ..data.readers import CaptionReader, DataConfig
from ..errors import ConfigError

# The query carries a direction-specific instruction; positives and negatives are encoded as any
# caption is at embedding time (the embedder's default instruction).
INSTRUCTIONS = {
    "short_to_long": instructions.SHORT_TO_LONG,
    "long_to_short": instructions.LONG_TO_SHORT,
    "long_to_long": instructions.LONG_TO_LONG,
    "translation": instructions.TRANSLATION,
}


@dataclass
class Pair:
    query: str
    positive: str
    negative: str
    instruction: str | None  # the query's; None: as a document (the embedder's caption instruction)
    kind: str = "caption"  # "translation" for text pairs


@dataclass
class CaptionGroup:
    short: str
    longs: list[str]


def read_caption_groups(path: str, data_cfg: DataConfig | None = None, key: str = "stage1.cc.data"
                        ) -> list[CaptionGroup]:
    """Short and long captions per image, from any format the readers support (images not opened)."""
    base = data_cfg or DataConfig()
    cfg = DataConfig(**{**base.__dict__, "path": path, "format": "auto"})
    reader = CaptionReader(cfg, load_images=False, key=key)
    groups = [CaptionGroup(s.short_caption, s.long_captions) for s in reader
              if s.short_caption and s.long_captions]
    if len(groups) < 2:
        raise ConfigError(f"{path}: need at least 2 samples with a short and a long caption, found {len(groups)} "
                          f"({reader.stats.summary()})")
    return groups


def read_text_pairs(path: str) -> list[tuple[str, str]]:
    """JSONL lines {"source": ..., "target": ...} (e.g. English and its translation)."""
    pairs = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
            pairs.append((str(row["source"]).strip(), str(row["target"]).strip()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"{path}:{lineno}: expected a JSON object with 'source' and 'target' ({e})") from None
    return [p for p in pairs if p[0] and p[1]]


class PairSampler:
    """Draws homogeneous batches of `Pair`s. `kinds` weights which kind each batch is."""

    def __init__(self, groups: list[CaptionGroup], text_pairs: list[tuple[str, str]], *, long_long_fraction: float,
                 translation_fraction: float, seed: int, task_seed: int | None = None, text_pair_buckets: int = 4,
                 mixed_directions: bool = True, mixed_from_batch: int = 0, short_long_from_batch: int | None = None,
                 translation_instruction: str | None = INSTRUCTIONS["translation"], neighbour_batches: int = 0):
        """`seed` draws the samples (the same on every rank: each trains on its slice of a global batch);
        `task_seed` draws each batch's kind and direction and must be equal on every rank, because
        negatives are gathered across ranks. `long_long_fraction`: share of caption batches pairing two
        long paraphrases (the rest pair short with long). `mixed_directions`: each row draws its own
        direction (LLM2CLIP's E5_cc3m.py) from batch `mixed_from_batch` on; before it, and without it,
        one direction per batch. From batch `short_long_from_batch` on, caption batches pair short with
        long only (text pairs keep their share). `translation_instruction`: the text-pair queries'
        instruction; None embeds them as documents, like their positives. `neighbour_batches` > 0: each
        caption batch is an anchor image and scenes among its `neighbour_batches` nearest (TF-IDF over
        its captions), with distinct short captions, and each hard negative comes from the batch: a batch
        of random scenes is told apart by coarse features alone (background, object count)."""
        self.groups = groups
        self.mixed_directions, self.mixed_from_batch, self.batches_drawn = mixed_directions, mixed_from_batch, 0
        self.short_long_from_batch = short_long_from_batch
        self.translation_instruction = translation_instruction
        self.rng = random.Random(seed)
        self.task_rng = random.Random(seed if task_seed is None else task_seed)
        # Text pairs come in length buckets, one bucket per batch: a batch mixing words and paragraphs
        # is solved by matching lengths, which teaches nothing about meaning.
        by_length = sorted(text_pairs, key=lambda p: len(p[0]))
        n = max(1, min(text_pair_buckets, len(by_length) // 2))
        self.text_buckets = [by_length[i * len(by_length) // n:(i + 1) * len(by_length) // n] for i in range(n)]
        caption_share = 1.0 - (translation_fraction if text_pairs else 0.0)
        self.kinds = {"short_long": caption_share * (1.0 - long_long_fraction),
                      "long_long": caption_share * long_long_fraction,
                      "translation": 1.0 - caption_share}
        if long_long_fraction > 0 and not any(len(g.longs) >= 2 for g in groups):
            raise ConfigError("long_long pairs need >= 2 long captions per image (data.long_caption_keys)")
        self.neighbours = caption_neighbours(groups, neighbour_batches) if neighbour_batches else None
        self._usable = {"short_long": list(range(len(groups))),
                        "long_long": [i for i, g in enumerate(groups) if len(g.longs) >= 2]}
        self._distinct_shorts = {kind: len({groups[i].short for i in idx}) for kind, idx in self._usable.items()}

    def state(self) -> dict:
        """Both RNG states as JSON-able lists (a resumed run draws the batches it would have drawn)."""
        return {"rng": _json_state(self.rng.getstate()), "task_rng": _json_state(self.task_rng.getstate()),
                "batches_drawn": self.batches_drawn}

    def set_state(self, state: dict) -> None:
        self.rng.setstate(_tuple_state(state["rng"]))
        self.task_rng.setstate(_tuple_state(state["task_rng"]))
        self.batches_drawn = state.get("batches_drawn", 0)

    def _other(self, n: int, i: int) -> int:
        j = self.rng.randrange(n - 1)
        return j + (j >= i)

    def batch(self, size: int) -> list[Pair]:
        """One kind per batch. The direction is drawn per row with `mixed_directions`, else once per
        batch (every query then shares its instruction and the candidates are all of one kind)."""
        kinds = self.kinds
        if self.short_long_from_batch is not None and self.batches_drawn >= self.short_long_from_batch:
            kinds = {**kinds, "short_long": kinds["short_long"] + kinds["long_long"], "long_long": 0.0}
        kind = self.task_rng.choices(list(kinds), weights=list(kinds.values()))[0]
        forward = self.task_rng.random() < 0.5
        mixed = self.mixed_directions and self.batches_drawn >= self.mixed_from_batch
        self.batches_drawn += 1
        # per-row directions come from the task stream too: every rank must see the same global batch
        directions = [self.task_rng.random() < 0.5 if mixed else forward for _ in range(size)]
        if kind == "translation":
            bucket = self.task_rng.choice(self.text_buckets)
            return [self._translation(d, bucket) for d in directions]
        if self.neighbours is not None:
            return self._neighbour_batch(kind, directions)
        return [getattr(self, f"_{kind}")(d) for d in directions]

    def _neighbour_batch(self, kind: str, directions: list[bool]) -> list[Pair]:
        """Rows from one neighbourhood of similar scenes; each row's negative is the next row's image."""
        usable = self._usable[kind]
        anchor = usable[self.rng.randrange(len(usable))]
        near = [int(j) for j in self.neighbours[anchor] if kind == "short_long" or len(self.groups[j].longs) >= 2]
        self.rng.shuffle(near)
        if self._distinct_shorts[kind] < len(directions):
            raise ConfigError(f"neighbour batches of {len(directions)} need as many images with distinct short "
                              "captions; lower stage1.cc.batch_size or set stage1.cc.neighbour_batches: 0")
        picked, shorts = [anchor], {self.groups[anchor].short}
        for j in near:
            if len(picked) == len(directions):
                break
            if self.groups[j].short not in shorts:  # an equal short caption would be a false negative
                picked.append(j)
                shorts.add(self.groups[j].short)
        while len(picked) < len(directions):  # a sparse neighbourhood: fill with random scenes
            j = usable[self.rng.randrange(len(usable))]
            if self.groups[j].short not in shorts:
                picked.append(j)
                shorts.add(self.groups[j].short)
        pairs = []
        for row, (i, forward) in enumerate(zip(picked, directions, strict=True)):
            g, other = self.groups[i], self.groups[picked[(row + 1) % len(picked)]]
            if kind == "long_long":
                a, b = self.rng.sample(g.longs, 2)
                pairs.append(Pair(a, b, self.rng.choice(other.longs), INSTRUCTIONS["long_to_long"]))
            elif forward:
                pairs.append(Pair(g.short, self.rng.choice(g.longs), self.rng.choice(other.longs),
                                  INSTRUCTIONS["short_to_long"]))
            else:
                pairs.append(Pair(self.rng.choice(g.longs), g.short, other.short, INSTRUCTIONS["long_to_short"]))
        return pairs

    def _short_long(self, forward: bool) -> Pair:
        i = self.rng.randrange(len(self.groups))
        g, other = self.groups[i], self.groups[self._other(len(self.groups), i)]
        if forward:
            return Pair(g.short, self.rng.choice(g.longs), self.rng.choice(other.longs), INSTRUCTIONS["short_to_long"])
        return Pair(self.rng.choice(g.longs), g.short, other.short, INSTRUCTIONS["long_to_short"])

    def _long_long(self, forward: bool) -> Pair:
        multi = [g for g in self.groups if len(g.longs) >= 2]
        i = self.rng.randrange(len(multi))
        a, b = self.rng.sample(multi[i].longs, 2)
        return Pair(a, b, self.rng.choice(multi[self._other(len(multi), i)].longs), INSTRUCTIONS["long_to_long"])

    def _translation(self, forward: bool, bucket: list[tuple[str, str]]) -> Pair:
        i = self.rng.randrange(len(bucket))
        src, tgt = bucket[i]
        neg_src, neg_tgt = bucket[self._other(len(bucket), i)]
        if forward:
            return Pair(src, tgt, neg_tgt, self.translation_instruction, "translation")
        return Pair(tgt, src, neg_src, self.translation_instruction, "translation")


def caption_neighbours(groups: list[CaptionGroup], k: int) -> np.ndarray:
    """[N, k] indices of each image's k most similar other images: cosine of TF-IDF (words and word pairs)
    over all its captions, computed in row blocks (memory O(block x N), time O(N^2): mine offline for
    millions of captions)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    if len(groups) < 2:
        raise ConfigError("neighbour batches need at least 2 images")
    k = min(k, len(groups) - 1)
    docs = [" ".join([g.short, *g.longs]) for g in groups]
    x = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2).fit_transform(docs)  # [N, V], rows L2
    out = np.empty((len(groups), k), dtype=np.int64)
    for lo in range(0, len(groups), 1024):
        sim = (x[lo:lo + 1024] @ x.T).toarray()  # [block, N]
        sim[np.arange(len(sim)), np.arange(lo, lo + len(sim))] = -1.0  # not itself
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        out[lo:lo + len(sim)] = top
    return out


def _json_state(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _tuple_state(state: list) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss
