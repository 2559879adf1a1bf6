"""Peer side of the data-pipeline row: open_clip's own webdataset training pipeline (open_clip_train.data.
get_wds_dataset: shard shuffle, split by node and worker, sample shuffle buffer, PIL decode, transform,
tokenize, batch) with its eval image transform (resize 224 bicubic, centre crop, normalise: what
CLIPImageProcessor does on our side). Run inside the open_clip venv:

    runs/bench/peers/open_clip/bin/python benchmarks/peer_open_clip_data.py SHARDS NUM_SAMPLES BATCH BATCHES

One DataLoader worker; a warm-up batch, then BATCHES timed. Prints one JSON line.
"""

import json
import sys
import time
from argparse import Namespace

import open_clip
import torch
from open_clip_train.data import get_wds_dataset

if __name__ == "__main__":
    shards, num_samples, batch, batches = sys.argv[1], *map(int, sys.argv[2:5])
    torch.set_num_threads(1)
    args = Namespace(train_data=shards, val_data=None, train_num_samples=num_samples, dataset_resampled=False,
                     train_data_upsampling_factors=None, seed=0, batch_size=batch, workers=1, world_size=1)
    preprocess = open_clip.image_transform(224, is_train=False)
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    loader = get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=tokenizer).dataloader
    it = iter(loader)
    next(it)  # warm-up: worker start, first shard
    start = time.perf_counter()
    for _ in range(batches):
        images, texts = next(it)
    seconds = time.perf_counter() - start
    print(json.dumps({"images_per_s": round(batch * batches / seconds, 1), "batches": batches, "batch": batch,
                      "image_shape": list(images.shape), "versions": {"open_clip": open_clip.__version__,
                                                                     "torch": torch.__version__}}))
