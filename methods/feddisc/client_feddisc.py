"""FedDISC's client work, free of Flower: encode the private images with the CLIP
image tower, cluster each class's embeddings with k-means and upload the centres.

One image-encoder pass per image and a small k-means: light enough for an edge
CPU (``client-s`` measures it).
"""

from __future__ import annotations

import time

import torch

from common import dp
from common.maths import kmeans

from ..base import ClientJob, ClientResult
from . import payload_feddisc as P
from .config_feddisc import FedDiscConfig

# dp-epsilon > 0 makes all it uploads (epsilon, delta)-DP (OneShotMethod.private_uploads)
PRIVATE_UPLOADS = True


def prototypes(
    embeddings: torch.Tensor, labels: torch.Tensor, k: int, seed: int
) -> P.Prototypes:
    """Up to ``k`` k-means centres per class (a class with <= k samples: the samples)."""
    centres, ids = [], []
    for c in labels.unique().tolist():
        x = embeddings[labels == c]
        cent = x if len(x) <= k else kmeans(x, k, seed=seed + c)[0]
        centres.append(cent)
        ids += [c] * len(cent)
    return P.Prototypes(
        torch.cat(centres)[:, None, :], torch.tensor(ids, dtype=torch.int64)
    )


def private_prototypes(
    embeddings: torch.Tensor, labels: torch.Tensor, k: int, *, mu: float, clip: float
) -> tuple[P.Prototypes, float]:
    """Up to ``k`` DP-Lloyd centres per class of the clipped image embeddings
    (``common.dp.private_kmeans``: ``mu``-GDP per class, classes disjoint, so
    the upload is ``mu``-GDP), and the largest noise std. A class never sends
    its samples, however few."""
    centres, ids, sigma = [], [], 0.0
    for c in labels.unique().tolist():
        cent, _, s = dp.private_kmeans(embeddings[labels == c], k, mu=mu, clip=clip)
        centres.append(cent.float())
        ids += [c] * len(cent)
        sigma = max(sigma, s)
    protos = P.Prototypes(
        torch.cat(centres)[:, None, :], torch.tensor(ids, dtype=torch.int64)
    )
    return protos, sigma


def collect(job: ClientJob) -> ClientResult:
    """Upload k-means centres of the CLIP image embeddings per class (DP-Lloyd
    centres with the privacy guard), never images."""
    from common.captioner import load_image_encoder

    t0 = time.perf_counter()
    k = job.cfg.options(FedDiscConfig).feddisc_clusters
    encoder = load_image_encoder(
        job.cfg.captioner if job.cfg.captioner != "oracle" else "embedded"
    )
    emb = encoder.encode(job.data.train_images)
    cfg = job.cfg
    mu = dp.budget_mu(cfg.dp_epsilon, cfg.dp_delta)
    private: dict[str, float] = {}
    if mu > 0:
        protos, sigma = private_prototypes(
            emb, job.data.train_labels, k, mu=mu, clip=cfg.dp_clip
        )
        private = dp.spent_metrics(mu, cfg.dp_delta, sigma)
    else:
        protos = prototypes(emb, job.data.train_labels, k, job.seed)
    return ClientResult(
        payload=P.layout(protos),
        metrics={
            "num-examples": float(len(job.data.train_labels)),
            "client-s": time.perf_counter() - t0,
        }
        | private,
        half=True,
    )
