"""OSCAR (Zaland et al. 2025, arXiv 2502.08488): one-shot FL with a text-conditioned
diffusion model. Clients upload one CLIP text embedding per class (the mean of
their images' caption embeddings); the server samples ``images-per-class``
images per (client, class) with classifier-free guidance and trains the global
classifier on them.

Deviations from the public code (obaidullahzaland/oscar): the embedded generator
attends to the pooled projected embedding (128 B per class) instead of SD's
77 x 768 token sequence (``embedding="sequence"`` restores it for SD); captions
come from retrieval over a phrase bank on the edge CPU instead of BLIP.
"""

from __future__ import annotations

from typing import Any

from common.contract import Reply

from .. import steps
from ..base import ServerContext, ServerOutput
from . import client_oscar
from . import payload_oscar as P
from .config_oscar import OscarConfig


class Oscar(steps.SynthesisMethod, payload=P, client=client_oscar, config=OscarConfig):
    """OSCAR: clients upload per-class caption embeddings; the server samples
    images from them with classifier-free guidance and trains the global
    classifier."""

    def conditions_limits(self, ctx: ServerContext) -> dict[str, Any]:
        """At most ``prototypes-per-class`` vectors of one class."""
        return {"per_class": ctx.cfg.options(OscarConfig).prototypes_per_class}

    def server_work(self, replies: list[Reply], ctx: ServerContext) -> ServerOutput:
        """Sample ``images-per-class`` images per (client, class), spread over its
        vectors by their counts (within ``synth-budget``), and train the global
        classifier on them."""
        out = ServerOutput()
        # images-per-class per (client, class), over its vectors by their counts
        parts = []
        for r in replies:
            e = self.unpack(r, ctx)
            parts.append(
                steps.class_units(
                    e.means,
                    e.class_ids,
                    r.partition_id,
                    ctx.cfg.images_per_class,
                    r.num_examples,
                    counts=e.counts,
                )
            )
        units = steps.CondUnits.cat(parts)
        conds, labels, owners, _ = steps.budget_rows(ctx, units, out).expand()
        steps.synthesize_and_train(
            ctx, conds, labels, owners, out, source="oscar:caption-embedding"
        )
        return out

    def summary(self, replies: list[Reply]) -> dict[str, Any]:
        """Upload bytes per (client, class): one class's conditioning vectors."""
        return steps.classes_uploaded(replies)
