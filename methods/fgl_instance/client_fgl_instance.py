"""FGL-instance's client work, free of Flower: caption every private image and
encode each caption (OSCAR's captioner and text encoder, ``methods/oscar``);
upload one embedding per image, with its class. No averaging: the other end of
OSCAR's trade-off between upload size and how closely the server can follow
the client's images.
"""

from __future__ import annotations

import time

import torch

from ..base import ClientJob, ClientResult
from ..oscar.client_oscar import caption_images, encode_captions
from . import payload_fgl_instance as P
from .config_fgl_instance import FglInstanceConfig


def pick_instances(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Indices of the images to upload, ascending: all (``per_class`` 0), or a
    random ``per_class`` of each class drawn from a generator seeded ``seed``."""
    if per_class <= 0:
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in labels.unique().tolist():
        idx = torch.nonzero(labels == c).flatten()
        keep.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(keep).sort().values


def collect(job: ClientJob) -> ClientResult:
    """Upload one caption embedding per (chosen) training image."""
    t0 = time.perf_counter()
    cfg = job.cfg
    opts = cfg.options(FglInstanceConfig)
    idx = pick_instances(job.data.train_labels, opts.fgl_instances_per_class, job.seed)
    data = job.data
    if len(idx) < len(data.train_labels):
        from dataclasses import replace

        data = replace(
            data,
            train_images=data.train_images[idx],
            train_labels=data.train_labels[idx],
        )
    captions, cap_s = caption_images(cfg, data)
    emb = encode_captions(cfg, captions)
    return ClientResult(
        payload=P.layout(P.InstanceEmbeddings(data.train_labels.clone(), emb)),
        meta={
            "embedding": cfg.embedding,
            "example-caption": captions[0][:200] if captions else "",
        },
        metrics={
            "num-examples": float(len(job.data.train_labels)),
            "instances": float(len(captions)),
            # a caption no other image shares singles its image out
            "distinct-caption-fraction": len(set(captions)) / max(1, len(captions)),
            "caption-s-per-image": cap_s,
            "client-s": time.perf_counter() - t0,
        },
        half=True,
    )
