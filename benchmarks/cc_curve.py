"""CRA during CC: the adapter is saved every N steps and each snapshot's CRA measured (issue #20,
docs/STAGE1.md part 5). It shows where two CC runs part, which a final CRA cannot.

    python benchmarks/cc_curve.py --out DIR [--every 150] [--config configs/tiny.yaml] \
        [--set run.out_dir=runs/tiny] [--set stage1.cra_data=runs/tiny/data/val.jsonl] [--set ...]

CC runs as `llm2clip stage1 cc` would with the same config (the final adapter goes to DIR/cc, the
snapshots to DIR/step_N); CRA is `llm2clip stage1 eval-cra`'s, on `stage1.cra_data`. Writes
DIR/curve.json ({step: {view: CRA}}) and prints one row per view.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    from llm2clip.config import load_config
    from llm2clip.embedder import CaptionEmbedder
    from llm2clip.stage1.cc import save_cc_adapter, train_cc
    from llm2clip.stage1.cli import _cc_base
    from llm2clip.stage1.cra import collect_views, evaluate_cra

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--set", action="append", default=[], help="config override, as in the CLI")
    parser.add_argument("--every", type=int, default=150, help="CC steps between snapshots")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    out = Path(args.out)
    cfg = load_config(args.config, [*args.set, f"stage1.cc.out={out / 'cc'}",
                                    f"stage1.cc.checkpoint_dir={out / 'checkpoints'}"])
    if cfg.stage1.cra_data is None:
        parser.error("stage1.cra_data is null: set it to the split whose CRA to follow (e.g. val)")
    base = _cc_base(cfg)

    folders = {}  # step -> adapter folder; only this run's (an earlier run may have left others in --out)

    def snapshot(step: int, embedder) -> None:
        if step % args.every == 0 and step < cfg.stage1.cc.steps:
            folders[step] = out / f"step_{step}"
            save_cc_adapter(embedder, base, str(folders[step]))

    train_cc(cfg.stage1.cc, base, seed=cfg.run.seed, progress=False, data_cfg=cfg.data, on_step=snapshot)
    views, _ = collect_views(cfg.stage1.cra_data, cfg.data, cfg.stage1.cra_caption_keys,
                             cfg.stage1.cra_second_language_key)
    folders[cfg.stage1.cc.steps] = out / "cc"
    curve = {step: evaluate_cra(CaptionEmbedder.from_pretrained(folders[step], device=cfg.embedder.device), views)
             for step in sorted(folders)}
    (out / "curve.json").write_text(json.dumps({"data": cfg.stage1.cra_data, "curve": curve}, indent=1) + "\n")
    steps = sorted(curve)
    print("| CC step | " + " | ".join(map(str, steps)) + " |")
    for view in next(iter(curve.values())):
        print(f"| {view} | " + " | ".join(f"{curve[s][view]:.2f}" for s in steps) + " |")


if __name__ == "__main__":
    main()
