"""FGL with instance-level prompts (Zhang, Qi & Zhao, "Federated Generative
Learning with Foundation Models", arXiv 2306.16064; code
zj-jayzhang/Federated_Generative_Learning): every client captions each of its
images and sends the encoded captions; the server synthesizes one image per
uploaded caption and trains the global classifier on them.

The other end of OSCAR's trade-off: OSCAR averages the caption embeddings of a
class (one vector per class), FGL-instance uploads them all (one per image), so
the upload grows with the data and a caption no other image shares singles out
its image (``distinct-caption-fraction`` in each client's metrics).

Deviations from the public code: captions come from the project's captioner
(retrieval over a phrase bank that names the class, ``caption-with-labels``)
instead of BLIP-2, so the class name FGL prepends to each prompt is already in
it, and FGL's suffix (", real world images, high resolution.") and negative
prompt ("low quality, low resolution") are dropped: the embedded tokenizer knows
only the caption vocabulary; the clients send encoded captions (the paper's
text embeddings), not strings; the run's guidance, steps and scheduler apply
(the code: SD 2.1, 50 steps, guidance 2); ``synth-budget`` bounds the set (the
code synthesizes exactly one image per private image).
"""

from __future__ import annotations

from typing import Any

import torch

from common.contract import Reply

from .. import steps
from ..base import ServerContext, ServerOutput
from . import client_fgl_instance
from . import payload_fgl_instance as P
from .config_fgl_instance import FglInstanceConfig

SOURCE = "fgl-instance:caption-embedding"


def instance_units(
    e: P.InstanceEmbeddings, owner: int, weight: float
) -> steps.CondUnits:
    """One unit per uploaded instance, one image each; an instance weighs
    ``weight`` (the client's num-examples) over its class's uploaded instances."""
    ids = e.class_ids
    per_class = torch.bincount(ids).double()
    return steps.CondUnits(
        e.embeddings.float(),
        ids.clone(),
        torch.full_like(ids, owner),
        weight / per_class[ids],
        torch.ones(len(ids), dtype=torch.int64),
    )


class FglInstance(
    steps.SynthesisMethod,
    payload=P,
    client=client_fgl_instance,
    config=FglInstanceConfig,
):
    """FGL with instance-level prompts: one encoded caption per client image;
    the server synthesizes one image per caption."""

    def conditions_limits(self, ctx: ServerContext) -> dict[str, Any]:
        """At most ``fgl-instances-per-class`` instances of one class."""
        k = ctx.cfg.options(FglInstanceConfig).fgl_instances_per_class
        return {"per_class": k}

    def server_work(self, replies: list[Reply], ctx: ServerContext) -> ServerOutput:
        """Synthesize one image per uploaded caption (within ``synth-
        budget``) and train the global classifier on them."""
        out = ServerOutput()
        # 1. One image per uploaded caption, bounded by synth-budget (centres of
        #    the class's captions, so identical captions merge first)
        units = steps.CondUnits.cat(
            [
                instance_units(
                    self.unpack(r, ctx), r.partition_id, float(r.num_examples)
                )
                for r in replies
            ]
        )
        conds, labels, owners, _ = steps.budget_rows(ctx, units, out).expand()
        # 2. Synthesize, 3. train the global classifier
        steps.synthesize_and_train(ctx, conds, labels, owners, out, source=SOURCE)
        out.extra["fgl_instance"] = {"instances_uploaded": int(len(units.labels))}
        return out

    def summary(self, replies: list[Reply]) -> dict[str, Any]:
        """Upload bytes per uploaded (client, class) and per uploaded instance."""
        return steps.classes_uploaded(replies, item="instance")
