"""DOSFL's payload: one client's distilled set, the one place its layout is
written (client packs with ``layout``, server reads with ``unpack``).

``class_ids``  int64 ``[B]``: the class of image ``b`` of every batch, distinct
               ids in ``[0, num-classes)`` (the classes the client holds)
``images``     float32 ``[S, B, C, H, W]``: the distilled images, batch after
               batch (``S = dosfl-steps``; the clients' pixel scale, not clamped)
``labels``     float32 ``[S, B, K]``: their soft labels, rows in ``[0, 1]``
               summing to 1
``lrs``        float32 ``[E * S]``: the learned step sizes, in ``(0, MAX_LR]``
               (``E = dosfl-epochs``)

Everything goes up in fp32: the server replays the steps, and the distilled
images are tuned to the exact initial weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common import contract as C
from common.contract import PayloadError

from .maths_dosfl import Steps

RECORD = "distilled"  # the ArrayRecord that carries the payload
MAX_LR = 100.0  # a step size beyond this is no distillation result
MAX_ABS_PIXEL = 1e3  # distilled pixels leave [-1, 1], not by orders of magnitude
LABEL_TOLERANCE = 1e-3  # |sum_k q_k - 1| allowed (fp32 softmax)


@dataclass(frozen=True)
class Shape:
    """What the server expects: ``S``, ``E``, ``K`` and an image's
    ``(C, H, W)``."""

    steps: int
    epochs: int
    num_classes: int
    image: tuple[int, int, int]


@dataclass
class Upload:
    """One client's checked upload."""

    class_ids: torch.Tensor  # [B] int64
    steps: Steps


def layout(class_ids: torch.Tensor, steps: Steps) -> dict[str, torch.Tensor]:
    """The record's tensors: ids as int64, the rest as contiguous fp32."""
    return {
        "class_ids": class_ids.to(torch.int64),
        "images": steps.images.detach().float().contiguous(),
        "labels": steps.labels.detach().float().contiguous(),
        "lrs": steps.lrs.detach().float().contiguous(),
    }


def unpack(tensors: dict[str, torch.Tensor], shape: Shape) -> Upload:
    """Read and check the layout; ``PayloadError`` names what is wrong."""
    what = "distilled payload"
    ids = C.require(tensors, "class_ids", what)
    images = C.require(tensors, "images", what)
    labels = C.require(tensors, "labels", what)
    lrs = C.require(tensors, "lrs", what)
    extra = sorted(set(tensors) - {"class_ids", "images", "labels", "lrs"})
    if extra:
        raise PayloadError(f"{what} has unexpected tensors {extra[:3]}")
    # 1. Ids: the classes of a batch, distinct, in range
    C.check_int_ids(ids, "class_ids", shape.num_classes)
    b = len(ids)
    if b == 0:
        raise PayloadError("class_ids is empty: a distilled batch holds >= 1 image")
    # 2. Shapes and dtypes
    want = {
        "images": (shape.steps, b, *shape.image),
        "labels": (shape.steps, b, shape.num_classes),
        "lrs": (shape.epochs * shape.steps,),
    }
    for name, t in (("images", images), ("labels", labels), ("lrs", lrs)):
        if t.dtype != torch.float32:
            raise PayloadError(f"{name} has dtype {t.dtype}, expected float32")
        if tuple(t.shape) != want[name]:
            raise PayloadError(
                f"{name} has shape {tuple(t.shape)}, expected {list(want[name])} "
                "(dosfl-steps, dosfl-epochs, image-size and the classes must match "
                "the server's)"
            )
        C.check_float(t, name)
    # 3. Values: bounded pixels, distributions, positive step sizes
    if (images.abs() > MAX_ABS_PIXEL).any():
        raise PayloadError(f"images has pixels beyond +-{MAX_ABS_PIXEL:g}")
    if (labels < 0).any() or (labels > 1).any():
        raise PayloadError("labels has values outside [0, 1]")
    dev = float((labels.sum(-1) - 1).abs().max())
    if dev > LABEL_TOLERANCE:
        raise PayloadError(f"labels rows sum to 1 +- {dev:.3g}, not within 1e-3")
    if (lrs <= 0).any() or (lrs > MAX_LR).any():
        raise PayloadError(
            f"lrs has step sizes in [{float(lrs.min()):.3g}, {float(lrs.max()):.3g}]"
            f", outside (0, {MAX_LR:g}]"
        )
    return Upload(ids, Steps(images, labels, lrs))
