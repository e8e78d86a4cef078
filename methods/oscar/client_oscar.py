"""OSCAR's client work, free of Flower: caption the private images, encode the
captions with the CLIP text tower, average per class (optionally with the
privacy guard's clipping and Gaussian noise).

Light enough for a 2-core edge CPU: one small image-encoder pass per image for
retrieval captioning and one text-encoder pass per distinct caption; no training.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from common import dp
from common.config import RunConfig
from common.datasets import ClientData
from common.maths import kmeans, per_class_mean

from ..base import ClientJob, ClientResult
from . import payload_oscar as P
from .config_oscar import OscarConfig

# dp-epsilon > 0 makes all it uploads (epsilon, delta)-DP (OneShotMethod.private_uploads)
PRIVATE_UPLOADS = True


@dataclass
class EmbedResult:
    """A client's OSCAR release: the per-class embeddings, the captions behind
    them, the timings and the privacy spent."""

    embeddings: P.ClassEmbeddings
    captions: list[str]
    caption_s_per_image: float
    encode_s: float
    dp_sigma: float  # the largest noise std (0: no privacy guard)
    dp_mu: float  # the upload's Gaussian-DP mu (0: no privacy guard)


def caption_images(cfg: RunConfig, data: ClientData) -> tuple[list[str], float]:
    """Caption the client's training images; returns captions and s/image."""
    t0 = time.perf_counter()
    labels = data.train_labels.tolist()
    if cfg.captioner == "oracle":
        # Exact captions: the reference retrieval captioning is measured against.
        caps = [data.info.oracle_caption(y, data.domain) for y in labels]
    else:
        from common.captioner import load_captioner

        texts, bank_labels = data.info.phrase_bank()
        captioner = load_captioner(cfg.captioner, texts, torch.as_tensor(bank_labels))
        given = data.train_labels if cfg.caption_with_labels else None
        caps = captioner.caption(data.train_images, given)
    return caps, (time.perf_counter() - t0) / max(1, len(labels))


def encode_captions(cfg: RunConfig, captions: list[str]) -> torch.Tensor:
    """One embedding per caption; identical captions are encoded once."""
    from common.text_encoder import load_text_encoder

    encoder = load_text_encoder(cfg.text_encoder)
    distinct = sorted(set(captions))
    table = encoder.encode(distinct, cfg.embedding)
    index = {c: i for i, c in enumerate(distinct)}
    return table[torch.tensor([index[c] for c in captions], dtype=torch.long)]


def embed_classes(
    cfg: RunConfig,
    data: ClientData,
    seed: int = 0,
    prototypes: int | None = None,
    dp_mu: float | None = None,
) -> EmbedResult:
    """OSCAR client: caption -> CLIP text embedding -> per-class mean, or
    ``prototypes`` k-means centres per class (default: prototypes-per-class).

    With the privacy guard (``dp_mu`` > 0; default: the whole dp-epsilon /
    dp-delta budget) the embeddings are clipped to dp-clip and the release is
    ``dp_mu``-GDP (``common.dp``): noisy per-class means, or DP-Lloyd centres
    with noisy counts for k > 1; classes are disjoint, so the upload is too."""
    caps, cap_s = caption_images(cfg, data)
    t0 = time.perf_counter()
    emb = encode_captions(cfg, caps)
    sigma = 0.0
    mu = dp.budget_mu(cfg.dp_epsilon, cfg.dp_delta) if dp_mu is None else dp_mu
    k = (
        cfg.options(OscarConfig).prototypes_per_class
        if prototypes is None
        else prototypes
    )
    if mu > 0 and k > 1:
        ids, means, counts, sigma = private_prototypes(
            emb, data.train_labels, k, mu=mu, clip=cfg.dp_clip
        )
    elif mu > 0:
        ids, means, counts, sigma = dp.private_class_means(
            emb, data.train_labels, data.num_classes, mu=mu, clip=cfg.dp_clip
        )
    elif k > 1:
        ids, means, counts = class_prototypes(emb, data.train_labels, k, seed)
    else:
        ids, means, counts = per_class_mean(emb, data.train_labels, data.num_classes)
    return EmbedResult(
        embeddings=P.ClassEmbeddings(ids, means.to(torch.float16), counts),
        captions=caps,
        caption_s_per_image=cap_s,
        encode_s=time.perf_counter() - t0,
        dp_sigma=sigma,
        dp_mu=mu,
    )


def class_prototypes(
    emb: torch.Tensor, labels: torch.Tensor, k: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to ``k`` k-means centres per class of the caption embeddings ``[N, L, D]``:
    ``(class_ids [M], centres [M, L, D], counts [M])``, empty clusters dropped."""
    ids, centres, counts = [], [], []
    for c in labels.unique().tolist():
        x = emb[labels == c]
        flat = x.reshape(len(x), -1)
        cent, assign = kmeans(flat, k, seed=seed + c)
        n = torch.bincount(assign, minlength=len(cent))
        keep = n > 0
        centres.append(cent[keep].reshape(-1, *x.shape[1:]))
        counts.append(n[keep])
        ids += [c] * int(keep.sum())
    return torch.tensor(ids, dtype=torch.int64), torch.cat(centres), torch.cat(counts)


def private_prototypes(
    emb: torch.Tensor, labels: torch.Tensor, k: int, *, mu: float, clip: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Up to ``k`` DP-Lloyd centres per class of the clipped caption embeddings
    (``common.dp.private_kmeans``, ``mu``-GDP per class, classes disjoint):
    ``(class_ids [M], centres [M, L, D] float64, noisy counts [M] >= 1, largest
    sigma)``."""
    ids, centres, counts, sigma = [], [], [], 0.0
    for c in labels.unique().tolist():
        x = emb[labels == c]
        cent, n, s = dp.private_kmeans(x.reshape(len(x), -1), k, mu=mu, clip=clip)
        centres.append(cent.reshape(-1, *x.shape[1:]))
        counts.append(n.round().clamp_min(1).to(torch.int64))
        ids += [c] * len(cent)
        sigma = max(sigma, s)
    return (
        torch.tensor(ids, dtype=torch.int64),
        torch.cat(centres),
        torch.cat(counts),
        sigma,
    )


def collect(job: ClientJob) -> ClientResult:
    """Upload one conditioning vector per class (never images or features).

    With the privacy guard on, nothing computed from the images goes up but
    the private release: no example caption."""
    t0 = time.perf_counter()
    cfg = job.cfg
    r = embed_classes(cfg, job.data, seed=job.seed)
    private = r.dp_mu > 0
    example = r.captions[0][:200] if r.captions and not private else ""
    return ClientResult(
        payload=P.layout(r.embeddings),
        meta={"embedding": cfg.embedding, "example-caption": example},
        metrics={
            "num-examples": float(len(job.data.train_labels)),
            "caption-s-per-image": r.caption_s_per_image,
            "client-s": time.perf_counter() - t0,
        }
        | (dp.spent_metrics(r.dp_mu, cfg.dp_delta, r.dp_sigma) if private else {}),
        half=True,
    )
