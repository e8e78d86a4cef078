"""Class names only (the FGL baseline, Zhang et al. 2023, arXiv 2306.16064):
clients upload nothing but their class names (in the reply's envelope); the server
prompts the generator with the dataset's class prompts and trains the classifier
on the result. No client work and no keys of its own."""

from __future__ import annotations

import torch

from common.contract import Reply

from .. import steps
from ..base import ServerContext, ServerOutput


class ClassNames(steps.SynthesisMethod):
    """Class names only: the server prompts the generator with each class's
    prompt and trains the global classifier on the images; clients upload nothing
    but their envelope."""

    def server_work(self, replies: list[Reply], ctx: ServerContext) -> ServerOutput:
        """Synthesize ``images-per-class`` images per class per reply from the class
        prompts (within ``synth-budget``) and train the global classifier on them."""
        out = ServerOutput()
        assert ctx.info is not None  # the round learned the classes before this
        # Same synthetic-set size as OSCAR: images-per-class per client per class,
        # one prompt per class (no clients to reduce: synth-budget lowers the
        # images per class)
        n = ctx.cfg.images_per_class * max(1, len(replies))
        prompts = [ctx.info.class_prompt(c) for c in range(ctx.num_classes)]
        emb = ctx.text_encoder.encode(prompts, ctx.cfg.embedding)
        k = ctx.num_classes
        units = steps.CondUnits(
            emb,
            torch.arange(k),
            torch.full((k,), -1),
            torch.ones(k, dtype=torch.float64),
            torch.full((k,), n),
        )
        cond, y, owners, _ = steps.budget_rows(ctx, units, out).expand()
        steps.synthesize_and_train(
            ctx, cond, y, owners, out, source="class-names:prompt"
        )
        return out
