import os

import pytest
import torch
import torch.nn.functional as F

from llm2clip.errors import ConfigError
from llm2clip.losses import caption_contrastive_loss
from llm2clip.stage1.cra import caption_retrieval_accuracy
from llm2clip.stage1.mntp import mntp_loss


def _reference_loss(q, p, n, scale):
    """Direct per-query computation of llm2vec's HardNegativeNLLLoss."""
    candidates = torch.cat([p, n]) if n is not None else p
    total = 0.0
    for i in range(q.shape[0]):
        sims = torch.stack([F.cosine_similarity(q[i], c, dim=0) for c in candidates]) * scale
        total = total + (-sims[i] + torch.logsumexp(sims, dim=0))
    return total / q.shape[0]


@pytest.mark.parametrize("with_negatives", [True, False])
def test_contrastive_loss_matches_reference(with_negatives):
    torch.manual_seed(0)
    q, p, n = torch.randn(5, 8), torch.randn(5, 8), torch.randn(5, 8)
    n = n if with_negatives else None
    torch.testing.assert_close(caption_contrastive_loss(q, p, n, scale=20.0), _reference_loss(q, p, n, 20.0))


def test_contrastive_loss_is_low_when_pairs_align():
    torch.manual_seed(0)
    q = torch.randn(6, 16)
    aligned = caption_contrastive_loss(q, q + 0.01 * torch.randn(6, 16), torch.randn(6, 16))
    assert aligned < 0.01 < caption_contrastive_loss(q, torch.randn(6, 16), torch.randn(6, 16))


def _gather_worker(rank, world_size, port, q, p, n, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    b = q.shape[0] // world_size
    sl = slice(rank * b, (rank + 1) * b)
    q_, p_, n_ = (t[sl].clone().requires_grad_() for t in (q, p, n))
    loss = caption_contrastive_loss(q_, p_, n_, scale=50.0)
    loss.backward()
    out[rank] = (loss.detach(), [t.grad for t in (q_, p_, n_)])
    dist.destroy_process_group()


def test_gather_with_grad_on_gloo_matches_one_big_batch():
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    q, p, n = torch.randn(8, 4), torch.randn(8, 4), torch.randn(8, 4)
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_gather_worker, args=(2, 29511, q, p, n, out), nprocs=2, join=True)
    qa, pa, na = (t.clone().requires_grad_() for t in (q, p, n))
    full = caption_contrastive_loss(qa, pa, na, scale=50.0)
    full.backward()
    torch.testing.assert_close((out[0][0] + out[1][0]) / 2, full.detach())
    for rank in range(2):
        sl = slice(rank * 4, rank * 4 + 4)
        # Each rank's local gradient is d(sum of all ranks' losses)/d(its slice): the gather's backward
        # brings the other rank's terms. DDP then averages, giving d(mean loss) = d(full) for parameters.
        for local, full_grad in zip(out[rank][1], (qa.grad, pa.grad, na.grad), strict=True):
            torch.testing.assert_close(local, 2 * full_grad[sl], atol=1e-6, rtol=1e-5)


def test_mntp_loss_predicts_masked_token_from_previous_position():
    vocab = 7
    labels = torch.tensor([[-100, -100, 3, -100]])  # token 3 masked at position 2
    logits = torch.full((1, 4, vocab), -10.0)
    logits[0, 1, 3] = 10.0  # position 1 predicts it: near-zero loss
    assert mntp_loss(logits, labels) < 1e-3
    shifted_wrong = torch.full((1, 4, vocab), -10.0)
    shifted_wrong[0, 2, 3] = 10.0  # the unshifted position gets no credit ...
    shifted_wrong[0, 1, 0] = 10.0  # ... while position 1 predicts another token
    assert mntp_loss(shifted_wrong, labels) > 5


def test_cra_on_a_hand_made_example():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = torch.tensor([[0.9, 0.1], [0.1, 0.9], [-1.0, 1.0]])
    # pairs 0 and 1 retrieve each other both ways; a2 is nearest b0 (cos .78 vs 0 for b2) and b2 is
    # nearest a1 (cos .71): 4 hits out of 6 queries
    assert caption_retrieval_accuracy(a, b) == pytest.approx(100 * 4 / 6, abs=1e-4)
    assert caption_retrieval_accuracy(a, a.clone()) == 100.0
    with pytest.raises(ValueError, match="one shape"):
        caption_retrieval_accuracy(a, b[:2])


def test_cross_set_accuracy_on_a_hand_made_example():
    from llm2clip.stage1.cra import cross_set_accuracy

    en = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    zh = torch.tensor([[0.9, 0.2], [0.2, 0.9], [0.2, 0.9]])
    # en->zh: 0->0 hit, 1->1 hit (ties go to the first), 2->0 or 1 miss; zh->en: 0->0, 1->1, 2->1 miss
    assert cross_set_accuracy(en, zh) == pytest.approx(100 * (2 / 3 + 2 / 3) / 2, abs=1e-4)


def test_pair_batches_are_homogeneous_with_hard_negatives_from_other_images():
    from llm2clip.stage1.pairs import CaptionGroup, PairSampler

    groups = [CaptionGroup(f"short {i}", [f"long {i} a", f"long {i} b"]) for i in range(20)]
    text_pairs = [(f"en {i}", f"zh {i}") for i in range(20)]
    sampler = PairSampler(groups, text_pairs, long_long_fraction=0.5, translation_fraction=0.3, seed=0,
                          mixed_directions=False)
    seen_instructions = set()
    for _ in range(60):
        batch = sampler.batch(8)
        assert len({p.instruction for p in batch}) == 1  # one task and direction per batch
        seen_instructions.add(batch[0].instruction)
        for p in batch:
            q_id, pos_id, neg_id = (x.split()[1] for x in (p.query, p.positive, p.negative))
            assert q_id == pos_id != neg_id
            assert p.positive.split()[0] == p.negative.split()[0]  # the negative is the positive's kind
    assert len(seen_instructions) == 4  # short->long, long->short, long<->long, translation


def test_ranks_draw_the_same_task_per_step_but_different_samples():
    from llm2clip.stage1.pairs import CaptionGroup, PairSampler

    groups = [CaptionGroup(f"short {i}", [f"long {i} a", f"long {i} b"]) for i in range(50)]
    text_pairs = [(f"en {i}", f"zh {i}") for i in range(50)]
    ranks = [PairSampler(groups, text_pairs, long_long_fraction=0.5, translation_fraction=0.3, seed=1000 + r,
                         task_seed=1) for r in range(2)]
    for _ in range(20):
        a, b = (s.batch(6) for s in ranks)
        # the same kind and per-row directions on every rank: gathered candidates line up
        assert [p.instruction for p in a] == [p.instruction for p in b]
        assert [p.query for p in a] != [p.query for p in b]


def test_mixed_directions_draw_each_row_with_its_own_instruction():
    from llm2clip import instructions
    from llm2clip.stage1.pairs import CaptionGroup, PairSampler

    groups = [CaptionGroup(f"short {i}", [f"long {i} a"]) for i in range(40)]
    sampler = PairSampler(groups, [], long_long_fraction=0.0, translation_fraction=0.0, seed=0)
    forward = backward = mixed = 0
    for _ in range(50):
        batch = sampler.batch(16)
        for p in batch:  # the instruction names the direction; positive and negative are one kind
            if p.query.startswith("short"):
                assert p.instruction == instructions.SHORT_TO_LONG and p.positive.startswith("long")
                forward += 1
            else:
                assert p.instruction == instructions.LONG_TO_SHORT and p.positive.startswith("short")
                backward += 1
            assert p.positive.split()[0] == p.negative.split()[0]
            assert p.query.split()[1] == p.positive.split()[1] != p.negative.split()[1]
        mixed += len({p.instruction for p in batch}) == 2
    assert 0.4 < forward / (forward + backward) < 0.6
    assert mixed >= 48  # a batch of 16 is one direction only with probability 2^-15


def test_long_long_fraction_sets_the_share_of_paraphrase_batches():
    from llm2clip import instructions
    from llm2clip.stage1.pairs import CaptionGroup, PairSampler

    groups = [CaptionGroup(f"short {i}", [f"long {i} a", f"long {i} b"]) for i in range(20)]
    for fraction in (0.0, 0.25):
        sampler = PairSampler(groups, [], long_long_fraction=fraction, translation_fraction=0.0, seed=0)
        share = sum(sampler.batch(4)[0].instruction == instructions.LONG_TO_LONG for _ in range(800)) / 800
        assert abs(share - fraction) < 0.05


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_cc_lr_schedules_follow_transformers(schedule):
    """`stage1.cc.lr_schedule`: warmup, then transformers' curve (linear: the official run's HF default)."""
    import math

    from llm2clip.stage1.common import make_optimizer

    weight = torch.nn.Parameter(torch.zeros(2, 2))
    optimizer, scheduler = make_optimizer([weight], lr=1.0, weight_decay=0.0, warmup_steps=2, total_steps=10,
                                          schedule=schedule)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:3] == [0.0, 0.5, 1.0]
    progress = 0.5  # step 6 of 2..10
    expected = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}
    assert lrs[6] == pytest.approx(expected[schedule])
    with pytest.raises(ValueError, match="cosine, linear or constant"):
        make_optimizer([weight], 1.0, 0.0, 2, 10, schedule="step")


def test_mixed_directions_start_at_mixed_from_batch_and_survive_resume():
    from llm2clip.stage1.pairs import CaptionGroup, PairSampler

    groups = [CaptionGroup(f"short {i}", [f"long {i} a"]) for i in range(40)]

    def sampler():
        return PairSampler(groups, [], long_long_fraction=0.0, translation_fraction=0.0, seed=0, mixed_from_batch=30)

    one = sampler()
    kinds = [len({p.instruction for p in one.batch(16)}) for _ in range(60)]
    assert kinds[:30] == [1] * 30 and sum(k == 2 for k in kinds[30:]) >= 28
    _assert_resumes_identically(sampler, batch=16, saved_at=20, then=20)  # switching at the same batch


def _assert_resumes_identically(make_sampler, batch: int, saved_at: int, then: int) -> None:
    """A sampler restored from another's state at batch `saved_at` draws the same next batches."""
    first, second = make_sampler(), make_sampler()
    for _ in range(saved_at):
        first.batch(batch)
    second.set_state(first.state())
    assert [[p.query for p in first.batch(batch)] for _ in range(then)] == \
        [[p.query for p in second.batch(batch)] for _ in range(then)]


def test_short_long_from_batch_ends_long_long_batches_and_survives_resume():
    from llm2clip import instructions
    from llm2clip.stage1.pairs import CaptionGroup, PairSampler

    groups = [CaptionGroup(f"short {i}", [f"long {i} a", f"long {i} b"]) for i in range(40)]
    pairs = [(f"en {i}", f"zh {i}") for i in range(40)]

    def sampler():
        return PairSampler(groups, pairs, long_long_fraction=0.5, translation_fraction=0.5, seed=0,
                           short_long_from_batch=40)

    one = sampler()
    kinds = [{p.instruction for p in one.batch(8)} for _ in range(200)]
    long_long, translation = {instructions.LONG_TO_LONG}, {instructions.TRANSLATION}
    assert sum(k == long_long for k in kinds[:40]) >= 5  # a quarter of the batches before the switch
    assert not any(k == long_long for k in kinds[40:])  # none after it: those batches pair short with long
    assert 60 <= sum(k == translation for k in kinds[40:]) <= 100  # text pairs keep their half
    _assert_resumes_identically(sampler, batch=8, saved_at=20, then=40)  # across the switch


def test_short_long_from_step_is_validated():
    from llm2clip.stage1.cc import CCConfig

    with pytest.raises(ConfigError, match="short_long_from_step"):
        CCConfig(steps=100, short_long_from_step=-1).validate()
    CCConfig(steps=100, short_long_from_step=200).validate()  # past the last step: never, as mixed_from_step


def _scenes(n_per_colour: int = 12) -> list:
    """Groups whose captions share words within a colour and no content words across colours."""
    from llm2clip.stage1.pairs import CaptionGroup

    colours = ["red", "green", "blue", "pink", "cyan"]
    return [CaptionGroup(f"a {c} shape no{c}{i}", [f"a {c} {c}ish scene no{c}{i} {n}" for n in ("one", "two")])
            for c in colours for i in range(n_per_colour)]


def test_caption_neighbours_find_the_scenes_that_share_words():
    from llm2clip.stage1.pairs import caption_neighbours

    groups = _scenes()
    near = caption_neighbours(groups, 8)  # [60, 8]
    assert near.shape == (60, 8)
    for i, row in enumerate(near):
        assert i not in row and {j // 12 for j in row} == {i // 12}  # its own colour only, never itself


def test_neighbour_batches_draw_one_neighbourhood_with_distinct_shorts_and_in_batch_negatives():
    from llm2clip.stage1.cc import CCConfig
    from llm2clip.stage1.pairs import CaptionGroup, PairSampler

    # group 60 repeats group 0's short caption: the two must never share a batch (a false negative)
    twin = CaptionGroup("a red shape nored0", ["a red redish scene nored0 three", "a red redish scene nored0 four"])
    groups = [*_scenes(), twin]
    sampler = PairSampler(groups, [], long_long_fraction=0.5, translation_fraction=0.0, seed=0, neighbour_batches=11)
    long_owner = {text: i for i, g in enumerate(groups) for text in g.longs}
    for _ in range(40):
        batch = sampler.batch(6)
        rows = [long_owner.get(p.query, long_owner.get(p.positive)) for p in batch]  # each row's image
        negatives = [long_owner.get(p.negative) for p in batch]
        assert len({groups[i].short for i in rows}) == len(rows)  # distinct short captions
        assert len({i % 60 // 12 for i in rows}) == 1  # one colour: one neighbourhood
        for row, neg in zip(rows, negatives, strict=True):
            if neg is not None:  # a long negative names its image; a short one is checked by colour
                assert neg in rows and neg != row
    with pytest.raises(ConfigError, match="neighbour_batches"):
        CCConfig(batch_size=8, neighbour_batches=4).validate()


def test_neighbour_batches_without_enough_distinct_short_captions_name_the_fix():
    from llm2clip.stage1.pairs import CaptionGroup, PairSampler

    groups = [CaptionGroup("a red shape", [f"a red scene {i}"]) for i in range(10)]  # one short caption for all
    sampler = PairSampler(groups, [], long_long_fraction=0.0, translation_fraction=0.0, seed=0, neighbour_batches=9)
    with pytest.raises(ConfigError, match=r"distinct short captions.*neighbour_batches: 0"):
        sampler.batch(4)
