"""Run under an older transformers (tests/compat/side_env.py): load each folder the way other repos do.

    python load_folders.py MANIFEST.json OUT_DIR

For each manifest entry it loads the folder with the stock class (CLIPVisionModel, SiglipVisionModel,
CLIPModel, LlavaForConditionalGeneration; LLM2CLIP folders through llm2clip.model, which must work under
4.x too), records the loading report, runs the inputs through it, and saves the outputs to
OUT_DIR/<name>.safetensors. The last stdout line is a JSON summary.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file

VISION_CLASSES = {"clip_vision_model": "CLIPVisionModel", "siglip_vision_model": "SiglipVisionModel"}


def _report(info) -> dict:
    return {k: sorted(info.get(k, [])) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}


def _image_processor_pixels(path: Path, image: Image.Image) -> torch.Tensor:
    processor = transformers.AutoImageProcessor.from_pretrained(str(path))
    return torch.as_tensor(np.asarray(processor(images=image, return_tensors="np")["pixel_values"]))


def _tokens(path: Path, text: str) -> torch.Tensor:
    return torch.tensor(transformers.AutoTokenizer.from_pretrained(str(path))(text)["input_ids"])


def load_entry(entry: dict, inputs: dict, image: Image.Image) -> tuple[dict, dict]:
    path, kind = Path(entry["path"]), entry["kind"]
    out, report = {}, {}
    with torch.no_grad():
        if kind == "vision":
            config = json.loads((path / "config.json").read_text())
            cls = getattr(transformers, VISION_CLASSES[config["model_type"]])
            model, info = cls.from_pretrained(str(path), output_loading_info=True)
            hidden = model.eval()(pixel_values=inputs["pixels"], output_hidden_states=True)
            out = {"last_hidden_state": hidden.last_hidden_state, "penultimate": hidden.hidden_states[-2],
                   "pooler_output": hidden.pooler_output, "processed": _image_processor_pixels(path, image)}
            report = _report(info)
        elif kind == "clip":
            model, info = transformers.CLIPModel.from_pretrained(str(path), output_loading_info=True)
            model.eval()
            features = (model.get_image_features(pixel_values=inputs["pixels"]),
                        model.get_text_features(input_ids=inputs["clip_ids"]))
            # 5.x may return an output object where 4.x returns the tensor
            image_f, text_f = (getattr(f, "pooler_output", f) for f in features)
            out = {"image": image_f, "text": text_f,
                   "tokens": _tokens(path, entry["text"]), "processed": _image_processor_pixels(path, image)}
            report = _report(info)
        elif kind == "llm2clip":
            from llm2clip.model import LLM2CLIP  # our own loader, under this transformers

            model = LLM2CLIP.from_pretrained(path)  # strict load_state_dict: any missing key raises
            out = {"image": model.encode_image(inputs["pixels"]), "text": model.encode_text(inputs["vectors"])}
            report = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
        elif kind == "llava_hf":
            model, info = transformers.LlavaForConditionalGeneration.from_pretrained(
                str(path), output_loading_info=True)
            legacy = tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (4, 44)
            # before 4.44 the model expanded one <image> token itself; later ones take one per feature row
            ids = inputs["llava_ids_single" if legacy else "llava_ids"]
            logits = model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  pixel_values=inputs["pixels"][:1]).logits
            out = {"logits": logits, "tokens": _tokens(path, entry["text"]),
                   "processed": _image_processor_pixels(path, image)}
            report = _report(info)
        elif kind == "llava_next_hf":
            model, info = transformers.LlavaNextForConditionalGeneration.from_pretrained(
                str(path), output_loading_info=True)
            logits = model.eval()(input_ids=inputs["next_ids"], attention_mask=torch.ones_like(inputs["next_ids"]),
                                  pixel_values=inputs["next_pixels"], image_sizes=inputs["next_sizes"]).logits
            processed = transformers.AutoImageProcessor.from_pretrained(str(path))(images=image, return_tensors="pt")
            out = {"logits": logits, "tokens": _tokens(path, entry["text"]), "processed": processed["pixel_values"]}
            report = _report(info)
        else:
            raise ValueError(f"unknown kind {kind}")
    return report, {k: v.float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in out.items()}


def main() -> None:
    manifest = json.loads(Path(sys.argv[1]).read_text())
    out_dir = Path(sys.argv[2])
    inputs = load_file(manifest["inputs"])
    image = Image.open(manifest["image"]).convert("RGB")
    summary = {"transformers": transformers.__version__, "reports": {}, "skipped": []}
    version = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    for entry in manifest["entries"]:
        if version < tuple(entry.get("min_transformers", (0, 0))):  # e.g. LlavaNext arrived in 4.39
            summary["skipped"].append(entry["name"])
            continue
        report, outputs = load_entry(entry, inputs, image)
        summary["reports"][entry["name"]] = report
        save_file(outputs, str(out_dir / f"{entry['name']}.safetensors"))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
