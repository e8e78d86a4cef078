"""FGL-instance's payload: one encoded caption per uploaded image, the one place its
layout is written (client packs with ``layout``, server reads with ``unpack``).

``embeddings``  float16 ``[N, tokens, dim]``: the text encoder's embedding of each
                image's caption (pooled: one token; sequence: SD's token states)
``class_ids``   int64 ``[N]``: each image's class, ids in ``[0, num-classes)``
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common import contract as C
from common.contract import PayloadError

RECORD = "instances"  # the ArrayRecord that carries the payload
COLLECT_TYPE = "train.instances"  # the collect message's type


@dataclass
class InstanceEmbeddings:
    """One client's upload: one encoded caption per training image and its class
    id."""

    class_ids: torch.Tensor  # [N] int64
    embeddings: torch.Tensor  # [N, tokens, dim]


def layout(e: InstanceEmbeddings) -> dict[str, torch.Tensor]:
    """The record's tensors: embeddings as fp16, class ids as int64."""
    return {
        "embeddings": e.embeddings.to(torch.float16),
        "class_ids": e.class_ids.to(torch.int64),
    }


def unpack(
    tensors: dict[str, torch.Tensor],
    *,
    num_classes: int,
    tokens: int,
    dim: int,
    per_class: int = 0,
) -> InstanceEmbeddings:
    """Read and check the layout; ``PayloadError`` names what is wrong.

    ``per_class``: the run's ``fgl-instances-per-class`` (0: no bound beyond the
    upload limit)."""
    emb = C.require(tensors, "embeddings", "instances payload")
    ids = C.require(tensors, "class_ids", "instances payload")
    C.check_rows(emb, "embeddings", (tokens, dim), C.EMBEDDING_HINT, min_rows=0)
    if ids.dtype != torch.int64 or ids.ndim != 1:
        raise PayloadError(
            f"class_ids must be 1-d int64, got {ids.dtype} {tuple(ids.shape)}"
        )
    if len(ids) != len(emb) or len(ids) == 0:
        raise PayloadError(f"{len(emb)} embeddings for {len(ids)} class ids")
    if ((ids < 0) | (ids >= num_classes)).any():
        bad = ids[(ids < 0) | (ids >= num_classes)][:5].tolist()
        raise PayloadError(f"class_ids has value(s) {bad} outside [0, {num_classes})")
    if per_class > 0:
        most = int(torch.bincount(ids, minlength=num_classes).max())
        if most > per_class:
            raise PayloadError(
                f"{most} instances of one class, more than "
                f"fgl-instances-per-class={per_class}"
            )
    return InstanceEmbeddings(ids, emb)
