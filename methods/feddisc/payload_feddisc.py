"""FedDISC's payload, in the ``class_vectors`` layout (``methods/class_vectors.py``).

``centres``    float16 ``[K, 1, D]``: k-means centres of the client's CLIP image
               embeddings, up to ``feddisc-clusters`` per class (a class with no
               more samples than that sends its samples)
``class_ids``  int64 ``[K]``: the class of each centre, in ``[0, num-classes)``
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import class_vectors

RECORD = "prototypes"
COLLECT_TYPE = "train.prototypes"  # the collect message's type


@dataclass
class Prototypes:
    """A client's k-means centres of its CLIP image embeddings ``[K, 1, D]``
    and their class ids ``[K]``."""

    centres: torch.Tensor  # [K, 1, D]
    class_ids: torch.Tensor  # [K]


def layout(p: Prototypes) -> dict[str, torch.Tensor]:
    """The payload a client sends (``class_vectors`` layout)."""
    return class_vectors.layout("centres", p.centres, p.class_ids)


def unpack(
    tensors: dict[str, torch.Tensor], *, num_classes: int, dim: int, max_per_class: int
) -> Prototypes:
    """Read and check the layout, at most ``max_per_class`` centres per class;
    ``PayloadError`` names what is wrong."""
    centres, ids = class_vectors.unpack(
        tensors,
        "centres",
        shape=(1, dim),
        num_classes=num_classes,
        hint="another image encoder?",
        max_per_class=max_per_class,
        per_class_key="feddisc-clusters",
    )
    return Prototypes(centres, ids)
