"""LLaVA's constants (llava/constants.py): the same values, so data and checkpoints interoperate."""

IGNORE_INDEX = -100  # label value skipped by the cross-entropy loss
IMAGE_TOKEN_INDEX = -200  # placeholder id in input_ids where image features are spliced in
DEFAULT_IMAGE_TOKEN = "<image>"
