"""What the main job shows a person: one results table in the terminal, and PNGs of the training
curves and of the images that long captions retrieve."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import torch

MODEL_NAMES = {"clip_pretrained": "CLIP pretrained", "clip_finetuned": "CLIP fine-tuned", "llm2clip": "LLM2CLIP"}
SET_NAMES = {"short": "short", "long": "long", "second_language": "2nd language"}


def results_table(results: dict):
    """A rich Table: rows are models, columns R@1 I2T/T2I per caption set, then CRA raw vs CC."""
    from rich.table import Table

    table = Table(title="Retrieval R@1 (%) on the test split, image->text / text->image")
    table.add_column("model")
    sets = [s for s in SET_NAMES if any(s in r for r in results["retrieval"].values())]
    for s in sets:
        table.add_column(f"{SET_NAMES[s]} I2T/T2I", justify="right")
    cra = results.get("cra") or {}
    table.add_column("CRA en raw/CC", justify="right")
    table.add_column("CRA cross-lingual raw/CC", justify="right")
    for model, per_set in results["retrieval"].items():
        cells = [f"{per_set[s]['i2t_r1']:.1f} / {per_set[s]['t2i_r1']:.1f}" if s in per_set else "-" for s in sets]
        extra = ["", ""]
        if model == "llm2clip" and cra:
            extra = [f"{cra['raw'][v]:.1f} / {cra['cc'][v]:.1f}" if v in cra["raw"] else "-"
                     for v in ("en", "cross_lingual")]
        table.add_row(MODEL_NAMES.get(model, model), *cells, *extra)
    return table


def print_results(results: dict) -> None:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # a log file: rich would wrap the table at 80 columns
        console = Console(width=120)
    console.print(results_table(results))


def plot_training_curves(runs: dict[str, Path], out: Path) -> Path:
    """runs: name -> run folder holding loss.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, folder in runs.items():
        path = Path(folder) / "loss.jsonl"
        if not path.is_file():
            continue
        rows = [r for r in map(json.loads, path.read_text().splitlines()) if r["loss"] is not None]  # skipped: null
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.set_title("Stage-2 training curves")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _to_image(pixels: torch.Tensor, mean, std):
    img = pixels.float() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return img.clamp(0, 1).permute(1, 2, 0).numpy()


def plot_top5(features: dict, images, out: Path, mean, std, queries: int = 4) -> Path:
    """For the first `queries` long captions: the caption and its top-5 images (correct one framed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts, owner, captions = features["long"]
    picks = list(range(0, len(captions), max(1, len(captions) // queries)))[:queries]
    tops = [(features["images"] @ texts[t]).topk(5).indices.tolist() for t in picks]  # scores [I] -> top 5
    wanted = sorted({i for top in tops for i in top})
    pixels = dict(zip(wanted, images.pixels_at(wanted), strict=True))  # a streamed split reads just these
    fig, axes = plt.subplots(len(picks), 6, figsize=(14, 2.6 * len(picks)), squeeze=False)
    for row, (t, top) in enumerate(zip(picks, tops, strict=True)):
        axes[row][0].text(0, 1, textwrap.fill(captions[t].text[:420], 48), fontsize=6, va="top")
        axes[row][0].axis("off")
        for col, i in enumerate(top, 1):
            ax = axes[row][col]
            ax.imshow(_to_image(pixels[i], mean, std))
            ax.set_xticks([])
            ax.set_yticks([])
            hit = i == int(owner[t])
            for spine in ax.spines.values():
                spine.set_edgecolor("limegreen" if hit else "lightgray")
                spine.set_linewidth(4 if hit else 1)
            ax.set_title(f"#{col}{' (match)' if hit else ''}", fontsize=8)
    fig.suptitle("LLM2CLIP: top-5 images for long captions (green = the captioned image)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
