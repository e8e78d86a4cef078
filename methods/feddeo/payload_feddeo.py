"""FedDEO's payload, in the ``class_vectors`` layout (``methods/class_vectors.py``).

``descriptions``  float16 ``[K, L, D]``: one learned description per class of the
                  client, in the generator's conditioning shape (``[K, 1, D]``
                  pooled; ``[K, 77, 768]`` for Stable Diffusion 1.5)
``class_ids``     int64 ``[K]``: distinct ids in ``[0, num-classes)``
"""

from __future__ import annotations

import torch

from ..class_vectors import ClassVectors, Layout

RECORD = "descriptions"
COLLECT_TYPE = "train.describe"  # the collect message's type
LAYOUT = Layout(
    "descriptions",
    hint="the generator's conditioning shape; another generator or embedding kind?",
)

# A client's learned descriptions [K, L, D] and their class ids [K]
Descriptions = ClassVectors
layout = LAYOUT.pack  # the payload a client sends


def unpack(
    tensors: dict[str, torch.Tensor], *, num_classes: int, tokens: int, dim: int
) -> Descriptions:
    """Read and check the layout, at most one description per class (distinct
    ids, hence K <= num-classes); ``PayloadError`` names what is wrong."""
    return LAYOUT.unpack(tensors, shape=(tokens, dim), num_classes=num_classes)
