"""FedLD (one-shot Federated learning with Local Distribution-conditioned image
synthesis, ICLR 2026 submission, https://openreview.net/forum?id=KPjHoZdEJe): each
client fits a Gaussian mixture to the latents of its data per class and uploads
the mixtures' parameters; the server draws initial latents from them and lets the
class-prompted diffusion model denoise them, so the synthetic set follows each
client's distribution with no client training of any network.

No public code was found; this follows the paper's description:

1. client: images -> the space the generator denoises (``z = E(x) * s`` with the
   generator's VAE; the image itself for a pixel-space UNet) -> per class a
   diagonal GMM fitted by EM (``fedld-components``, at least
   ``fedld-min-per-component`` images each);
2. server: ``images-per-class`` images per (client, class), spread over the
   class's components by their counts (bounded by ``synth-budget``); each image
   draws ``z0 ~ N(mu_k, diag(var_k))``, is noised to the step at
   ``fedld-strength`` of the schedule (SDEdit) and denoised with classifier-free
   guidance on the class prompt (``DatasetInfo.class_prompt``) by the synthesis
   engine (``common.synthesis``, started from the draws: ``Start``);
3. the global classifier is trained on the synthetic set.

Deviations (see README.md): the GMM is fitted to the clean latents and noised on
the server (SDEdit) rather than fitted to inverted noise; diagonal covariances;
a minimum of images per component, a privacy floor the paper does not state.
"""

from __future__ import annotations

from logging import INFO
from typing import Any

import torch
from flwr.common.logger import log

from common.contract import Reply
from common.synthesis import image_generators
from common.synthesis_start import Start

from .. import steps
from ..base import ServerContext, ServerOutput
from . import client_fedld
from . import payload_fedld as P
from .config_fedld import FedLDConfig
from .maths_fedld import draw

SOURCE = "fedld:mixture-draw"
# index offset of the mixture draws' noise streams: disjoint from the sampler's
# (image i of the set draws z0's noise from stream DRAW_STREAM + i, x_t's from i)
DRAW_STREAM = 1 << 40


def mixture_units(
    uploads: list[tuple[Reply, P.ClassMixtures]],
    prompts: torch.Tensor,
    images_per_class: int,
) -> steps.CondUnits:
    """One unit per uploaded component: its class prompt as the condition, its
    mean and variance (flattened) as extras; ``images_per_class`` rows per
    (client, class), over the components by their counts."""
    parts = []
    for r, m in uploads:
        parts.append(
            steps.class_units(
                prompts[m.class_ids],
                m.class_ids,
                r.partition_id,
                images_per_class,
                r.num_examples,
                counts=m.counts,
                extras=(m.means.flatten(1), m.variances.flatten(1)),
            )
        )
    return steps.CondUnits.cat(parts)


class FedLD(steps.SynthesisMethod, payload=P, client=client_fedld, config=FedLDConfig):
    """FedLD: clients upload per-class Gaussian mixtures of their generator-
    space latents; the server draws from them and denoises class-prompted."""

    def unpack(self, reply: Reply, ctx: ServerContext) -> P.ClassMixtures:
        """A reply's mixtures, checked against the run's classes, the
        generator's sample shape and ``fedld-components``."""
        return P.unpack(
            reply.tensors,
            num_classes=ctx.num_classes,
            shape=tuple(ctx.generator.sample_shape),  # type: ignore[arg-type]
            per_class=ctx.cfg.options(FedLDConfig).fedld_components,
        )

    def server_work(self, replies: list[Reply], ctx: ServerContext) -> ServerOutput:
        """Draw initial latents from every client's class mixtures, denoise
        them class-prompted and train the global classifier."""
        out = ServerOutput()
        assert ctx.info is not None  # the round learned the classes before this
        strength = ctx.cfg.options(FedLDConfig).fedld_strength
        # 1. Units: one per uploaded component, bounded by synth-budget
        prompts = ctx.text_encoder.encode(
            [ctx.info.class_prompt(c) for c in range(ctx.num_classes)],
            ctx.cfg.embedding,
        )
        uploads = [(r, self.unpack(r, ctx)) for r in replies]
        units = mixture_units(uploads, prompts, ctx.cfg.images_per_class)
        units = steps.budget_rows(ctx, units, out, represent="clients")
        conds, labels, owners, (means, variances) = units.expand()
        # 2. Initial latents: z0 = mu_k + sqrt(var_k) * n, n from its own stream
        shape = tuple(ctx.generator.sample_shape)
        noise = (
            torch.stack(
                [
                    torch.randn(shape, generator=g)
                    for g in image_generators(
                        ctx.cfg.seed, range(DRAW_STREAM, DRAW_STREAM + len(labels))
                    )
                ]
            )
            if len(labels)
            else torch.empty(0, *shape)
        )
        z0 = draw(means, variances, noise.flatten(1)).reshape(-1, *shape)
        # 3. Denoise from the draws (SDEdit at fedld-strength), class-prompted, and
        #    train the global classifier on the synthetic set
        log(
            INFO,
            "FedLD: %d images from %d mixture components, strength %.2f, on %s (%s)",
            len(labels),
            int((units.rows > 0).sum()),
            strength,
            ctx.device,
            ctx.dtype,
        )
        start = Start(z0, strength)
        steps.synthesize_and_train(
            ctx, conds, labels, owners, out, desc="FedLD", source=SOURCE, start=start
        )
        out.extra["fedld"] = {
            "strength": strength,
            "components": int(len(units.labels)),
        }
        return out

    def summary(self, replies: list[Reply]) -> dict[str, Any]:
        """Upload bytes per uploaded (client, class) and per component."""
        return steps.classes_uploaded(replies, item="component")
