"""FedDISC's client work, free of Flower: encode the private images with the CLIP
image tower, cluster each class's embeddings with k-means and upload the centres.

One image-encoder pass per image and a small k-means: light enough for an edge
CPU (``client-s`` measures it).
"""

from __future__ import annotations

import time

import torch

from common.maths import kmeans

from ..base import ClientJob, ClientResult
from . import payload_feddisc as P
from .config_feddisc import FedDiscConfig


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


def collect(job: ClientJob) -> ClientResult:
    from common.captioner import load_image_encoder

    t0 = time.perf_counter()
    k = job.cfg.options(FedDiscConfig).feddisc_clusters
    encoder = load_image_encoder(
        job.cfg.captioner if job.cfg.captioner != "oracle" else "embedded"
    )
    emb = encoder.encode(job.data.train_images)
    protos = prototypes(emb, job.data.train_labels, k, job.seed)
    return ClientResult(
        payload=P.layout(protos),
        metrics={
            "num-examples": float(len(job.data.train_labels)),
            "client-s": time.perf_counter() - t0,
        },
        half=True,
    )
