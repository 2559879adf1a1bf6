"""Stage-2 losses against direct formulas, across processes, and retrieval metrics on hand-made cases."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from llm2clip.eval import as_percent_table, retrieval_metrics
from llm2clip.losses import ClipLoss, SigLipLoss, clip_loss


def _features(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_clip_loss_matches_direct_formula():
    img, txt = _features()
    scale = 14.3
    total = 0.0
    for i in range(len(img)):  # -log softmax of the matching pair, in both directions
        row = torch.stack([scale * img[i] @ t for t in txt])
        col = torch.stack([scale * im @ txt[i] for im in img])
        total += (torch.logsumexp(row, 0) - row[i]) + (torch.logsumexp(col, 0) - col[i])
    torch.testing.assert_close(clip_loss(img, txt, scale), total / (2 * len(img)))


def test_siglip_loss_matches_direct_formula():
    img, txt = _features()
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    direct = 0.0
    for i in range(len(img)):
        for j in range(len(txt)):
            z = 1.0 if i == j else -1.0
            direct += -math.log(torch.sigmoid(z * (scale * img[i] @ txt[j] + bias)).item())
    torch.testing.assert_close(SigLipLoss()(img, txt, scale, bias), torch.tensor(direct / len(img)), rtol=1e-5,
                               atol=1e-5)


def _loss_worker(rank, world_size, port, kind, img, txt, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    b = img.shape[0] // world_size
    i, t = (x[rank * b:(rank + 1) * b].clone().requires_grad_() for x in (img, txt))
    scale = torch.tensor(10.0, requires_grad=True)
    fn = ClipLoss(local_loss=True) if kind == "clip" else SigLipLoss()
    loss = fn(i, t, scale, torch.tensor(-5.0) if kind == "siglip" else None)
    loss.backward()
    out[rank] = (loss.detach(), i.grad, t.grad, scale.grad)
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_two_gloo_processes_equal_one_big_batch(kind):
    """Mean loss and (rank-averaged, as DDP does) gradients match the one-process loss at the same batch."""
    import torch.multiprocessing as mp

    img, txt = _features(n=8)
    out = mp.Manager().dict()
    mp.spawn(_loss_worker, args=(2, 29531 + (kind == "siglip"), kind, img, txt, out), nprocs=2, join=True)
    i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    fn = ClipLoss() if kind == "clip" else SigLipLoss()
    full = fn(i, t, scale, torch.tensor(-5.0) if kind == "siglip" else None)
    full.backward()
    torch.testing.assert_close((out[0][0] + out[1][0]) / 2, full.detach(), atol=1e-5, rtol=1e-5)
    # each rank's gradient covers its own rows; DDP averages over ranks, hence the 1/2
    torch.testing.assert_close(torch.cat([out[0][1], out[1][1]]) / 2, i.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([out[0][2], out[1][2]]) / 2, t.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close((out[0][3] + out[1][3]) / 2, scale.grad, atol=1e-5, rtol=1e-5)


def test_retrieval_metrics_hand_made_case_with_two_captions_per_image():
    images = torch.eye(3)  # image i points along axis i
    # texts 0,1 caption image 0; text 2 image 1; text 3 image 2. Text 1 looks most like image 2.
    texts = F.normalize(torch.tensor([[1.0, 0.1, 0], [0.2, 0, 1.0], [0, 1.0, 0.1], [0.3, 0, 1.0]]), dim=-1)
    owner = torch.tensor([0, 0, 1, 2])
    m = retrieval_metrics(images, texts, owner, ks=(1, 2))
    assert m["image_retrieval_recall@1"] == pytest.approx(3 / 4)  # text->image: text 1 misses
    assert m["image_retrieval_recall@2"] == pytest.approx(1.0)
    # image->text: image 0's top text is text 0 (hit); image 1 -> text 2 (hit); image 2's top text is
    # text 1 (0.98 > text 3's 0.96), a miss at k=1 but a hit at k=2. Hit@k, CLIP_benchmark style.
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["text_retrieval_recall@2"] == pytest.approx(1.0)
    table = as_percent_table(m, ks=(1, 2))
    assert table["i2t_r1"] == pytest.approx(66.67, abs=0.01) and table["t2i_r1"] == 75.0


def test_retrieval_metrics_reject_mismatched_lengths():
    with pytest.raises(ValueError, match="text_to_image"):
        retrieval_metrics(torch.eye(2), torch.eye(2), torch.tensor([0, 1, 1]))
