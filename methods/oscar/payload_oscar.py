"""OSCAR's payload: conditioning vectors per class, the one place its layout is
written (client packs with ``layout``, server reads with ``unpack``).

``{prefix}mean``       float16 ``[K, tokens, dim]``: per-class mean embedding (or,
                       with ``prototypes-per-class`` > 1, k-means centres)
``{prefix}class_ids``  int64 ``[K]``: ids in ``[0, num-classes)``, each at most
                       ``per_class`` times
``{prefix}counts``     int64 ``[K]``: images behind each vector, positive
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common import contract as C
from common.contract import PayloadError

RECORD = "embeddings"  # the ArrayRecord that carries the payload
COLLECT_TYPE = "train.embed"  # the collect message's type
MAX_COUNT = C.MAX_EXAMPLES


@dataclass
class ClassEmbeddings:
    """Conditioning vectors ``[K, tokens, dim]`` with their class ids ``[K]``
    and the number of images behind each ``[K]``."""

    class_ids: torch.Tensor  # [K] int64
    means: torch.Tensor  # [K, tokens, dim]
    counts: torch.Tensor  # [K] int64


def layout(e: ClassEmbeddings, prefix: str = "") -> dict[str, torch.Tensor]:
    """The payload a client sends (keys under ``prefix``)."""
    return {
        f"{prefix}mean": e.means.to(torch.float16),
        f"{prefix}class_ids": e.class_ids.to(torch.int64),
        f"{prefix}counts": e.counts.to(torch.int64),
    }


def unpack(
    tensors: dict[str, torch.Tensor],
    *,
    num_classes: int,
    tokens: int,
    dim: int,
    prefix: str = "",
    per_class: int = 1,
) -> ClassEmbeddings:
    """Read and check the layout; ``PayloadError`` names what is wrong."""
    mean = C.require(tensors, f"{prefix}mean", "embeddings payload")
    ids = C.require(tensors, f"{prefix}class_ids", "embeddings payload")
    counts = C.require(tensors, f"{prefix}counts", "embeddings payload")
    C.check_rows(mean, "mean", (tokens, dim), C.EMBEDDING_HINT, rows="K", min_rows=0)
    C.check_int_ids(ids, "class_ids", num_classes, per_class, "prototypes-per-class")
    if counts.dtype != torch.int64 or counts.ndim != 1:
        raise PayloadError(
            f"counts must be 1-d int64, got {counts.dtype} {tuple(counts.shape)}"
        )
    if not (len(ids) == len(counts) == len(mean)) or len(ids) == 0:
        raise PayloadError(
            f"{len(mean)} means, {len(ids)} class ids, {len(counts)} counts"
        )
    if (counts <= 0).any() or (counts > MAX_COUNT).any():
        raise PayloadError(f"counts must be in [1, {MAX_COUNT}]")
    return ClassEmbeddings(ids, mean, counts)
