"""FedBiP's payload, the one place its layout is written (client packs with
``layout``, server reads with ``unpack``).

``latents``           float16 ``[N, C, H, W]``: noised instance latents
                      ``z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) e`` of the
                      client's images, in the space the generator denoises
``latent_class_ids``  int64 ``[N]``: each latent's class, at most
                      ``fedbip-instances-per-class`` per class, every one among
                      ``class_ids``
``domain``            float16 ``[1, H]``: the client's domain token (a text-tower
                      input embedding)
``class_tokens``      float16 ``[K, H]``: one token per class of the client
``class_ids``         int64 ``[K]``: distinct ids in ``[0, num-classes)``

The reply's meta carries ``fedbip-timestep``, the ``t`` of ``abar_t``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common import contract as C
from common.contract import PayloadError

RECORD = "fedbip"  # the ArrayRecord that carries the payload
COLLECT_TYPE = "train.bilevel"  # the collect message's type
KEYS = ("latents", "latent_class_ids", "domain", "class_tokens", "class_ids")
MAX_ABS = 1e4  # fp16 holds 6.5e4; noised latents of any sane VAE are far inside
TIMESTEP = "fedbip-timestep"  # meta key


@dataclass
class BiLevel:
    """One client's upload: instance latents with their classes, the domain
    token and the class tokens with their ids."""

    latents: torch.Tensor  # [N, C, H, W]
    latent_class_ids: torch.Tensor  # [N] int64
    domain: torch.Tensor  # [1, H]
    class_tokens: torch.Tensor  # [K, H]
    class_ids: torch.Tensor  # [K] int64


def layout(p: BiLevel) -> dict[str, torch.Tensor]:
    """The record's tensors: floats in fp16, ids in int64."""
    return {
        "latents": p.latents.detach().to(torch.float16),
        "latent_class_ids": p.latent_class_ids.to(torch.int64),
        "domain": p.domain.detach().to(torch.float16),
        "class_tokens": p.class_tokens.detach().to(torch.float16),
        "class_ids": p.class_ids.to(torch.int64),
    }


def _float(t: torch.Tensor, name: str, shape: tuple[int, ...], hint: str) -> None:
    C.check_rows(t, name, shape, hint, rows="n")
    if (t.float().abs() > MAX_ABS).any():
        raise PayloadError(f"{name} must be within +-{MAX_ABS:g}")


def unpack(
    tensors: dict[str, torch.Tensor],
    *,
    num_classes: int,
    latent_shape: tuple[int, int, int],
    width: int,
    per_class: int,
) -> BiLevel:
    """Read and check the layout; ``PayloadError`` names what is wrong.

    ``latent_shape``: ``(C, H, W)`` the server's generator denoises; ``width``:
    its text tower's token width; ``per_class``: ``fedbip-instances-per-class``.
    """
    what = "fedbip payload"
    got = {k: C.require(tensors, k, what) for k in KEYS}
    if set(tensors) != set(KEYS):
        raise PayloadError(
            f"unexpected payload keys {sorted(set(tensors) - set(KEYS))}"
        )
    gen = "the server's generator: same generator on both sides?"
    te = "the server's text tower: same text-encoder on both sides?"
    _float(got["latents"], "latents", latent_shape, gen)
    _float(got["domain"], "domain", (width,), te)
    _float(got["class_tokens"], "class_tokens", (width,), te)
    if len(got["domain"]) != 1:
        raise PayloadError(f"domain has {len(got['domain'])} rows, expected 1")
    ids = C.check_int_ids(got["class_ids"], "class_ids", num_classes)
    if len(ids) != len(got["class_tokens"]):
        raise PayloadError(
            f"{len(ids)} class ids for {len(got['class_tokens'])} class tokens"
        )
    lat_ids = got["latent_class_ids"]
    C.check_int_ids(
        lat_ids,
        "latent_class_ids",
        num_classes,
        per_class,
        "fedbip-instances-per-class",
    )
    if len(lat_ids) != len(got["latents"]):
        raise PayloadError(
            f"{len(lat_ids)} latent class ids for {len(got['latents'])} latents"
        )
    orphans = sorted(set(lat_ids.tolist()) - set(ids))
    if orphans:
        raise PayloadError(f"latents of class(es) {orphans[:5]} have no class token")
    return BiLevel(
        got["latents"], lat_ids, got["domain"], got["class_tokens"], got["class_ids"]
    )


def timestep(meta: dict[str, object], expected: int) -> int:
    """The reply's ``fedbip-timestep``; ``PayloadError`` unless it is the server's
    own ``expected`` (the latents would be denoised from the wrong noise level)."""
    t = meta.get(TIMESTEP)
    if isinstance(t, bool) or not isinstance(t, int) or t != expected:
        raise PayloadError(
            f"{TIMESTEP}={C.safe_text(t)}: the server starts denoising at {expected} "
            "(same scheduler, num-inference-steps and fedbip-strength on both sides?)"
        )
    return t
