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
    if ids.dtype != torch.int64 or ids.ndim != 1 or len(ids) != len(centres):
        raise PayloadError(
            f"class_ids must be int64 [{len(centres)}], got {ids.dtype} {tuple(ids.shape)}"
        )
    bad = [i for i in ids.tolist() if not 0 <= i < num_classes]
    if bad:
        raise PayloadError(
            f"class_ids has value(s) {bad[:5]} outside [0, {num_classes})"
        )
    counts = torch.bincount(ids, minlength=num_classes)
    if int(counts.max()) > max_per_class:
        raise PayloadError(
            f"{int(counts.max())} centres for one class, more than feddisc-clusters={max_per_class}"
        )
    C.check_float(centres, "centres")
    return Prototypes(centres, ids)
