"""FedDEO's payload, the one place its layout is written.

``descriptions``  float16 ``[K, L, D]``: one learned description per class of the
                  client, in the generator's conditioning shape (``[K, 1, D]``
                  pooled; ``[K, 77, 768]`` for Stable Diffusion 1.5)
``class_ids``     int64 ``[K]``: distinct ids in ``[0, num-classes)``
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common import contract as C
from common.contract import PayloadError

RECORD = "descriptions"
KEYS = {"descriptions", "class_ids"}


@dataclass
class Descriptions:
    descriptions: torch.Tensor  # [K, L, D]
    class_ids: torch.Tensor  # [K]


def layout(d: Descriptions) -> dict[str, torch.Tensor]:
    return {
        "descriptions": d.descriptions.detach().to(torch.float16),
        "class_ids": d.class_ids.to(torch.int64),
    }


def unpack(
    tensors: dict[str, torch.Tensor], *, num_classes: int, tokens: int, dim: int
) -> Descriptions:
    """Read and check the layout; ``PayloadError`` names what is wrong."""
    desc = C.require(tensors, "descriptions", "descriptions payload")
    ids = C.require(tensors, "class_ids", "descriptions payload")
    if set(tensors) != KEYS:
        raise PayloadError(f"unexpected payload keys {sorted(set(tensors) - KEYS)}")
    if desc.dtype not in (torch.float16, torch.float32):
        raise PayloadError(f"descriptions have dtype {desc.dtype}, expected float16")
    if desc.ndim != 3 or tuple(desc.shape[1:]) != (tokens, dim) or len(desc) == 0:
        raise PayloadError(
            f"descriptions have shape {tuple(desc.shape)}, expected [K, {tokens}, "
            f"{dim}] (the generator's conditioning shape; another generator or "
            "embedding kind?)"
        )
    # at most one description per class: distinct ids, hence K <= num-classes
    C.check_int_ids(ids, "class_ids", num_classes)
    if len(ids) != len(desc):
        raise PayloadError(f"{len(ids)} class ids for {len(desc)} descriptions")
    C.check_float(desc, "descriptions")
    return Descriptions(desc, ids)
