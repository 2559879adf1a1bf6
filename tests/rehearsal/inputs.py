"""Real-format inputs for the paper preset at toy size, built in a temp dir (issue #18's rehearsal):

    llama/        LlamaForCausalLM folder + tokenizer (random weights)
    clip/         OpenAI-style CLIPModel folder: vocab.json/merges.txt CLIPTokenizer, legacy eos id 2,
                  logit_scale 4.0, preprocessor_config.json
    cc3m/         img2dataset webdataset shards (KEY.jpg + KEY.json with DreamLIP's shortSV_captions /
                  longSV_captions) + _stats.json
    eval/         a JSONL eval set with an image folder
    coco/         a COCO-style CRA file: {"image": ..., "captions": [...]}
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import torch
from PIL import Image

SIZE = 32  # px; the tiny CLIP's image_size


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's byte -> printable character table (the alphabet of vocab.json)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def openai_clip(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from llm2clip.data.images import make_image_processor

    folder.mkdir(parents=True)
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]  # specials last, as OpenAI's
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    tokenizer.save_pretrained(folder)
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": len(tokens), "max_position_embeddings": 77, "eos_token_id": 2,  # OpenAI's legacy id
            "bos_token_id": len(tokens) - 2, "pad_token_id": 1}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": SIZE, "patch_size": 16}
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16,
                         logit_scale_init_value=4.0)).save_pretrained(folder)
    make_image_processor(SIZE).save_pretrained(folder)
    return folder


def _jpg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, format="JPEG", quality=90)
    return out.getvalue()


def build(root: Path, world: Path) -> dict[str, Path]:
    """Everything under `root`, from the shapes world's images and captions."""
    from tests.helpers import save_tiny_llm

    rows = [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()]
    tests = [json.loads(line) for line in (world / "test.jsonl").read_text().splitlines()]
    data = root / "data"

    def dreamlip(row):
        return {"shortSV_captions": row["short_caption"], "longSV_captions": [row["long_caption"],
                                                                              row["long_caption_2"]]}

    shards = data / "cc3m"
    shards.mkdir(parents=True)
    per_shard = (len(rows) + 1) // 2
    for s in range(2):
        with tarfile.open(shards / f"{s:05d}.tar", "w") as tar:
            for i, row in enumerate(rows[s * per_shard:(s + 1) * per_shard]):
                key = f"{s:05d}{i:04d}"
                for name, payload in ((f"{key}.jpg", _jpg(Image.open(world / row["image"]))),
                                      (f"{key}.json", json.dumps({"key": key, "status": "success", **dreamlip(row)})
                                       .encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        (shards / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
    (data / "eval/images").mkdir(parents=True)
    with open(data / "eval/sharegpt4v_1k.jsonl", "w") as f:
        for row in tests:
            name = f"images/eval-{row['key']}.jpg"
            (data / "eval" / name).write_bytes(_jpg(Image.open(world / row["image"])))
            f.write(json.dumps({"key": f"eval-{row['key']}", "image": name, **dreamlip(row)}) + "\n")
    (data / "coco").mkdir()
    with open(data / "coco/val_captions.jsonl", "w") as f:
        for row in tests:
            f.write(json.dumps({"image": f"val2014/{row['key']}.jpg", "captions": [
                row["long_caption"], row["long_caption_2"], row["short_caption"]]}) + "\n")
    llama = save_tiny_llm(root / "llama", world / "tokenizer", hidden_size=32, num_layers=1, causal_lm=True)
    return {"data_root": data, "llama": llama, "clip": openai_clip(root / "clip")}
