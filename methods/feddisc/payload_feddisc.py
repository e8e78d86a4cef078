"""FedDISC's payload, the one place its layout is written.

``centres``    float16 ``[M, 1, D]``: k-means centres of the client's CLIP image
               embeddings, up to ``feddisc-clusters`` per class (a class with no
               more samples than that sends its samples)
``class_ids``  int64 ``[M]``: the class of each centre, in ``[0, num-classes)``
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common import contract as C
from common.contract import PayloadError

RECORD = "prototypes"


@dataclass
class Prototypes:
    centres: torch.Tensor  # [M, 1, D]
    class_ids: torch.Tensor  # [M]


def layout(p: Prototypes) -> dict[str, torch.Tensor]:
    return {
        "centres": p.centres.to(torch.float16),
        "class_ids": p.class_ids.to(torch.int64),
    }


def unpack(
    tensors: dict[str, torch.Tensor], *, num_classes: int, dim: int, max_per_class: int
) -> Prototypes:
    centres = C.require(tensors, "centres", "prototypes payload")
    ids = C.require(tensors, "class_ids", "prototypes payload")
    if set(tensors) != {"centres", "class_ids"}:
        raise PayloadError(
            f"unexpected payload keys {sorted(set(tensors) - {'centres', 'class_ids'})}"
        )
    if centres.dtype not in (torch.float16, torch.float32):
        raise PayloadError(f"centres have dtype {centres.dtype}, expected float16")
    if centres.ndim != 3 or tuple(centres.shape[1:]) != (1, dim) or len(centres) == 0:
        raise PayloadError(
            f"centres have shape {tuple(centres.shape)}, expected [M, 1, {dim}] "
            "(another image encoder?)"
        )
    C.check_int_ids(ids, "class_ids", num_classes, max_per_class, "feddisc-clusters")
    if len(ids) != len(centres):
        raise PayloadError(f"{len(ids)} class ids for {len(centres)} centres")
    C.check_float(centres, "centres")
    return Prototypes(centres, ids)
