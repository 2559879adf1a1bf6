"""Peer side of the caption-embedding row: llm2vec's `LLM2Vec.encode`, run inside the llm2vec venv.

    runs/bench/peers/llm2vec/bin/python benchmarks/peer_llm2vec.py MODEL_DIR TEXTS_JSON BATCH ROUNDS bf16|fp32

Does not import llm2clip (it cannot: another transformers). Prints one JSON line: seconds per encode of
all texts (one per round, after a warm-up), real tokens as llm2vec's tokenizer counts them, and the
embeddings' first rows so the driver can check both sides ran the same model.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from llm2vec import LLM2Vec


def compatible_copy(model_dir: str, into: Path) -> Path:
    """Links to the saved model with two format changes: transformers 5 names its tokenizer class
    'TokenizersBackend', which 4.44 does not know; PreTrainedTokenizerFast reads the same tokenizer.json."""
    for file in Path(model_dir).iterdir():
        if file.name not in ("tokenizer_config.json", "tokenizer.json"):
            (into / file.name).symlink_to(file.resolve())
    # tokenizers >= 0.20 writes BPE merges as [a, b] pairs; the 0.19 that transformers 4.44 pins reads "a b"
    tokenizer = json.loads((Path(model_dir) / "tokenizer.json").read_text())
    merges = tokenizer["model"].get("merges", [])
    tokenizer["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in merges]
    (into / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = json.loads((Path(model_dir) / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", model_input_names=["input_ids", "attention_mask"])
    (into / "tokenizer_config.json").write_text(json.dumps(config))
    return into


def main(model_dir: str, texts_file: str, batch: int, rounds: int, dtype: str) -> None:
    torch.set_num_threads(2)
    with open(texts_file) as f:
        texts = json.load(f)
    # llm2vec's own loader: bidirectional Llama, mean pooling, fp32 weights; autocast as on our side
    model_dir = str(compatible_copy(model_dir, Path(tempfile.mkdtemp())))
    model = LLM2Vec.from_pretrained(model_dir, enable_bidirectional=True, pooling_mode="mean", max_length=512,
                                    torch_dtype=torch.float32)
    real_tokens = int(sum(len(ids) for ids in model.tokenizer(texts, truncation=True, max_length=512)["input_ids"]))
    times = []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        model.encode(texts[:batch], batch_size=batch, show_progress_bar=False, device="cpu")  # warm-up
        for _ in range(rounds):
            start = time.perf_counter()
            vectors = model.encode(texts, batch_size=batch, show_progress_bar=False, device="cpu",
                                   convert_to_tensor=True)
            times.append(time.perf_counter() - start)
    print(json.dumps({"seconds": times, "real_tokens": real_tokens, "first_rows": vectors[:4].float().tolist(),
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
