"""`python -m llava_integration {pretrain,finetune,eval,export,compare} [LLaVA flags]`.

With no model or data flags, pretrain/finetune run the tiny preset on the main job's run (runs/tiny):
the stage-1 tiny LM, the shapes world's LLaVA data and the chosen tower ('llm2clip' or 'clip').
Explicit flags always win over the preset's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from llm2clip.errors import Llm2ClipError

from . import preset


def _train(kind: str, argv: list[str]) -> dict:
    from .arguments import expand_config, parse
    from .train import train

    argv = expand_config(argv)  # a --config preset's flags count as given: they decide tiny-or-not below
    if kind == "finetune" and preset.is_preset(argv) and "--pretrain_mm_mlp_adapter" not in " ".join(argv):
        tower = preset.tower_name(argv)
        if not (preset.output_dir("pretrain", tower) / "mm_projector.bin").is_file():
            print(f"== no pretrained projector for '{tower}' yet: pretraining it first", flush=True)
            train(*parse(preset.training_argv("pretrain", ["--vision_tower", tower])))
    argv = preset.training_argv(kind, argv)
    print(f"== llava {kind}: {' '.join(argv)}", flush=True)
    return train(*parse(argv))


def _eval(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m llava_integration eval")
    p.add_argument("--model_path", "--model-path", required=True)
    p.add_argument("--model_base", "--model-base", default=None)
    p.add_argument("--data_path", "--data-path", default=None, help="LLaVA JSON (default: the run's test split)")
    p.add_argument("--image_folder", "--image-folder", default=None)
    p.add_argument("--load_4bit", "--load-4bit", action="store_true")
    p.add_argument("--max_images", "--max-images", type=int, default=None)
    p.add_argument("--mismatched_images", "--mismatched-images", action="store_true",
                   help="ask every question about another image: how much do answers depend on the image?")
    p.add_argument("--tower_key", "--tower-key", default=None, help="also record under this key in --results")
    p.add_argument("--results", default=None, help="JSON file that collects {'vqa': {tower_key: scores}}")
    a = p.parse_args(argv)
    from .checkpoint import load_pretrained_model
    from .evaluate import evaluate_vqa

    run = preset.run_dir()
    tokenizer, model, processor, _ = load_pretrained_model(a.model_path, a.model_base, load_4bit=a.load_4bit)
    result = evaluate_vqa(model, tokenizer, processor, a.data_path or run / "data/llava/test_instruct.json",
                          a.image_folder or run / "data", version=getattr(model.config, "version", "v1"),
                          max_images=a.max_images, mismatched_images=a.mismatched_images)
    name = "vqa_predictions_mismatched.json" if a.mismatched_images else "vqa_predictions.json"
    Path(a.model_path, name).write_text(json.dumps(result["predictions"], indent=1) + "\n")
    if a.results and a.tower_key:
        preset.record_vqa(Path(a.results), a.tower_key, result["scores"])
    print(json.dumps(result["scores"]))
    return result["scores"]


def _export(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m llava_integration export")
    p.add_argument("--model_path", "--model-path", required=True)
    p.add_argument("--model_base", "--model-base", default=None)
    p.add_argument("--out", required=True, help="folder for LlavaForConditionalGeneration (LlavaNext when anyres)")
    a = p.parse_args(argv)
    import torch

    from .checkpoint import load_pretrained_model
    from .hf_export import export_hf_llava
    from .hf_export_next import export_hf_llava_next

    tokenizer, model, _, _ = load_pretrained_model(a.model_path, a.model_base, dtype=torch.float32)
    export = export_hf_llava_next if model.is_anyres else export_hf_llava
    print(f"wrote {export(model, tokenizer, a.out)}")


def command_first(argv: list[str]) -> list[str]:
    """The deepspeed launcher puts --local_rank=N before the command; HF's TrainingArguments takes it after."""
    if argv and argv[0].startswith(("--local_rank=", "--local-rank=")):
        return argv[1:2] + argv[:1] + argv[2:]
    return argv


def leave_process_group() -> None:
    """All ranks leave the group together: a rank exiting while another still holds gloo connections
    can take that rank down with SIGABRT."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = command_first(list(sys.argv[1:] if argv is None else argv))
    commands = {"pretrain", "finetune", "eval", "export", "compare"}
    if not argv or argv[0] not in commands:
        print(f"usage: python -m llava_integration {{{','.join(sorted(commands))}}} [flags]; "
              "see docs/LLAVA.md", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if command in ("pretrain", "finetune"):
            _train(command, rest)
            leave_process_group()
        elif command == "eval":
            _eval(rest)
        elif command == "export":
            _export(rest)
        else:
            preset.compare(rest)
    except Llm2ClipError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
