"""Concept learning, offline: k-means over the LLM's caption embeddings, and soft concept labels.

    vectors [N, D] (the embedding cache) -> centre, L2-normalise -> scikit-learn KMeans -> centroids [K, D]
    soft label of a caption = softmax(-‖x - μ_k‖² / τ) over the K centroids             -> [K], sums to 1

Choices the paper leaves open (docs/KNOWLEDGE_CLIP.md):
- Geometry: the stage-1 embedder is trained and compared by cosine, and its vectors are anisotropic
  (mean pairwise cosine ~0.6 in the tiny world), so they are centred on the training mean and
  L2-normalised before clustering, as LLM2CLIP's adapter does before reading them.
- Soft labels: a softmax over negative squared distances to the centroids (the k-means objective's
  own distance); τ sets how much a caption near a boundary shares its mass.
- Empty clusters: scikit-learn relocates clusters that empty during its Lloyd iterations. A cluster
  still empty in the final assignment (possible with many duplicate captions) is reseeded at the
  worst-fitting caption and k-means reruns from there; `reseeded` counts these.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from ..guards import require_finite_vectors

CENTROIDS, META = "concepts.safetensors", "concepts.json"


@dataclass
class ConceptConfig:
    num_concepts: int = 64  # K, the number of k-means clusters
    temperature: float = 0.1  # τ in softmax(-‖x - μ_k‖² / τ) over unit-norm vectors; lower = sharper
    fields: list[str] = field(default_factory=list)  # cached caption fields to cluster; [] = every field
    n_init: int = 3  # k-means restarts; the lowest inertia wins
    max_iter: int = 300
    out: str = "${run.out_dir}/knowledge_clip/concepts"

    def validate(self) -> None:
        if self.num_concepts < 2:
            raise ConfigError("knowledge_clip.concepts.num_concepts must be >= 2")
        if self.temperature <= 0:
            raise ConfigError("knowledge_clip.concepts.temperature must be > 0")
        if self.n_init < 1 or self.max_iter < 1:
            raise ConfigError("knowledge_clip.concepts: n_init and max_iter must be >= 1")


def soft_labels(points: torch.Tensor, centroids: torch.Tensor, temperature: float) -> torch.Tensor:
    """points [B, D], centroids [K, D] (same space) -> [B, K] = softmax(-squared distance / τ)."""
    distances = torch.cdist(points.float(), centroids.float()).pow(2)  # [B, K]
    return torch.softmax(-distances / temperature, dim=-1)


def reseed_empty_clusters(points: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Move each empty cluster's centroid onto the point that fits its own cluster worst (a fresh point
    per empty cluster). points [N, D], centroids [K, D], labels [N] -> (new centroids [K, D], number moved)."""
    k = centroids.shape[0]
    empty = np.flatnonzero(np.bincount(labels, minlength=k) == 0)
    if not len(empty):
        return centroids, 0
    misfit = ((points - centroids[labels]) ** 2).sum(1)  # [N]
    worst = np.argsort(-misfit, kind="stable")[: len(empty)]
    centroids = centroids.copy()
    centroids[empty] = points[worst]
    return centroids, len(empty)


class Concepts:
    """Fitted concepts: the centre and centroids, and the soft labels they give any LLM vector."""

    def __init__(self, centroids: torch.Tensor, center: torch.Tensor, temperature: float, info: dict):
        self.centroids, self.center, self.temperature, self.info = centroids, center, temperature, info

    @property
    def num_concepts(self) -> int:
        return self.centroids.shape[0]

    @property
    def dim(self) -> int:
        return self.centroids.shape[1]

    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        """LLM vectors [B, D] -> the clustering space (centred, unit norm) [B, D]."""
        if vectors.shape[-1] != self.dim:
            raise ConfigError(f"LLM vectors are {vectors.shape[-1]} wide but the concepts were fit on {self.dim}-wide "
                              "ones (another LLM?). Fix: refit them with `llm2clip knowledge concepts --force`")
        require_finite_vectors(vectors)
        return F.normalize(vectors.float() - self.center, dim=-1)

    def labels(self, vectors: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        """LLM vectors [B, D] -> soft concept labels [B, K] (rows sum to 1)."""
        return soft_labels(self.project(vectors), self.centroids, temperature or self.temperature)

    def assign(self, vectors: torch.Tensor) -> torch.Tensor:
        """Hard cluster index of each vector [B] (the k-means assignment)."""
        return torch.cdist(self.project(vectors), self.centroids).argmin(-1)

    def save(self, folder: str | os.PathLike) -> Path:
        """Atomically: tensors first, then the JSON that marks the folder complete."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (CENTROIDS + ".tmp")
        save_file({"centroids": self.centroids.contiguous(), "center": self.center.contiguous()}, str(tmp))
        os.replace(tmp, folder / CENTROIDS)
        meta = {"num_concepts": self.num_concepts, "dim": self.dim, "temperature": self.temperature, **self.info}
        tmp = folder / (META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(tmp, folder / META)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, dim: int | None = None, cache_fingerprint: dict | None = None) -> Concepts:
        """Refuses concepts fit on vectors of another width or from another cache (`cache_fingerprint`)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / META).is_file():
            raise ConfigError(f"{folder} holds no fitted concepts ({META} missing). Fix: `llm2clip knowledge concepts`")
        meta = json.loads((folder / META).read_text())
        if dim is not None and meta["dim"] != dim:
            raise ConfigError(f"the concepts in {folder} were fit on {meta['dim']}-wide LLM vectors but the cache "
                              f"holds {dim}-wide ones. Fix: `llm2clip knowledge concepts --force` refits them")
        if cache_fingerprint is not None and meta.get("cache_fingerprint") not in (None, cache_fingerprint):
            raise ConfigError(f"the concepts in {folder} were fit on another embedding cache (its embedder or dtype "
                              "changed). Fix: `llm2clip knowledge concepts --force`")
        tensors = load_file(str(folder / CENTROIDS))
        info = {k: v for k, v in meta.items() if k not in ("num_concepts", "dim", "temperature")}
        return cls(tensors["centroids"], tensors["center"], meta["temperature"], info)


def fit_concepts(vectors: torch.Tensor, cfg: ConceptConfig, seed: int = 0, max_reseed_rounds: int = 5) -> Concepts:
    """k-means (scikit-learn) on caption embeddings [N, D]; returns the fitted `Concepts`."""
    from sklearn.cluster import KMeans

    cfg.validate()
    n, k = vectors.shape[0], cfg.num_concepts
    if k > n:
        raise DataError(f"knowledge_clip.concepts.num_concepts={k} is larger than the {n} caption embeddings to "
                        f"cluster. Fix: set num_concepts <= {n}, or cache more captions")
    center = vectors.float().mean(0)
    points = F.normalize(vectors.float() - center, dim=-1)  # [N, D]
    distinct = torch.unique(points, dim=0).shape[0]
    if k > distinct:
        raise DataError(f"knowledge_clip.concepts.num_concepts={k} is larger than the {distinct} distinct caption "
                        f"embeddings ({n} in all, many duplicates). Fix: set num_concepts <= {distinct}")
    x = points.numpy().astype(np.float64)
    km = KMeans(n_clusters=k, n_init=cfg.n_init, max_iter=cfg.max_iter, random_state=seed).fit(x)
    centroids, labels, reseeded = km.cluster_centers_, km.labels_, 0
    for _ in range(max_reseed_rounds):
        centroids, moved = reseed_empty_clusters(x, centroids, labels)
        if not moved:
            break
        reseeded += moved
        km = KMeans(n_clusters=k, init=centroids, n_init=1, max_iter=cfg.max_iter, random_state=seed).fit(x)
        centroids, labels = km.cluster_centers_, km.labels_
    sizes = np.bincount(labels, minlength=k)
    concepts = Concepts(torch.from_numpy(centroids).float(), center, cfg.temperature, {})
    probs = concepts.labels(vectors)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)  # [N], nats
    concepts.info = {"num_vectors": n, "distinct_vectors": distinct, "inertia": float(km.inertia_),
                     "reseeded": reseeded, "empty_clusters": int((sizes == 0).sum()),
                     "cluster_sizes": {"min": int(sizes.min()), "median": float(np.median(sizes)),
                                       "max": int(sizes.max())},
                     "label_max_probability": round(probs.max(-1).values.mean().item(), 4),
                     "label_effective_concepts": round(entropy.exp().mean().item(), 2), "seed": seed}
    return concepts
