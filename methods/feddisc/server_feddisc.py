"""FedDISC (Yang et al., AAAI 2024, arXiv 2305.04063; code MingzhaoYang/FedDISC):
one-shot FL with image-feature prototypes. Clients upload k-means centres of their
CLIP image embeddings per class; the server samples from each centre with two
guidance terms, ``eps = eps_u + s (eps_centre - eps_u) + s (eps_client - eps_u)``
(``eps_client``: the mean of that client's centres of the class, its domain
feature), and trains the global classifier on the result.

Deviations from the paper's code, which conditions Stable Diffusion 2.1 unCLIP on
the image embedding plus the class name:
* the embedded generator is conditioned on pooled CLIP *text* embeddings, so each
  image-embedding centre is carried into the text-embedding region by a ridge
  map fitted on public (image, caption) pairs from the dataset registry (for
  MNIST the public split the stack was pretrained on), then L2-normalised (with a
  Stable-Diffusion generator, ``embedding="sequence"``, the map's target is the
  caption's whole token sequence ``[L, D]`` the UNet attends to, flattened, not
  normalised; unCLIP generators conditioned on image embeddings directly are
  not supported); the
  modality gap this bridges is measured on held-out public pairs and reported
  in results.json (``feddisc.modality_gap``); the class name is not a separate
  condition (the generator takes one vector);
* labelled clients: the paper's setting is semi-supervised (the server holds a
  few labelled images per class, clients pseudo-label by the nearest server
  prototype); here clients cluster with their true labels, and there is no
  server-side labelled set;
* no unCLIP noise augmentation of the embeddings (level 500 on the client, 200 on
  the server in the code): the embedded generator was not trained with it;
* seeded k-means (the code's sklearn KMeans is unseeded); the domain feature is
  the client's own (the code cycles it through all clients);
* ``images-per-class`` images per (client, class) spread over its centres (the
  code: 10 per centre), the project's classifier instead of a linear probe on
  frozen CLIP-H features.
"""

from __future__ import annotations

from typing import Any

import torch

from common.config import ConfigError
from common.contract import Reply
from common.datasets import public_pairs
from common.maths import apply_linear_map, fit_linear_map

from .. import steps
from ..base import ServerContext, ServerOutput
from . import client_feddisc
from . import payload_feddisc as P
from .config_feddisc import FedDiscConfig


def modality_gap(
    img: torch.Tensor, txt: torch.Tensor, mapped: torch.Tensor
) -> dict[str, float]:
    """Paired cosine and centroid distance of image vs text embeddings, raw (where
    both live in one space: a pooled generator) and mapped."""

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())

    gap = {
        "paired_cosine_mapped": cos(mapped, txt),
        "centroid_distance_mapped": float((mapped.mean(0) - txt.mean(0)).norm()),
    }
    if img.shape[-1] == txt.shape[-1]:
        gap["paired_cosine_raw"] = cos(img, txt)
        gap["centroid_distance_raw"] = float((img.mean(0) - txt.mean(0)).norm())
    return gap


class FedDisc(
    steps.SynthesisMethod, payload=P, client=client_feddisc, config=FedDiscConfig
):
    """FedDISC: clients upload k-means centres of their CLIP image embeddings
    per class; the server maps them into the generator's conditioning, samples
    with each centre and its client's domain feature as guidance terms and trains
    the global classifier."""

    def check(self, ctx: ServerContext) -> None:
        """Fit the image -> text-embedding map on public pairs (before any client works)."""
        from common.captioner import load_image_encoder

        super().check(ctx)
        opts = ctx.cfg.options(FedDiscConfig)
        pairs = public_pairs(ctx.cfg.data_args(), opts.feddisc_map_pairs)
        if pairs is None:
            raise ConfigError(
                f"method='feddisc' with a text-conditioned generator needs public "
                f"(image, caption) pairs to bridge the image-text gap, and "
                f"dataset={ctx.cfg.dataset!r} has none; use dataset='mnist-domains' or "
                "'mnist', or a generator conditioned on image embeddings"
            )
        images, captions = pairs
        encoder_name = (
            ctx.cfg.captioner if ctx.cfg.captioner != "oracle" else "embedded"
        )
        img = load_image_encoder(encoder_name).encode(images)
        # pooled: one unit vector [D]; sequence (Stable Diffusion): the whole
        # [L, D] token sequence the UNet attends to, flattened, not normalised
        seq = ctx.text_encoder.encode(captions, ctx.cfg.embedding)
        self.cond_shape = tuple(seq.shape[1:])
        self.normalize = ctx.cfg.embedding == "pooled"
        txt = seq.flatten(1)
        cut = max(1, int(0.8 * len(img)))
        self.map = fit_linear_map(img[:cut], txt[:cut])
        self.image_dim = int(img.shape[1])
        held = img[cut:] if len(img) > cut else img
        self.gap = modality_gap(
            held, txt[len(txt) - len(held) :], self._to_text(held).flatten(1)
        )

    def _to_text(self, img: torch.Tensor) -> torch.Tensor:
        """Image embeddings ``[n, D_img]`` -> generator conditioning ``[n, L, D]``."""
        y = apply_linear_map(img.float(), self.map, normalize=self.normalize)
        return y.view(len(img), *self.cond_shape)

    def unpack(self, reply: Reply, ctx: ServerContext) -> P.Prototypes:
        """A reply's centres, checked: of the image encoder's dimension (set by
        ``check``), at most ``feddisc-clusters`` of one class."""
        return P.unpack(
            reply.tensors,
            num_classes=ctx.num_classes,
            dim=self.image_dim,
            max_per_class=ctx.cfg.options(FedDiscConfig).feddisc_clusters,
        )

    def server_work(self, replies: list[Reply], ctx: ServerContext) -> ServerOutput:
        """Map each centre, and its client's mean centre of the class (the domain
        feature), to the generator's conditioning; sample ``images-per-class`` images
        per (client, class) over its centres with both as guidance terms (within
        ``synth-budget``) and train the global classifier on them."""
        out = ServerOutput()
        opts = ctx.cfg.options(FedDiscConfig)
        parts = []
        for r in replies:
            p = self.unpack(r, ctx)
            centres = self._to_text(p.vectors[:, 0, :])
            # each centre's domain feature: the mean of the client's centres of
            # its class, carried over the same map
            domain = torch.empty_like(centres)
            for c in p.class_ids.unique().tolist():
                mine = p.class_ids == c
                domain[mine] = self._to_text(
                    p.vectors[mine, 0, :].float().mean(0, keepdim=True)
                )
            # images-per-class images over the m centres of a class, round-robin
            parts.append(
                steps.class_units(
                    centres,
                    p.class_ids,
                    r.partition_id,
                    ctx.cfg.images_per_class,
                    r.num_examples,
                    extras=(domain,),
                )
            )
        units = steps.budget_rows(ctx, steps.CondUnits.cat(parts), out)
        cond, y, o, (domain,) = units.expand()
        steps.synthesize_and_train(
            ctx,
            cond,
            y,
            o,
            out,
            guidance_scale=opts.feddisc_guidance,
            extra_conds=[(domain, opts.feddisc_guidance)],
            source="feddisc:prototype",
        )
        out.extra["feddisc"] = {
            "centres": sum(len(r.tensors["class_ids"]) for r in replies),
            "modality_gap": {k: round(v, 4) for k, v in self.gap.items()},
            "map_pairs": opts.feddisc_map_pairs,
        }
        return out

    def summary(self, replies: list[Reply]) -> dict[str, Any]:
        """Upload bytes per (client, class): the centres of one class."""
        return steps.classes_uploaded(replies)
