"""Peak memory of `llm2clip eval` at two dataset sizes: streaming keeps it flat (issue #21).

    python benchmarks/eval_memory.py [--model runs/tiny/stage2/clip_finetune/model] [--sizes 500 4000]

Writes an ImageFolder of random 64-px PNGs (10 classes) and a CLIP_benchmark-style webdataset
retrieval export of the same images, then scores each size in fresh processes and reports the peak
RSS (VmHWM, the median of --repeats processes) and the ratio largest / smallest. Any model folder
`llm2clip eval` reads works; the default is the main job's fine-tuned CLIP. Not a test: a measurement,
printed and written as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import sys
from pathlib import Path
from llm2clip.cli import main
code = main(sys.argv[1:])
hwm = next(int(l.split()[1]) for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM'))
print('PEAK_KIB', hwm)
sys.exit(code)
"""


def png(rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_sets(out: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    folder, wds = out / f"imagefolder_{n}", out / f"wds_{n}"
    if (folder / ".done").is_file() and (wds / ".done").is_file():
        return folder, wds
    rng = np.random.default_rng(seed)
    (wds / "test").mkdir(parents=True, exist_ok=True)
    with tarfile.open(wds / "test" / "0.tar", "w") as tar:
        for i in range(n):
            data = png(rng)
            target = folder / f"class_{i % 10}" / f"{i:06d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            caption = f"random pixels number {i} of class {i % 10}".encode()
            for name, payload in ((f"{i:06d}.png", data), (f"{i:06d}.txt", caption)):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    (wds / "test" / "nshards.txt").write_text("1\n")
    (wds / "dataset_type.txt").write_text("retrieval\n")
    (folder / ".done").touch()
    (wds / ".done").touch()
    return folder, wds


def peak(model: str, dataset: str, root: Path, repeats: int) -> tuple[float, float]:
    """Median peak RSS (MiB) and seconds over `repeats` fresh processes: one process's peak varies by tens
    of MiB with allocator and thread-pool timing, more than the dataset changes it."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    peaks, seconds = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", CHILD, "eval", "--model", model, "--dataset", dataset,
                               "--data-root", str(root), "--no-progress", "--batch-size", "64"],
                              capture_output=True, text=True, cwd=ROOT, env=env)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1])
        peaks.append(int(next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("PEAK_KIB"))))
        seconds.append(time.perf_counter() - start)
    return statistics.median(peaks) / 1024, statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "runs/tiny/stage2/clip_finetune/model"))
    parser.add_argument("--sizes", type=int, nargs=2, default=[500, 4000])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per row (the median is kept)")
    parser.add_argument("--work", default=str(ROOT / "runs/bench/eval_memory"))
    parser.add_argument("--out", default=str(ROOT / "runs/bench/eval_memory.json"))
    args = parser.parse_args()
    work = Path(args.work)
    rows = {}
    for n in args.sizes:
        folder, wds = make_sets(work, n)
        for dataset, root in (("imagefolder", folder), ("wds/random", wds)):
            mib, seconds = peak(args.model, dataset, root, args.repeats)
            rows.setdefault(dataset, {})[n] = {"peak_rss_mib": round(mib, 1), "seconds": round(seconds, 1)}
            print(f"{dataset:12s} {n:6d} images: peak RSS {mib:7.1f} MiB, {seconds:6.1f} s", flush=True)
    small, large = args.sizes
    result = {"sizes": args.sizes, "model": args.model, "rows": rows,
              "ratio_large_over_small": {d: round(r[large]["peak_rss_mib"] / r[small]["peak_rss_mib"], 3)
                                         for d, r in rows.items()}}
    print(json.dumps(result["ratio_large_over_small"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
