"""FedDEO (Yang et al., ACM MM 2024, arXiv 2407.19953; code MingzhaoYang/FedDEO):
description-enhanced one-shot FL. Each client learns one *description* per class
of its data: the generator's conditioning, initialised from the class prompt's
embedding and optimised with the diffusion noise-prediction loss on the client's
images, the generator frozen (``client_feddeo``: SGD at lr 10, one epoch, batch 1
by default, the code's values; with the privacy guard each description is
released with Gaussian noise around its class prompt's embedding). It uploads
the descriptions; the server

1. encodes the class prompts (the class term of the guidance);
2. makes ``images-per-class`` rows per (client, class), conditioned on the
   client's description; over ``synth-budget`` a class's descriptions are
   reduced to weighted k-means centres (``budget_rows``);
3. samples them with two guidance terms,

       eps = eps_u + s1 (eps_class - eps_u) + s2 (eps_desc - eps_u)

   (s1 = ``feddeo-class-guidance``, s2 = ``feddeo-description-guidance``, 3 and 3
   in the paper; s1 = 0 drops the class term);
4. trains the global classifier on the union; results.json's ``feddeo`` has how
   far the descriptions moved from the class prompts (distance, cosine) and the
   clients' mean diffusion loss before and after their fit.

Deviations from the paper's code (Stable Diffusion 1.5 at 512 px on a GPU):
* with the embedded generator the description is the pooled conditioning, one
  vector ``[1, 64]``, not the ``[77, 768]`` text-encoder output (which a
  Stable-Diffusion-format generator, ``embedding="sequence"``, gets);
* the run's sampler (``scheduler``, ``num-inference-steps``; DPM-Solver++ 10
  steps by default) instead of DDPM 50 steps, and the run's ``guidance-cutoff``:
  after it only the description's conditional pass runs (the description is the
  engine's main condition, the class prompt the extra term);
* ``images-per-class`` images per (client, class) (the code: 30), no
  safety-checker filter, the project's classifier instead of the code's
  ResNet fine-tuned on 224-px images;
* the latents are the VAE's posterior mean (``Generator.encode``), not a sample;
  noise and timesteps are drawn from a seeded CPU generator.
"""

from __future__ import annotations

from typing import Any

import torch

from common.contract import Reply

from .. import steps
from ..base import ServerContext, ServerOutput
from . import client_feddeo
from . import payload_feddeo as P
from .config_feddeo import FedDeoConfig


def description_drift(desc: torch.Tensor, init: torch.Tensor) -> dict[str, float]:
    """How far descriptions ``[K, L, D]`` moved from their inits (the class-prompt
    embeddings): mean L2 distance, relative to the init's norm, and cosine."""
    d, i = desc.float().flatten(1), init.float().flatten(1)
    dist = (d - i).norm(dim=1)
    return {
        "distance": float(dist.mean()),
        "relative_distance": float((dist / i.norm(dim=1).clamp_min(1e-12)).mean()),
        "cosine": float(torch.nn.functional.cosine_similarity(d, i, dim=1).mean()),
    }


def _mean_metric(replies: list[Reply], key: str) -> float | None:
    vals = [r.metrics[key] for r in replies if key in r.metrics]
    return round(sum(vals) / len(vals), 6) if vals else None


class FedDeo(
    steps.SynthesisMethod, payload=P, client=client_feddeo, config=FedDeoConfig
):
    """FedDEO: clients upload one learned description per class; the server
    samples with description and class-prompt guidance and trains the global
    classifier."""

    def server_work(self, replies: list[Reply], ctx: ServerContext) -> ServerOutput:
        """Sample ``images-per-class`` images per (client, class) from its
        description, the class prompt as a second guidance term (within
        ``synth-budget``), train the global classifier on them and report how far
        the descriptions moved from the prompts."""
        out = ServerOutput()
        assert ctx.info is not None  # the round learned the classes before this
        opts = ctx.cfg.options(FedDeoConfig)
        n = ctx.cfg.images_per_class

        # 1. The class prompts' embeddings: the class term, and the descriptions' init
        prompts = [ctx.info.class_prompt(c) for c in range(ctx.num_classes)]
        class_emb = ctx.text_encoder.encode(prompts, ctx.cfg.embedding)

        # 2. n rows per (client, class): its description and its class prompt
        #    (within synth-budget: over it, k-means centres of a class's descriptions)
        descs, inits, parts = [], [], []
        for r in replies:
            p = self.unpack(r, ctx)
            descs.append(p.vectors.float())
            inits.append(class_emb[p.class_ids])
            parts.append(
                steps.class_units(
                    p.vectors, p.class_ids, r.partition_id, n, r.num_examples
                )
            )
        cond, labels, owners, _ = steps.budget_rows(
            ctx, steps.CondUnits.cat(parts), out
        ).expand()
        class_cond = class_emb[labels]

        # 3. Sample, eps = eps_u + s2 (eps_desc - eps_u) + s1 (eps_class - eps_u),
        #    and train the global classifier on the union
        extra = [(class_cond, opts.feddeo_class_guidance)]
        steps.synthesize_and_train(
            ctx,
            cond,
            labels,
            owners,
            out,
            guidance_scale=opts.feddeo_description_guidance,
            extra_conds=extra if opts.feddeo_class_guidance > 0 else None,
            source="feddeo:description",
        )
        drift = description_drift(torch.cat(descs), torch.cat(inits))
        out.extra["feddeo"] = {
            "descriptions": sum(len(d) for d in descs),
            **{f"description_{k}": round(v, 6) for k, v in drift.items()},
            "loss_before": _mean_metric(replies, "feddeo-loss-before"),
            "loss_after": _mean_metric(replies, "feddeo-loss-after"),
        }
        return out

    def summary(self, replies: list[Reply]) -> dict[str, Any]:
        """Upload bytes per (client, class): one class's description."""
        return steps.classes_uploaded(replies)
