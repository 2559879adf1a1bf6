"""Conversation templates and target masking: LLaVA's `plain` (pretraining) and `v1` (instruction tuning).

    plain:  "<image>" + caption + "\n"                   (the first turn is replaced by the image alone)
    v1:     system + " " + "USER: <q1> ASSISTANT: <a1></s>USER: <q2> ASSISTANT: <a2></s>..."

`tokenize_conversation` returns input_ids with IMAGE_TOKEN_INDEX where "<image>" stood (LLaVA's
`tokenizer_image_token`) and labels where only the assistant's answers (plus their "</s>" in v1) are
supervised. Targets come from character offsets of the one joint tokenization, so the labels match the
tokens the model sees. A token that straddles an answer boundary means the template and tokenizer
disagree (LLaVA's "tokenization mismatch", #1166): LLaVA then silently masks the whole sample, making
its loss 0; we mask it too but report it, and `MismatchCounter` turns too many into an error.
"""

from __future__ import annotations

from dataclasses import dataclass

from llm2clip.errors import DataError

from .constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX

V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
             "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@dataclass(frozen=True)
class Template:
    name: str
    system: str = ""
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "</s>"


TEMPLATES = {
    "plain": Template("plain", sep="\n", sep2=""),
    "v1": Template("v1", system=V1_SYSTEM),
}
ALIASES = {"vicuna_v1": "v1", "llava_v1": "v1"}


def get_template(version: str) -> Template:
    """LLaVA selects preprocess_v1 for any version starting with 'v1'; others must be named exactly."""
    name = ALIASES.get(version, "v1" if version.startswith("v1") else version)
    if name not in TEMPLATES:
        raise DataError(f"unknown conversation --version '{version}'; use 'plain' (pretraining) or 'v1'")
    return TEMPLATES[name]


def validate_conversation(sample: dict, has_image: bool, template: Template) -> None:
    """Raise DataError naming the sample and the fix for the mistakes LLaVA only trips over later."""
    sid = sample.get("id", "?")
    turns = sample.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"sample {sid}: 'conversations' must be a non-empty list of {{'from', 'value'}} turns")
    for i, turn in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != expected or not isinstance(turn.get("value"), str):
            got = turn.get("from") if isinstance(turn, dict) else type(turn).__name__
            raise DataError(f"sample {sid}: turn {i} must come from '{expected}' (got '{got}'); conversations "
                            "alternate human, gpt, human, gpt ... and start with human")
    if len(turns) % 2:
        raise DataError(f"sample {sid}: the last turn is from 'human' with no 'gpt' answer; drop it")
    n_images = sum(t["value"].count(DEFAULT_IMAGE_TOKEN) for t in turns)
    if has_image and (n_images != 1 or DEFAULT_IMAGE_TOKEN not in turns[0]["value"]):
        raise DataError(f"sample {sid} has an image but {n_images} '<image>' tokens; put exactly one "
                        "'<image>' in the first human turn")
    if not has_image and n_images:
        raise DataError(f"sample {sid} has '<image>' in its text but no 'image' key; add the image or remove "
                        "the token")
    if template.name == "plain" and len(turns) != 2:
        raise DataError(f"sample {sid}: the 'plain' template takes exactly 2 turns (image, caption), got "
                        f"{len(turns)}; use --version v1 for multi-turn data")


def _move_image_first(text: str) -> str:
    """LLaVA's preprocess_multimodal: the image goes first, then a newline, then the question."""
    if DEFAULT_IMAGE_TOKEN not in text:
        return text
    rest = text.replace(DEFAULT_IMAGE_TOKEN, "").strip()
    return f"{DEFAULT_IMAGE_TOKEN}\n{rest}"


def render(turns: list[dict], template: Template) -> tuple[str, list[tuple[int, int]]]:
    """The prompt text and the character spans of the supervised answers."""
    if template.name == "plain":  # image, then the caption as the single target
        caption = turns[1]["value"] + template.sep
        has_image = DEFAULT_IMAGE_TOKEN in turns[0]["value"]
        head = DEFAULT_IMAGE_TOKEN if has_image else ""
        return head + caption, [(len(head), len(head) + len(caption))]
    text = template.system + template.sep if template.system else ""
    spans = []
    for i, turn in enumerate(turns):
        if i % 2 == 0:
            text += f"{template.roles[0]}: {_move_image_first(turn['value'])}{template.sep}"
            text += f"{template.roles[1]}:"
        else:
            start = len(text)  # the answer's leading space belongs to the target, as in LLaVA
            text += f" {turn['value']}{template.sep2}"
            spans.append((start, len(text)))
    return text, spans


def generation_prompt(question: str, template: Template, with_image: bool = True) -> str:
    """A one-turn prompt that ends where the assistant's answer begins."""
    question = f"{DEFAULT_IMAGE_TOKEN}\n{question}" if with_image else question
    if template.name == "plain":
        return DEFAULT_IMAGE_TOKEN if with_image else ""
    system = template.system + template.sep if template.system else ""
    return f"{system}{template.roles[0]}: {question}{template.sep}{template.roles[1]}:"


def tokenize_prompt(text: str, tokenizer) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets; each "<image>" becomes IMAGE_TOKEN_INDEX with an empty span.
    Text between images is tokenized in chunks, like LLaVA's tokenizer_image_token."""
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    if tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        offsets.append((0, 0))
    position = 0
    for k, chunk in enumerate(text.split(DEFAULT_IMAGE_TOKEN)):
        if k:
            ids.append(IMAGE_TOKEN_INDEX)
            offsets.append((position, position))
            position += len(DEFAULT_IMAGE_TOKEN)
        if chunk:
            enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
            ids.extend(enc["input_ids"])
            offsets.extend((position + a, position + b) for a, b in enc["offset_mapping"])
        position += len(chunk)
    return ids, offsets


def _content(text: str, start: int, end: int) -> tuple[int, int]:
    """A token's span without surrounding whitespace (byte-level BPE puts the space inside the token)."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def tokenize_conversation(turns: list[dict], tokenizer, template: Template) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, mismatch). On mismatch every label is IGNORE_INDEX, as in LLaVA."""
    text, spans = render(turns, template)
    ids, offsets = tokenize_prompt(text, tokenizer)
    labels = [IGNORE_INDEX] * len(ids)
    mismatch = False
    for i, (token_id, (a, b)) in enumerate(zip(ids, offsets, strict=True)):
        if token_id == IMAGE_TOKEN_INDEX or a == b:
            continue
        a, b = _content(text, a, b)
        if a == b:  # pure whitespace: supervised when inside an answer
            inside = any(s <= offsets[i][0] and offsets[i][1] <= e for s, e in spans)
        else:
            inside = any(s <= a and b <= e for s, e in spans)
            straddles = any(a < s < b or a < e < b for s, e in spans)
            mismatch |= straddles
        if inside:
            labels[i] = token_id
    if mismatch or all(x == IGNORE_INDEX for x in labels):
        return ids, [IGNORE_INDEX] * len(ids), True
    return ids, labels, False


class MismatchCounter:
    """Counts masked samples; raises once their share passes `max_fraction` (after `min_samples`)."""

    def __init__(self, max_fraction: float = 0.05, min_samples: int = 20):
        self.max_fraction, self.min_samples = max_fraction, min_samples
        self.seen = self.mismatched = 0
        self.examples: list[str] = []

    def update(self, sample_id: str, mismatch: bool) -> None:
        self.seen += 1
        if mismatch:
            self.mismatched += 1
            if len(self.examples) < 5:
                self.examples.append(str(sample_id))
        if self.seen >= self.min_samples and self.mismatched > self.max_fraction * self.seen:
            raise DataError(f"tokenization mismatch in {self.mismatched}/{self.seen} samples (e.g. ids "
                            f"{self.examples}): their targets cannot be aligned, so LLaVA would train them with "
                            "loss 0. Check --version matches the LLM's chat format and the tokenizer; raise "
                            "--max_mismatch_fraction only if a few bad samples are expected")

    def report(self) -> str:
        return f"tokenization mismatch: {self.mismatched}/{self.seen} samples masked"

