"""The tiny preset and the tower comparison behind `bash scripts/llava_{pretrain,finetune}.sh`.

Flag lists are built in three layers, later ones winning: LLaVA-1.5's recipe for the stage
(scripts/v1_5/pretrain.sh, finetune.sh), then the tiny preset when no model or data flag was given,
then the user's flags. The tiny preset trains on the main job's run: its stage-1 tiny LM, the shapes
world's LLaVA data, and its 'llm2clip' or 'clip' tower; the comparison gives both towers the same LLM,
data and steps.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from llm2clip.data.qa import DESCRIBE_PROMPT
from llm2clip.errors import ConfigError
from llm2clip.precision import bf16_pays

from .evaluate import TYPES

TOWERS = ("llm2clip", "clip")
RECIPES = {  # LLaVA-1.5's scripts: projector-only pretraining, then instruction tuning
    "pretrain": ["--version", "plain", "--tune_mm_mlp_adapter", "True", "--mm_projector_type", "mlp2x_gelu",
                 "--mm_vision_select_layer", "-2", "--learning_rate", "1e-3", "--weight_decay", "0",
                 "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--num_train_epochs", "1",
                 "--bf16", "True", "--gradient_checkpointing", "True", "--save_strategy", "no"],
    "finetune": ["--version", "v1", "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2",
                 "--learning_rate", "2e-5", "--weight_decay", "0", "--warmup_ratio", "0.03",
                 "--lr_scheduler_type", "cosine", "--num_train_epochs", "1", "--bf16", "True",
                 "--gradient_checkpointing", "True", "--save_strategy", "no"],
}
TINY = {  # the smallest budgets that show the towers apart on 2 CPU cores (docs/LLAVA.md)
    # 338 steps: 3 epochs of the former 3,600 train images; a step count keeps the script's time fixed
    # as the world's train split grows (9,600 images since issue #20)
    "pretrain": ["--per_device_train_batch_size", "32", "--model_max_length", "512", "--max_steps", "338",
                 "--gradient_checkpointing", "False", "--logging_steps", "10"],
    # The world's instruction data keeps Q&A conversations (193-239 tokens with the image's 9 rows) and
    # detailed descriptions (211-430) in separate samples, so 512 cuts nothing; batches grouped by length
    # pad to ~4.05k tokens a step instead of ~5.9k (randomly mixed), as many as the old layout cut at 256.
    # 1000 steps: at 500 the tiny LLM answers each question type with one constant (count, existence),
    # so the towers differ in colour alone; at 1000 count answers vary and the LLM2CLIP tower leads in
    # each of 3 seeds (issue #20, docs/LLAVA.md)
    "finetune": ["--per_device_train_batch_size", "16", "--learning_rate", "1e-3", "--max_steps", "1000",
                 "--model_max_length", "512", "--group_by_length", "True",
                 "--gradient_checkpointing", "False", "--logging_steps", "50"],
}


def run_dir() -> Path:
    return Path(os.environ.get("LLM2CLIP_RUN_DIR") or "runs/tiny")


def _flag(argv: list[str], *names: str) -> str | None:
    value = None
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(name + "="):
                value = arg.split("=", 1)[1]
    return value


def _spellings(name: str) -> tuple[str, str]:
    return f"--{name}", f"--{name.replace('_', '-')}"


def is_preset(argv: list[str]) -> bool:
    return not any(_flag(argv, *_spellings(n)) for n in ("model_name_or_path", "data_path"))


def tower_name(argv: list[str]) -> str:
    return _flag(argv, *_spellings("vision_tower")) or "llm2clip"


def is_lora(argv: list[str]) -> bool:
    return str(_flag(argv, *_spellings("lora_enable"))).lower() == "true"


def output_dir(kind: str, tower: str, lora: bool = False) -> Path:
    """Named as stock LLaVA's loader routes: 'llava' in every name, 'lora' in a LoRA output's."""
    return run_dir() / "llava" / tower / f"llava-{tower}-{kind}{'-lora' if lora else ''}"


def legacy_instruct(samples: list[dict]) -> bool:
    """The shapes world's first instruction layout: the detailed description as one more turn of each
    Q&A conversation, where a ~250-token answer cut the questions after it at the tiny preset's length."""
    return any(len(s.get("conversations", [])) > 2 and any(
        t.get("value", "").replace("<image>", "").strip() == DESCRIBE_PROMPT for t in s["conversations"][::2])
        for s in samples)


def refresh_instruct_data(data: Path) -> None:
    """Rewrite a run's llava/*_instruct.json in the current layout when it holds the legacy one (a run
    synthesised before the change); images, captions and every other file stay as they are."""
    from llm2clip.data.synth import rewrite_llava_instruct

    path = data / "llava" / "train_instruct.json"
    if (data / "manifest.json").is_file() and path.is_file() and legacy_instruct(json.loads(path.read_text())):
        counts = rewrite_llava_instruct(data)
        print(f"[llava] {data}/llava/*_instruct.json held descriptions inside the Q&A conversations (the layout "
              f"before issue #20); rewritten with them as separate samples: {counts} (docs/LLAVA.md)", flush=True)


def training_argv(kind: str, argv: list[str]) -> list[str]:
    full = list(RECIPES[kind])
    if not torch.cuda.is_available():
        # bf16 only where it is the fast path: an AVX2-only CPU emulates it several times slower than fp32
        full += ["--use_cpu", "True", "--bf16", str(bf16_pays("cpu"))]
    if is_preset(argv):
        run, tower = run_dir(), tower_name(argv)
        split = "pretrain" if kind == "pretrain" else "instruct"
        if kind == "finetune":
            refresh_instruct_data(run / "data")
        full += ["--model_name_or_path", str(run / "stage1/lm"), "--vision_tower", tower,
                 "--data_path", str(run / f"data/llava/train_{split}.json"), "--image_folder", str(run / "data"),
                 "--output_dir", str(output_dir(kind, tower, is_lora(argv))), "--seed", "0", *TINY[kind]]
        if kind == "finetune" and not _flag(argv, *_spellings("pretrain_mm_mlp_adapter")):
            projector = output_dir("pretrain", tower) / "mm_projector.bin"
            if not projector.is_file():
                raise ConfigError(f"{projector} does not exist: run `bash scripts/llava_pretrain.sh --vision-tower "
                                  f"{tower}` first (a new tower needs its own projector, LLaVA #559)")
            full += ["--pretrain_mm_mlp_adapter", str(projector)]
    return full + argv


def record_vqa(results: Path, tower: str, scores: dict) -> None:
    """Merge one tower's scores into results.json atomically: {"vqa": {tower: {overall, color, ...}}}."""
    data = json.loads(results.read_text()) if results.is_file() else {}
    data.setdefault("vqa", {})[tower] = {k: scores[k] for k in ("overall", *TYPES)}
    results.parent.mkdir(parents=True, exist_ok=True)
    tmp = results.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(results)


def print_table(vqa: dict) -> None:
    header = f"{'tower':<10}" + "".join(f"{k:>11}" for k in ("overall", *TYPES))
    print(header)
    print("-" * len(header))
    for tower, scores in vqa.items():
        print(f"{tower:<10}" + "".join(f"{scores[k]:>11.2f}" for k in ("overall", *TYPES)))


def compare(argv: list[str]) -> dict:
    """Both towers, same LLM, data and steps: pretrain (if missing), fine-tune, VQA; then the HF export of
    the LLM2CLIP model. Writes <run>/llava/results.json and <run>/llava/hf_export/."""
    from .arguments import parse
    from .checkpoint import load_pretrained_model
    from .evaluate import evaluate_vqa
    from .hf_export import export_hf_llava
    from .train import train

    run = run_dir()
    results = run / "llava" / "results.json"
    timings = {}
    for tower in TOWERS:
        start = time.perf_counter()
        if not (output_dir("pretrain", tower) / "mm_projector.bin").is_file():
            train(*parse(training_argv("pretrain", ["--vision_tower", tower])), progress=False)
        summary = train(*parse(training_argv("finetune", ["--vision_tower", tower, *argv])), progress=False)
        finetuned = output_dir("finetune", tower, is_lora(argv))
        tokenizer, model, processor, _ = load_pretrained_model(finetuned)
        result = evaluate_vqa(model, tokenizer, processor, run / "data/llava/test_instruct.json", run / "data",
                              progress=False)
        (finetuned / "vqa_predictions.json").write_text(
            json.dumps(result["predictions"], indent=1) + "\n")
        record_vqa(results, tower, result["scores"])
        timings[tower] = {"seconds": round(time.perf_counter() - start, 1), "train": summary}
        print(f"== {tower}: VQA {result['scores']}", flush=True)
    tokenizer, model, _, _ = load_pretrained_model(output_dir("finetune", "llm2clip", is_lora(argv)),
                                                   dtype=torch.float32)
    export_hf_llava(model, tokenizer, run / "llava" / "hf_export")
    data = json.loads(results.read_text())
    data["runs"] = timings
    results.write_text(json.dumps(data, indent=1) + "\n")
    print_table({t: data["vqa"][t] for t in TOWERS})
    print(f"results in {results}; HF export in {run / 'llava' / 'hf_export'}")
    return data
