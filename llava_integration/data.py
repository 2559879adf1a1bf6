"""LLaVA's data format: a JSON list of {"id", "image"?, "conversations"} with images under --image_folder.

Every sample is validated and tokenized once, before training starts, so bad data is reported up front:
a missing image, a conversation without "<image>" for an image sample, a wrong role order or an
over-long conversation is skipped and counted (or raises DataError under --strict), and tokenization
mismatches are counted with an error past --max_mismatch_fraction. Text-only samples (no "image" key)
get a zero image, as in LLaVA, and a negative modality length.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from llm2clip.data.images import ImageSkip, load_image
from llm2clip.data.readers import SkipCounter
from llm2clip.errors import DataError

from .anyres import process_anyres_image
from .constants import IGNORE_INDEX
from .conversation import MismatchCounter, get_template, tokenize_conversation, validate_conversation


@dataclass
class DataArguments:
    data_path: str | None = None  # LLaVA JSON list (the tiny preset fills it in)
    image_folder: str | None = None  # image paths in the JSON are relative to it
    lazy_preprocess: bool = True  # accepted for LLaVA compatibility; we always tokenize up front
    image_aspect_ratio: str = "square"  # 'square' (processor's crop), 'pad' (expand2square) or 'anyres' (NeXT)
    image_grid_pinpoints: str | None = None  # anyres grids, [h, w]: "[[336, 672], [672, 336]]" or "(1x1),...,(3x3)"
    strict: bool = False  # raise on the first bad sample instead of skipping and counting it
    max_mismatch_fraction: float = 0.05  # error when more samples than this fail target alignment
    max_samples: int | None = None  # use the first N samples (quick runs)


def expand2square(image, background: tuple[int, ...]):
    """LLaVA's 'pad' aspect ratio: paste the image centred on a square filled with the mean colour."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def answer_runs(labels: list[int]) -> list[tuple[int, int]]:
    """(first, last) token index of each supervised answer: the runs of labels that are not IGNORE_INDEX
    (answers are separated by the next question's masked tokens)."""
    runs: list[tuple[int, int]] = []
    start = None
    for i, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, i - 1))
            start = None
    return runs


class LlavaDataset(Dataset):
    def __init__(self, args: DataArguments, tokenizer, image_processor, version: str, model_max_length: int,
                 num_image_tokens: int | Callable[[tuple[int, int]], int], progress: bool = True,
                 grid_pinpoints: list[list[int]] | None = None):
        """num_image_tokens: per image, or a function of its (height, width) (anyres); grid_pinpoints: the
        parsed [h, w] grids under --image_aspect_ratio anyres."""
        if not args.data_path or not Path(args.data_path).is_file():
            raise DataError(f"--data_path: {args.data_path} does not exist; point it at a LLaVA JSON list")
        self.args, self.image_processor, self.grid_pinpoints = args, image_processor, grid_pinpoints
        self.template = get_template(version)
        self.folder = Path(args.image_folder or Path(args.data_path).parent)
        try:
            raw = json.loads(Path(args.data_path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:  # the whole file is unreadable: nothing to skip
            raise DataError(f"{args.data_path} is not a valid UTF-8 JSON file ({type(e).__name__}: "
                            f"{str(e).splitlines()[0]}). Fix: repair or regenerate it") from None
        if not isinstance(raw, list):
            raise DataError(f"{args.data_path} must hold a JSON list of samples, got {type(raw).__name__}")
        raw = raw[: args.max_samples] if args.max_samples else raw
        self.skips = SkipCounter()
        self.mismatch = MismatchCounter(args.max_mismatch_fraction)
        self.truncated = 0  # samples longer than model_max_length
        self.answers = self.answers_cut = 0  # answer (gpt) turns; those that lose tokens to truncation
        self.samples: list[dict] = []
        for index, sample in enumerate(tqdm(raw, desc="tokenize", unit="sample", disable=not progress)):
            self.skips.read += 1
            try:
                item = self._prepare(sample, index, tokenizer, model_max_length, num_image_tokens)
            except DataError as e:
                if args.strict:
                    raise DataError(f"{args.data_path}: {e}. Fix the sample, or drop --strict to skip and count "
                                    "it") from None
                self.skips.skip(e.args[0].split(":")[0] if ":" in e.args[0] else "bad sample", str(index))
                continue
            if item is not None:
                self.samples.append(item)
        if not self.samples:
            raise DataError(f"no usable samples in {args.data_path} ({self.skips.brief()}). Fix: point --data_path "
                            "at a LLaVA JSON list of samples (see docs/LLAVA.md)")

    def _prepare(self, sample: dict, index: int, tokenizer, max_length: int, image_tokens: int) -> dict | None:
        if not isinstance(sample, dict):
            raise DataError(f"bad sample: entry {index} is a {type(sample).__name__}, not an object")
        sid = str(sample.get("id", index))
        image = sample.get("image")
        try:
            validate_conversation(sample, image is not None, self.template)
        except DataError as e:
            raise DataError(f"bad conversation: {e}") from None
        if image is not None and not (self.folder / image).is_file():
            raise DataError(f"missing image: sample {sid}: {self.folder / image} does not exist; fix "
                            "--image_folder or drop the sample")
        if image is not None and callable(image_tokens):
            image_tokens = image_tokens(self._size_hw(self.folder / image))
        ids, labels, mismatch = tokenize_conversation(sample["conversations"], tokenizer, self.template)
        self.mismatch.update(sid, mismatch)
        shift = image_tokens - 1 if image is not None else 0  # the image token becomes image_tokens rows
        length = len(ids) + shift  # after splicing the image in
        runs = answer_runs(labels)
        if length > max_length:
            kept = max_length - shift
            if all(x == IGNORE_INDEX for x in labels[:kept]) and not mismatch:
                raise DataError(f"over-long conversation: sample {sid} needs {length} tokens but "
                                f"model_max_length={max_length} cuts every answer; raise --model_max_length "
                                "or split the conversation")
            self.truncated += 1
            self.answers_cut += sum(end + shift >= max_length for _, end in runs)
        self.answers += len(runs)
        return {"id": sid, "image": image, "input_ids": ids, "labels": labels, "length": length}

    @staticmethod
    def _size_hw(path: Path) -> tuple[int, int]:
        from PIL import Image

        try:
            with Image.open(path) as im:  # the header only
                return im.height, im.width
        except (OSError, ValueError, SyntaxError) as e:
            raise DataError(f"unreadable image: {path}: {type(e).__name__}") from None

    def report(self) -> str:
        lines = [self.skips.summary(), self.mismatch.report()]
        if self.truncated:
            lines.append(f"{self.truncated} samples truncated to model_max_length: {self.answers_cut} of "
                         f"{self.answers} answer turns lose tokens")
        return "\n".join(lines)

    @property
    def modality_lengths(self) -> list[int]:
        """LLaVA's convention: positive for image samples, negative for text-only ones."""
        return [s["length"] if s["image"] is not None else -s["length"] for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def _pixels(self, image: str | None) -> tuple[torch.Tensor, tuple[int, int]] | None:
        """[3, S, S] (or anyres [1 + tiles, 3, S, S]) and the image's (width, height)."""
        crop = self.image_processor.crop_size
        if image is None:  # anyres keeps LLaVA-NeXT's one-crop placeholder
            shape = (1, 3) if self.grid_pinpoints else (3,)
            return torch.zeros(*shape, crop["height"], crop["width"]), (crop["width"], crop["height"])
        try:
            pil = load_image(self.folder / image, max_pixels=1 << 26)
        except ImageSkip as e:
            if self.args.strict:
                raise DataError(f"{e.reason}: {self.folder / image}: {e.detail}") from None
            self.skips.skip(e.reason, image)
            return None
        if self.grid_pinpoints:
            return process_anyres_image(pil, self.image_processor, self.grid_pinpoints), pil.size
        if self.args.image_aspect_ratio == "pad":
            pil = expand2square(pil, tuple(int(255 * m) for m in self.image_processor.image_mean))
        return self.image_processor(pil, return_tensors="pt")["pixel_values"][0], pil.size  # [3, H, W]

    def __getitem__(self, i: int) -> dict | None:
        s = self.samples[i]
        loaded = self._pixels(s["image"])
        if loaded is None:
            return None  # an image that broke after validation: the collator drops it and it is counted
        return {"input_ids": torch.tensor(s["input_ids"]), "labels": torch.tensor(s["labels"]), "image": loaded[0],
                "image_size": loaded[1], "has_image": s["image"] is not None}


@dataclass
class DataCollator:
    """Right-pads a batch; IMAGE_TOKEN_INDEX stays in input_ids for the model to splice."""

    pad_token_id: int

    def __call__(self, batch: list[dict | None]) -> dict:
        batch = [b for b in batch if b is not None]
        if not batch:
            raise DataError("a whole batch of images failed to load; see the skip summary")
        ids = torch.nn.utils.rnn.pad_sequence([b["input_ids"] for b in batch], batch_first=True,
                                              padding_value=self.pad_token_id)
        labels = torch.nn.utils.rnn.pad_sequence([b["labels"] for b in batch], batch_first=True,
                                                 padding_value=IGNORE_INDEX)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(b["input_ids"]), dtype=torch.long) for b in batch],
                                               batch_first=True, padding_value=0)
        out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if batch[0]["image"].ndim == 4:  # anyres: tile counts differ per image, so a list (as LLaVA-NeXT)
            out["images"] = [b["image"] for b in batch]
            out["image_sizes"] = torch.tensor([b["image_size"] for b in batch])  # [B, 2] (width, height)
        else:
            out["images"] = torch.stack([b["image"] for b in batch])
        return out

