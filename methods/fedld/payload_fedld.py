"""FedLD's payload: Gaussian mixtures of the generator-space latents per class, the
one place its layout is written (client packs with ``layout``, server reads with
``unpack``).

``class_ids``  int64 ``[M]``: the class of each component, ids in
               ``[0, num-classes)``, each at most ``fedld-components`` times
``counts``     int64 ``[M]``: images whose likeliest component it is, positive
               (the mixture weight of a component is its share of its class)
``means``      float16 ``[M, C, H, W]``: component means, in the space the
               generator's UNet denoises (scaled VAE latents, or pixels)
``variances``  float16 ``[M, C, H, W]``: diagonal variances, in
               ``[VAR_FLOOR / 2, MAX_VARIANCE]``
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common import contract as C
from common.contract import PayloadError

from .maths_fedld import VAR_FLOOR

RECORD = "mixtures"  # the ArrayRecord that carries the payload
COLLECT_TYPE = "train.mixtures"  # the collect message's type
MAX_VARIANCE = 1e4  # fp16 holds 6.5e4; latents of any sane VAE are far inside
MAX_ABS_MEAN = 1e4


@dataclass
class ClassMixtures:
    """One client's upload: per component its class id, image count, mean and
    diagonal variance in the generator's space."""

    class_ids: torch.Tensor  # [M] int64
    counts: torch.Tensor  # [M] int64
    means: torch.Tensor  # [M, C, H, W]
    variances: torch.Tensor  # [M, C, H, W]


def layout(m: ClassMixtures) -> dict[str, torch.Tensor]:
    """The record's tensors: ids and counts as int64, means and variances as
    fp16."""
    return {
        "class_ids": m.class_ids.to(torch.int64),
        "counts": m.counts.to(torch.int64),
        "means": m.means.to(torch.float16),
        "variances": m.variances.to(torch.float16),
    }


def unpack(
    tensors: dict[str, torch.Tensor],
    *,
    num_classes: int,
    shape: tuple[int, int, int],
    per_class: int,
) -> ClassMixtures:
    """Read and check the layout; ``PayloadError`` names what is wrong.

    ``shape``: ``(C, H, W)`` the server's generator denoises; ``per_class``: the
    run's ``fedld-components``."""
    what = "mixtures payload"
    ids = C.require(tensors, "class_ids", what)
    if ids.ndim == 1 and len(ids) == 0:
        raise PayloadError(
            "no mixture: the client holds no class with fedld-min-per-component images"
        )
    counts = C.require(tensors, "counts", what)
    means = C.require(tensors, "means", what)
    var = C.require(tensors, "variances", what)
    C.check_int_ids(ids, "class_ids", num_classes, per_class, "fedld-components")
    if counts.dtype != torch.int64 or counts.ndim != 1:
        raise PayloadError(
            f"counts must be 1-d int64, got {counts.dtype} {tuple(counts.shape)}"
        )
    for name, t in (("means", means), ("variances", var)):
        C.check_rows(t, name, tuple(shape), C.LATENT_HINT, rows="M", min_rows=0)
    if not (len(ids) == len(counts) == len(means) == len(var)) or len(ids) == 0:
        raise PayloadError(
            f"{len(ids)} class ids, {len(counts)} counts, {len(means)} means, "
            f"{len(var)} variances: expected the same M >= 1"
        )
    if (counts <= 0).any() or (counts > C.MAX_EXAMPLES).any():
        raise PayloadError(f"counts must be in [1, {C.MAX_EXAMPLES}]")
    v = var.float()
    if (v < VAR_FLOOR / 2).any() or (v > MAX_VARIANCE).any():
        raise PayloadError(
            f"variances must be in [{VAR_FLOOR / 2:g}, {MAX_VARIANCE:g}], got "
            f"[{float(v.min()):.3g}, {float(v.max()):.3g}]"
        )
    if (means.float().abs() > MAX_ABS_MEAN).any():
        raise PayloadError(f"means must be within +-{MAX_ABS_MEAN:g}")
    return ClassMixtures(ids, counts, means, var)
