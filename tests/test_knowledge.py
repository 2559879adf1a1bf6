"""Knowledge-CLIP: losses against direct formulas, k-means concepts and soft labels, the model's heads."""

import numpy as np
import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

from llm2clip.errors import ConfigError, DataError
from llm2clip.knowledge.concepts import ConceptConfig, Concepts, fit_concepts, reseed_empty_clusters, soft_labels
from llm2clip.knowledge.model import HeadsConfig, KnowledgeCLIP
from llm2clip.losses import embedding_distillation_loss, soft_concept_loss

LLM_DIM, K = 24, 5


def test_distillation_loss_is_the_squared_distance_summed_over_width_and_averaged_over_the_batch():
    g = torch.Generator().manual_seed(0)
    text, llm = torch.randn(6, 16, generator=g), torch.randn(6, LLM_DIM, generator=g)
    w_e = torch.nn.Linear(16, LLM_DIM)
    predicted = w_e(text)
    direct = sum(((predicted[i] - llm[i]) ** 2).sum() for i in range(6)) / 6  # ‖E_T(c)·W_e − LLM(c)‖²
    assert torch.allclose(embedding_distillation_loss(predicted, llm), direct)
    with pytest.raises(ValueError, match="W_e's output width"):
        embedding_distillation_loss(predicted, llm[:, :8])


def test_soft_concept_loss_is_the_kl_divergence_and_zero_for_a_perfect_classifier():
    g = torch.Generator().manual_seed(1)
    logits, target_logits = torch.randn(4, K, generator=g), torch.randn(4, K, generator=g)
    target = target_logits.softmax(-1)
    pred = logits.softmax(-1)
    direct = (target * (target.log() - pred.log())).sum(-1).mean()
    assert torch.allclose(soft_concept_loss(logits, target), direct, atol=1e-6)
    assert soft_concept_loss(target_logits, target).abs() < 1e-6


def test_soft_labels_sum_to_one_and_sharpen_as_the_temperature_falls():
    g = torch.Generator().manual_seed(2)
    points, centroids = torch.randn(32, 8, generator=g), torch.randn(K, 8, generator=g)
    entropies, peaks = [], []
    for tau in (4.0, 1.0, 0.25, 0.05):
        p = soft_labels(points, centroids, tau)  # [32, K]
        assert p.shape == (32, K) and torch.allclose(p.sum(-1), torch.ones(32))
        entropies.append(-(p * p.clamp_min(1e-12).log()).sum(-1).mean().item())
        peaks.append(p.max(-1).values.mean().item())
    assert entropies == sorted(entropies, reverse=True) and peaks == sorted(peaks)
    nearest = torch.cdist(points, centroids).argmin(-1)
    assert torch.equal(soft_labels(points, centroids, 1e-4).argmax(-1), nearest) and peaks[-1] > 0.9


def _blobs(n_per: int = 40, k: int = 4, dim: int = 16, seed: int = 0):
    """k well-separated blobs (in direction, since concepts cluster centred unit vectors)."""
    g = torch.Generator().manual_seed(seed)
    centres = 6 * torch.eye(dim)[:k] - 3 * torch.eye(dim)[k:2 * k]
    truth = torch.arange(k).repeat_interleave(n_per)
    return centres[truth] + 0.3 * torch.randn(k * n_per, dim, generator=g), truth


def test_kmeans_recovers_separable_clusters_and_records_its_fit(tmp_path):
    from sklearn.metrics import adjusted_rand_score

    vectors, truth = _blobs()
    concepts = fit_concepts(vectors, ConceptConfig(num_concepts=4, temperature=0.1), seed=0)
    assert adjusted_rand_score(truth.numpy(), concepts.assign(vectors).numpy()) == 1.0
    assert concepts.info["reseeded"] == 0 and concepts.info["empty_clusters"] == 0
    assert concepts.info["cluster_sizes"] == {"min": 40, "median": 40.0, "max": 40}
    labels = concepts.labels(vectors)  # [160, 4]: each blob's mass on its own cluster
    assert torch.allclose(labels.sum(-1), torch.ones(160)) and (labels.max(-1).values > 0.9).all()
    reloaded = Concepts.load(concepts.save(tmp_path / "c"), dim=16)
    assert torch.equal(reloaded.labels(vectors), labels)


def test_an_empty_cluster_is_reseeded_at_the_worst_fitting_point_and_counted():
    points = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.2, 5.0], [9.0, 0.0]])
    centroids = np.array([[0.05, 0.0], [5.1, 5.0], [100.0, 100.0]])  # the third attracts nothing
    labels = np.array([0, 0, 1, 1, 1])  # the outlier (9, 0) sits badly in cluster 1
    moved, count = reseed_empty_clusters(points, centroids, labels)
    assert count == 1 and np.array_equal(moved[2], points[4]) and np.array_equal(moved[:2], centroids[:2])
    assert reseed_empty_clusters(points, moved, np.array([0, 0, 1, 1, 2]))[1] == 0


def test_too_many_concepts_for_the_captions_is_a_clear_error():
    vectors, _ = _blobs(n_per=2)  # 8 captions
    with pytest.raises(DataError, match="num_concepts=9 is larger than the 8 caption embeddings"):
        fit_concepts(vectors, ConceptConfig(num_concepts=9))
    duplicated = vectors[:3].repeat(4, 1)  # 12 captions, 3 distinct
    with pytest.raises(DataError, match="3 distinct"):
        fit_concepts(duplicated, ConceptConfig(num_concepts=4))
    with pytest.raises(ConfigError, match="temperature"):
        ConceptConfig(temperature=0).validate()


def test_concepts_refuse_vectors_of_another_width(tmp_path):
    vectors, _ = _blobs()
    folder = fit_concepts(vectors, ConceptConfig(num_concepts=4)).save(tmp_path / "c")
    with pytest.raises(ConfigError, match="fit on 16-wide LLM vectors but the cache holds 32-wide"):
        Concepts.load(folder, dim=32)
    with pytest.raises(ConfigError, match="refit"):
        Concepts.load(folder).labels(torch.randn(2, 32))


def _tiny_knowledge_clip(world) -> KnowledgeCLIP:
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(world / "tokenizer")
    tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=77, eos_token_id=tokenizer.eos_token_id,
                          bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=16)
    clip = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16))
    return KnowledgeCLIP(clip, tokenizer, HeadsConfig(llm_dim=LLM_DIM, num_concepts=K))


def test_knowledge_clip_forward_computes_each_term_from_its_heads_and_round_trips(world, tmp_path):
    model = _tiny_knowledge_clip(world)
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    batch = {**model.tokenize(["a red circle", "a blue square on a white background", "two objects"]),
             "llm": torch.randn(3, LLM_DIM, generator=g), "concepts": torch.randn(3, K, generator=g).softmax(-1)}
    image, text, _, bias, terms = model(pixels, batch)
    assert image.shape == text.shape == (3, 16) and bias is None
    assert torch.allclose(image.norm(dim=-1), torch.ones(3), atol=1e-5)
    direct_emb = ((model.heads["distill"](text) - batch["llm"]) ** 2).sum(-1).mean()
    assert torch.allclose(terms["emb"], direct_emb)
    image_kl = soft_concept_loss(10.0 * model.heads["concept"](image), batch["concepts"])
    text_kl = soft_concept_loss(10.0 * model.heads["concept"](text), batch["concepts"])
    assert torch.allclose(terms["concept"], (image_kl + text_kl) / 2)
    assert len(model(pixels, {k: batch[k] for k in ("input_ids", "attention_mask")})) == 4  # plain CLIP use
    with pytest.raises(ConfigError, match="another LLM"):
        model(pixels, {**batch, "llm": torch.randn(3, LLM_DIM + 1)})
    model.info["concepts_id"] = "abc"
    model.save_pretrained(tmp_path / "kc")
    again = KnowledgeCLIP.from_pretrained(tmp_path / "kc")
    assert again.info["concepts_id"] == "abc" and again.loss_weights == model.loss_weights
    with torch.no_grad():
        assert torch.allclose(again(pixels, batch)[4]["emb"], model.eval()(pixels, batch)[4]["emb"], atol=1e-5)
    plain = CLIPModel.from_pretrained(tmp_path / "kc")  # the folder is a stock CLIP folder
    assert plain.config.projection_dim == 16
    with pytest.raises(ConfigError, match="not a Knowledge-CLIP folder"):
        KnowledgeCLIP.from_pretrained(tmp_path)


def test_fit_reseeds_a_cluster_left_empty_by_kmeans_and_counts_it(monkeypatch):
    """scikit-learn relocates clusters that empty while it iterates; one still empty at the end (as with
    many duplicate captions) goes through our reseed-and-refit loop. Simulated: the first fit's last
    centroid is moved away from every point."""
    import sklearn.cluster

    real = sklearn.cluster.KMeans
    calls = []

    class FirstFitLeavesOneEmpty(real):
        def fit(self, x, y=None, sample_weight=None):
            super().fit(x)
            calls.append(self.init if isinstance(self.init, str) else "centroids")
            if len(calls) == 1:
                self.cluster_centers_[-1] = 100.0
                self.labels_ = self.predict(x)
            return self

    monkeypatch.setattr(sklearn.cluster, "KMeans", FirstFitLeavesOneEmpty)
    vectors, _ = _blobs()
    concepts = fit_concepts(vectors, ConceptConfig(num_concepts=4), seed=0)
    assert calls == ["k-means++", "centroids"]  # refit from the reseeded centroids
    assert concepts.info["reseeded"] == 1 and concepts.info["empty_clusters"] == 0
    assert concepts.info["cluster_sizes"]["min"] > 0
