"""Run under torchrun: one LLaVA fine-tuning run through HF Trainer + DeepSpeed (test_llava_deepspeed.py)."""

import sys

from llava_integration.arguments import parse
from llava_integration.cli import leave_process_group
from llava_integration.train import train

if __name__ == "__main__":
    summary = train(*parse(sys.argv[1:]), progress=False)
    print("SUMMARY", summary["first_loss"], summary["last_loss"], flush=True)
    leave_process_group()
