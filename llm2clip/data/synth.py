"""Write the shapes world to disk in the formats real users have.

Layout of `out_dir` (every file is a pure function of the config: same seed, same bytes):

    images/{split}/{key}.png        image folder (+ key.txt, key.json: img2dataset's 'files' layout)
    {split}.jsonl, {split}.csv      LLM2CLIP columns (short_caption, long_caption) plus ours
    wds/{split}-{shard:06d}.tar     webdataset shards, img2dataset layout: key.png, key.txt, key.json
    llava/{split}_pretrain.json     LLaVA 'plain' pretraining samples (image + caption)
    llava/{split}_instruct.json     LLaVA instruction data: a Q&A conversation per image, plus separate
                                    detailed-description samples for a share of them (qa.DETAIL_SHARE)
    corpus.txt                      text for pretraining a tiny LM (train captions + world sentences)
    parallel.jsonl                  English/Chinese text pairs {source, target} for stage-1 text pairs
    tokenizer/                      byte-level BPE trained on corpus.txt (HF files)
    stage1_train.jsonl              the train rows whose captions the three files above and stage-1 CC
                                    read: the first `text_images` (all by default)
    manifest.json                   config, counts and splits; its presence marks a finished dataset

The dataset is built in a sibling temporary folder and renamed into place, so a killed run never
leaves a half-written dataset that looks finished.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from ..errors import ConfigError
from .captions import describe
from .lexicon import code_switch, synonym_sentences, synonymize
from .qa import llava_instruct_samples, llava_pretrain_sample, parallel_sentences, world_sentences
from .render import render_scene
from .tokenizer import train_tokenizer
from .world import GRID, sample_scene

SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1
ADDED_KEYS = {"synonyms": 0.0}  # SynthConfig keys newer than format 1, with the default that writes format-1 bytes


@dataclass
class SynthConfig:
    enabled: bool = False  # `llm2clip run` generates the shapes world into <run.out_dir>/data first
    num_images: int = 2000  # total over train/val/test
    seed: int = 0
    image_size: int = 64  # pixels per side; 224 works too
    min_objects: int = 2
    max_objects: int = 6
    num_long_captions: int = 2  # dense paraphrases per image (>= 2)
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    val_images: int | None = None  # a count instead of val_fraction
    test_images: int | None = None  # a count instead of test_fraction (Urban-1k's size: 1000)
    shard_size: int = 500  # samples per webdataset shard
    vocab_size: int = 2048  # BPE vocabulary of the trained tokenizer
    code_switch: float = 0.5  # corpus: share of world words swapped into the other language (0 = off)
    # corpus: share of world words swapped for an English synonym in synonym copies of the train captions,
    # plus two sentences per synonym (0 = off; no caption, CC pair or stage-2 pair ever uses a synonym)
    synonyms: float = 0.0
    # train images whose captions are the LLM's text (corpus, tokenizer, parallel pairs, stage1_train.jsonl);
    # null: all. As in the paper, stage 1 can use fewer captions than stage 2 has images
    text_images: int | None = None

    def validate(self) -> None:
        checks = [
            (self.num_images >= 3, "synth.num_images must be >= 3 (one image per split at least)"),
            (self.image_size >= 16, "synth.image_size must be >= 16 pixels"),
            (1 <= self.min_objects <= self.max_objects <= GRID * GRID,
             f"synth.min_objects/max_objects must satisfy 1 <= min <= max <= {GRID * GRID}"),
            (self.num_long_captions >= 2, "synth.num_long_captions must be >= 2 (paraphrase pairs)"),
            (self.val_fraction > 0 and self.test_fraction > 0 and self.val_fraction + self.test_fraction < 1,
             "synth.val_fraction and synth.test_fraction must be > 0 and sum to < 1"),
            (all(n is None or n >= 1 for n in (self.val_images, self.test_images)),
             "synth.val_images and synth.test_images must be >= 1 (or null: use the fractions)"),
            (self.split_sizes()["train"] >= 1,
             f"synth: val and test take all {self.num_images} images; lower synth.val_images/test_images "
             "or raise synth.num_images"),
            (self.text_images is None or 1 <= self.text_images <= self.split_sizes()["train"],
             f"synth.text_images must be null or between 1 and the {self.split_sizes()['train']} train images"),
            (0 <= self.code_switch <= 1 and 0 <= self.synonyms <= 1,
             "synth.code_switch and synth.synonyms are shares: between 0 and 1"),
            (self.shard_size >= 1, "synth.shard_size must be >= 1"),
            (self.vocab_size >= 300, "synth.vocab_size must be >= 300 (256 bytes + specials + merges)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def split_sizes(self) -> dict[str, int]:
        n_val = self.val_images or max(1, round(self.num_images * self.val_fraction))
        n_test = self.test_images or max(1, round(self.num_images * self.test_fraction))
        return {"train": self.num_images - n_val - n_test, "val": n_val, "test": n_test}


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _long_columns(n: int) -> list[str]:
    return ["long_caption"] + [f"long_caption_{i}" for i in range(2, n + 1)]


def _make_records(cfg: SynthConfig, progress: bool, render: bool = True) -> dict[str, list[dict]]:
    """Sample every scene (train/val/test disjoint), render it (unless `render` is False: rendering
    consumes no randomness, so every text field is the same either way) and write its captions."""
    records: dict[str, list[dict]] = {s: [] for s in SPLITS}
    seen: set[tuple] = set()
    index = 0
    bar = tqdm(total=cfg.num_images, desc="synth", unit="img", disable=not progress)
    for split, size in cfg.split_sizes().items():
        for _ in range(size):
            rng = random.Random(f"{cfg.seed}:{index}")  # str seeds hash with SHA-512: stable across runs
            scene = sample_scene(rng, cfg.min_objects, cfg.max_objects)
            while scene.signature() in seen:  # keeps the splits disjoint
                scene = sample_scene(rng, cfg.min_objects, cfg.max_objects)
            seen.add(scene.signature())
            captions = describe(scene, rng, cfg.num_long_captions)
            key = f"{index:09d}"
            image_rel = f"images/{split}/{key}.png"
            record = {"key": key, "split": split, "image": image_rel,
                      "short_caption": captions["short_caption"],
                      **dict(zip(_long_columns(cfg.num_long_captions), captions["long_captions"], strict=True)),
                      "short_caption_zh": captions["short_caption_zh"],
                      "long_caption_zh": captions["long_caption_zh"],
                      "attributes": scene.to_dict()}
            if render:
                record["_png"] = _png_bytes(render_scene(scene, cfg.image_size))
            record["_pretrain"] = llava_pretrain_sample(key, image_rel, captions["short_caption"], rng)
            record["_instruct"] = llava_instruct_samples(key, image_rel, scene, captions["long_captions"][0], rng)
            records[split].append(record)
            index += 1
            bar.update()
    bar.close()
    return records


def _public(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith("_")}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(_public(r), ensure_ascii=False) + "\n")


def _write_split(root: Path, split: str, rows: list[dict], cfg: SynthConfig) -> None:
    import webdataset as wds

    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    for r in rows:  # image folder in img2dataset's 'files' layout: key.png beside key.txt and key.json
        image = root / r["image"]
        image.write_bytes(r["_png"])
        image.with_suffix(".txt").write_text(r["short_caption"], encoding="utf-8")
        image.with_suffix(".json").write_text(json.dumps(_public(r), ensure_ascii=False), encoding="utf-8")
    _write_jsonl(root / f"{split}.jsonl", rows)
    columns = list(_public(rows[0]))
    with open(root / f"{split}.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({**_public(r), "attributes": json.dumps(r["attributes"], ensure_ascii=False)})
    (root / "wds").mkdir(exist_ok=True)
    pattern = str(root / "wds" / f"{split}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=cfg.shard_size, verbose=0, mtime=0, user="llm2clip",
                         group="llm2clip") as sink:
        for r in rows:
            meta = {**_public(r), "caption": r["short_caption"], "status": "success",
                    "width": cfg.image_size, "height": cfg.image_size}
            sink.write({"__key__": r["key"], "png": r["_png"], "txt": r["short_caption"],
                        "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
    (root / "llava").mkdir(exist_ok=True)
    with open(root / "llava" / f"{split}_pretrain.json", "w", encoding="utf-8") as f:
        json.dump([r["_pretrain"] for r in rows], f, ensure_ascii=False, indent=1)
    _write_instruct(root, split, rows)


def _write_instruct(root: Path, split: str, rows: list[dict]) -> None:
    with open(root / "llava" / f"{split}_instruct.json", "w", encoding="utf-8") as f:
        json.dump([s for r in rows for s in r["_instruct"]], f, ensure_ascii=False, indent=1)


def _corpus_lines(train_rows: list[dict], cfg: SynthConfig) -> list[str]:
    """World sentences, every train caption, code-switched copies (see lexicon.code_switch) and, with
    synth.synonyms, synonym copies (lexicon.synonymize)."""
    rng, synonym_rng = random.Random(f"{cfg.seed}:corpus"), random.Random(f"{cfg.seed}:synonyms")
    lines = list(world_sentences())
    if cfg.synonyms > 0:
        lines += synonym_sentences()
    for r in train_rows:
        lines += [r["short_caption"], *(r[c] for c in _long_columns(cfg.num_long_captions)),
                  r["short_caption_zh"], r["long_caption_zh"],
                  f"English: {r['short_caption']} Chinese: {r['short_caption_zh']}"]
        if cfg.code_switch > 0:
            lines += [code_switch(r["short_caption"], rng, cfg.code_switch),
                      code_switch(r["long_caption"], rng, cfg.code_switch),
                      code_switch(r["short_caption_zh"], rng, cfg.code_switch, to="en"),
                      code_switch(r["long_caption_zh"], rng, cfg.code_switch, to="en")]
        if cfg.synonyms > 0:
            lines += [synonymize(r["short_caption"], synonym_rng, cfg.synonyms),
                      synonymize(r["long_caption"], synonym_rng, cfg.synonyms)]
    return lines


def _parallel_pairs(train_rows: list[dict]) -> list[dict]:
    """English/Chinese text pairs: world sentences plus the train captions (no val/test text)."""
    pairs = [{"source": en, "target": zh} for en, zh in parallel_sentences()]
    for r in train_rows:
        pairs.append({"source": r["short_caption"], "target": r["short_caption_zh"]})
        pairs.append({"source": r["long_caption"], "target": r["long_caption_zh"]})
    return pairs


def rewrite_llava_instruct(out_dir: str | os.PathLike, progress: bool = False) -> dict[str, int]:
    """Rewrite only llava/{split}_instruct.json of a finished dataset, from the config in its manifest
    (no image is rendered, no other file is touched): brings a dataset written before the instruction
    data's current layout up to date. Returns the number of samples per split."""
    out = Path(out_dir)
    manifest = json.loads((out / "manifest.json").read_text())
    cfg = SynthConfig(**manifest["config"])
    records = _make_records(cfg, progress, render=False)
    tmp = out / "llava.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "llava").mkdir(parents=True)
    for split in SPLITS:
        _write_instruct(tmp, split, records[split])
    for split in SPLITS:  # each file is replaced whole (os.replace), never left half-written
        os.replace(tmp / "llava" / f"{split}_instruct.json", out / "llava" / f"{split}_instruct.json")
    shutil.rmtree(tmp)
    return {split: sum(len(r["_instruct"]) for r in records[split]) for split in SPLITS}


def synthesize(cfg: SynthConfig, out_dir: str | os.PathLike, *, overwrite: bool = False,
               progress: bool = True) -> dict:
    """Generate the dataset into `out_dir` and return its manifest. Reuses a finished identical one."""
    cfg.validate()
    out = Path(out_dir)
    manifest_path = out / "manifest.json"
    # what shapes the bytes; a key added after format 1 is recorded only when set, so that a dataset
    # written before it still matches the config that would write it again
    settings = {k: v for k, v in asdict(cfg).items()
                if k != "enabled" and not (k in ADDED_KEYS and v == ADDED_KEYS[k])}
    wanted = {"format_version": FORMAT_VERSION, "config": settings}
    if manifest_path.exists():
        existing = json.loads(manifest_path.read_text())
        if {k: existing.get(k) for k in wanted} == wanted and not overwrite:
            return existing
        if not overwrite:
            raise FileExistsError(f"{out} holds a shapes-world dataset built with other settings; "
                                  f"pass --overwrite (or choose another --out) to replace it")
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not a shapes-world dataset; choose another --out")

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    records = _make_records(cfg, progress)
    for split in SPLITS:
        _write_split(tmp, split, records[split], cfg)
    text_rows = records["train"][:cfg.text_images]  # None: every train row
    _write_jsonl(tmp / "stage1_train.jsonl", text_rows)
    corpus = _corpus_lines(text_rows, cfg)
    (tmp / "corpus.txt").write_text("\n".join(corpus) + "\n", encoding="utf-8")
    with open(tmp / "parallel.jsonl", "w", encoding="utf-8") as f:
        for pair in _parallel_pairs(text_rows):
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")
    train_tokenizer(corpus, tmp / "tokenizer", vocab_size=cfg.vocab_size)
    manifest = {**wanted, "splits": {s: len(records[s]) for s in SPLITS},
                "long_caption_columns": _long_columns(cfg.num_long_captions),
                "corpus_lines": len(corpus)}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return manifest
