"""FedDISC's payload, in the ``class_vectors`` layout (``methods/class_vectors.py``).

``centres``    float16 ``[K, 1, D]``: k-means centres of the client's CLIP image
               embeddings, up to ``feddisc-clusters`` per class (a class with no
               more samples than that sends its samples)
``class_ids``  int64 ``[K]``: the class of each centre, in ``[0, num-classes)``
"""

from __future__ import annotations

import torch

from ..class_vectors import ClassVectors, Layout

RECORD = "prototypes"
COLLECT_TYPE = "train.prototypes"  # the collect message's type
LAYOUT = Layout("centres", "another image encoder?", per_class_key="feddisc-clusters")

# A client's k-means centres of its CLIP image embeddings [K, 1, D] and their
# class ids [K]
Prototypes = ClassVectors
layout = LAYOUT.pack  # the payload a client sends


def unpack(
    tensors: dict[str, torch.Tensor], *, num_classes: int, dim: int, max_per_class: int
) -> Prototypes:
    """Read and check the layout, at most ``max_per_class`` centres per class;
    ``PayloadError`` names what is wrong."""
    return LAYOUT.unpack(
        tensors, shape=(1, dim), num_classes=num_classes, max_per_class=max_per_class
    )
