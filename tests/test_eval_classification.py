"""Zero-shot classification: dataset readers on tiny generated layouts, the packaged ImageNet metadata,
prompt ensembling and the metrics against hand-computed values."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from llm2clip.errors import ConfigError, DataError
from llm2clip.evaluation.base import CLASSIFICATION, REGISTRY
from llm2clip.evaluation.classification import (
    classification_metrics,
    imagenet_classnames,
    imagenet_wnids,
    open_imagefolder,
    open_imagenet,
    open_wds_classification,
    openai_templates,
    zero_shot_classifier,
)


def png(color=(255, 0, 0), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format=fmt)
    return buf.getvalue()


def write_folder(base: Path, layout: dict[str, list[str]]) -> None:
    for folder, files in layout.items():
        (base / folder).mkdir(parents=True, exist_ok=True)
        for f in files:
            (base / folder / f).write_bytes(png())


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def read(es):
    return [(it.key, it.label, it.image) for it in es.items()]


# -- metadata ------------------------------------------------------------------------------------

def test_metadata_files():
    names, wnids, templates = imagenet_classnames(), imagenet_wnids(), openai_templates()
    assert len(names) == 1000 and names[0] == "tench" and names[999] == "toilet paper"
    assert len(wnids) == 1000 == len(set(wnids)) and wnids == sorted(wnids)
    assert wnids[0] == "n01440764" and wnids[999] == "n15075141"
    assert len(templates) == 80 and all("{c}" in t for t in templates)
    assert templates[0] == "a bad photo of a {c}."


# -- ImageNet and image folders ------------------------------------------------------------------

def test_imagenet_subset_keeps_standard_labels(tmp_path):
    write_folder(tmp_path / "val", {"n15075141": ["b.JPEG"], "n01440764": ["x.JPEG", "a.JPEG"],
                                    "n01443537": ["c.png"]})
    (tmp_path / "val" / "n01440764" / "notes.txt").write_text("not an image")
    (es,) = open_imagenet(tmp_path, strict=False, name="imagenet1k")
    assert REGISTRY["imagenet1k"] is open_imagenet
    assert es.task == CLASSIFICATION and es.size == 4
    assert len(es.classnames) == 1000 and len(es.templates) == 80
    items = read(es)
    assert [(k, lab) for k, lab, _ in items] == [("n01440764/a.JPEG", 0), ("n01440764/x.JPEG", 0),
                                                  ("n01443537/c.png", 1), ("n15075141/b.JPEG", 999)]
    assert all(isinstance(img, Path) for _, _, img in items)
    assert es.classnames[0] == "tench" and es.classnames[999] == "toilet paper"
    assert es.stats.read == 4
    read(es)  # a second pass reports itself, not the sum of both
    assert es.stats.read == 4


def test_imagenet_without_split_folder_and_bad_layouts(tmp_path):
    write_folder(tmp_path / "flat", {"n01443537": ["a.jpg"]})
    (es,) = open_imagenet(tmp_path / "flat", strict=False, name="imagenet1k")
    assert [lab for _, lab, _ in read(es)] == [1]

    write_folder(tmp_path / "pets", {"cat": ["a.jpg"], "dog": ["b.jpg"]})
    with pytest.raises(ConfigError, match=r"no ImageNet class folders.*imagefolder"):
        open_imagenet(tmp_path / "pets", strict=False, name="imagenet1k")

    write_folder(tmp_path / "mixed" / "val", {"n01440764": ["a.jpg"], "extras": ["b.jpg"]})
    with pytest.raises(ConfigError, match="extras' is not an ImageNet-1k class folder"):
        open_imagenet(tmp_path / "mixed", strict=False, name="imagenet1k")


def test_imagefolder(tmp_path):
    write_folder(tmp_path / "test", {"sea_lion": ["1.jpg", "2.webp"], "cat": ["x.png"], "dog": ["y.bmp"]})
    (es,) = open_imagefolder(tmp_path, strict=False, name="imagefolder", split="test")
    assert es.classnames == ["cat", "dog", "sea lion"]
    assert es.templates == openai_templates()
    assert [(k, lab) for k, lab, _ in read(es)] == [("cat/x.png", 0), ("dog/y.bmp", 1), ("sea_lion/1.jpg", 2),
                                                     ("sea_lion/2.webp", 2)]
    tfile = tmp_path / "t.txt"
    tfile.write_text("a photo of a {c}.\n\nart of {c}\n")
    (es,) = open_imagefolder(tmp_path / "test", strict=False, name="imagefolder", templates=str(tfile))
    assert es.templates == ["a photo of a {c}.", "art of {c}"]
    with pytest.raises(ConfigError, match="no '\\{c\\}' placeholder"):
        open_imagefolder(tmp_path / "test", strict=False, name="imagefolder", templates=["a photo"])
    with pytest.raises(ConfigError, match="at least 2"):
        open_imagefolder(tmp_path / "test" / "cat", strict=False, name="imagefolder")


# -- CLIP_benchmark webdataset -------------------------------------------------------------------

def write_wds(root: Path, shards: list[list[tuple[str, bytes]]], classnames=("cat", "dog", "sea lion")) -> None:
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na {c}.\n")
    (root / "test" / "nshards.txt").write_text(f"{len(shards)}\n")
    for i, members in enumerate(shards):
        write_tar(root / "test" / f"{i}.tar", members)


WDS_SHARDS = [
    [("s0.cls", b"0"), ("s0.png", png()), ("s1.cls", b"2\n"), ("s1.jpg", png(fmt="JPEG")),
     ("s2.cls", b"cat"), ("s2.webp", png())],  # s2: not an integer
    [("s3.cls", b"3"), ("s3.png", png()),  # s3: out of range
     ("s4.cls", b"1"),  # s4: no image member
     ("s5.cls", b"1"), ("s5.webp", png(fmt="WEBP"))],
]


def test_wds_classification(tmp_path):
    write_wds(tmp_path, WDS_SHARDS)
    (es,) = open_wds_classification(tmp_path, strict=False, name="wds/toy")
    assert es.name == "wds/toy" and es.task == CLASSIFICATION
    assert es.classnames == ["cat", "dog", "sea lion"] and es.templates == ["a photo of a {c}.", "a {c}."]
    items = read(es)
    assert [(k, lab) for k, lab, _ in items] == [("s0", 0), ("s1", 2), ("s5", 1)]
    assert all(isinstance(img, bytes) and Image.open(io.BytesIO(img)).size == (4, 4) for _, _, img in items)
    assert es.stats.read == 3
    assert dict(es.stats.counts) == {"bad class index": 2, "missing image": 1}
    assert es.stats.where["bad class index"] == [f"{tmp_path / 'test' / '0.tar'}:s2",
                                                 f"{tmp_path / 'test' / '1.tar'}:s3"]


def test_wds_strict_names_shard_and_key(tmp_path):
    write_wds(tmp_path, WDS_SHARDS)
    (es,) = open_wds_classification(tmp_path, strict=True, name="wds/toy")
    with pytest.raises(DataError, match=r"0\.tar:s2: bad class index"):
        read(es)


def test_wds_corrupt_and_missing_shards(tmp_path):
    members = [(f"k{i}.{ext}", data) for i in range(4) for ext, data in (("cls", b"1"), ("png", png() * 50))]
    write_wds(tmp_path, [members, members])
    shard = tmp_path / "test" / "1.tar"
    shard.write_bytes(shard.read_bytes()[:3000])  # cut inside the second sample
    (tmp_path / "test" / "nshards.txt").write_text("3")  # 2.tar does not exist
    (es,) = open_wds_classification(tmp_path, strict=False, name="wds/toy")
    items = read(es)
    assert es.stats.counts["corrupt shard"] == 1 and es.stats.counts["missing shard"] == 1
    assert 4 <= len(items) < 8 and es.stats.read == len(items)


def test_wds_layout_errors(tmp_path):
    write_wds(tmp_path, WDS_SHARDS)
    with pytest.raises(ConfigError, match=r"split 'train' not found.*test"):
        open_wds_classification(tmp_path, strict=False, name="wds/toy", split="train")
    (tmp_path / "test" / "nshards.txt").write_text("two")
    with pytest.raises(ConfigError, match=r"nshards\.txt"):
        open_wds_classification(tmp_path, strict=False, name="wds/toy")
    (tmp_path / "dataset_type.txt").write_text("multilabel\n")
    with pytest.raises(ConfigError, match="multilabel"):
        open_wds_classification(tmp_path, strict=False, name="wds/toy")
    (tmp_path / "dataset_type.txt").unlink()
    (tmp_path / "zeroshot_classification_templates.txt").unlink()
    with pytest.raises(ConfigError, match=r"zeroshot_classification_templates\.txt' is missing"):
        open_wds_classification(tmp_path, strict=False, name="wds/toy")


# -- protocol ------------------------------------------------------------------------------------

def test_prompt_ensembling_matches_hand_computation():
    vectors = {"a cat": [3.0, 4.0], "the cat.": [2.0, 0.0], "a dog": [0.0, 1.0], "the dog.": [0.0, -5.0]}
    calls = []

    def encode(texts):
        calls.append(list(texts))
        return torch.tensor([vectors[t] for t in texts])  # [B, 2], not unit length on purpose

    w = zero_shot_classifier(encode, ["cat", "dog"], ["a {c}", "the {c}."], batch_size=3)  # [2, 2]
    assert calls == [["a cat", "the cat.", "a dog"], ["the dog."]]  # batches span classes
    cat = torch.tensor([0.6 + 1.0, 0.8 + 0.0]) / 2  # mean of the normalised embeddings
    assert torch.allclose(w[0], cat / cat.norm())
    assert torch.allclose(w[1], torch.zeros(2), atol=1e-6)  # opposite prompts cancel: the norm guard keeps 0
    assert w.shape == (2, 2) and w.dtype == torch.float32


def test_metrics_hand_computed_with_ties_and_empty_classes():
    logits = torch.tensor([  # [N=6, C=6]; classes 4 and 5 have no samples
        [5, 1, 1, 1, 1, 1],  # t0: rank 0
        [1, 1, 1, 1, 1, 1],  # t0: all tied, the lowest index wins -> rank 0
        [2, 2, 0, 0, 0, 0],  # t1: tied with class 0, which ranks first -> rank 1
        [0, 0, 1, 3, 5, 3],  # t2: three classes higher -> rank 3; predicts class 4, absent from targets
        [9, 9, 1, 9, 9, 9],  # t2: five higher -> rank 5, outside the top 5
        [0, 0, 0, 7, 7, 0],  # t3: tied with class 4, a higher index -> rank 0
    ], dtype=torch.float32)
    targets = torch.tensor([0, 0, 1, 2, 2, 3])
    m = classification_metrics(logits, targets)
    assert m["acc1"] == pytest.approx(3 / 6) and m["acc5"] == pytest.approx(5 / 6)
    # recall per class with samples: c0 2/2, c1 0/1, c2 0/2, c3 1/1
    assert m["mean_per_class_recall"] == pytest.approx((1 + 0 + 0 + 1) / 4)


def test_metrics_few_classes_nan_and_clip_benchmark_parity():
    m = classification_metrics(torch.tensor([[0.2, 0.1, float("nan")], [0.0, 1.0, 0.5]]), torch.tensor([2, 1]))
    assert "acc5" not in m and m["acc1"] == 0.5  # under 5 classes no acc5; a NaN logit never wins
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(200, 10, generator=g), torch.randint(0, 10, (200,), generator=g)
    pred = logits.topk(5, 1, True, True)[1].t()  # CLIP_benchmark's accuracy(), untied scores
    correct = pred.eq(targets.view(1, -1).expand_as(pred))
    m = classification_metrics(logits, targets)
    assert m["acc1"] == pytest.approx(correct[:1].sum().item() / 200)
    assert m["acc5"] == pytest.approx(correct[:5].sum().item() / 200)
    with pytest.raises(DataError, match="no images"):
        classification_metrics(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
