"""Class names only (the FGL baseline, Zhang et al. 2023, arXiv 2306.16064):
clients upload nothing but their class names; the server prompts the generator
with "a photo of <class>"-style prompts and trains the classifier on the result."""

from __future__ import annotations

import torch

from common import contract as C
from common.contract import PayloadError, Reply
from common.data import class_name_prompt

from ..context import ServerContext, ServerOutput
from ..synthesis import synthesize, train_global
from .base import OneShotMethod


class ClassNames(OneShotMethod):
    name = "class-names"
    collect_type = C.QUERY_INFO

    def validate(self, reply: Reply, ctx: ServerContext) -> None:
        if int(reply.meta.get("num-classes", -1)) != ctx.num_classes:  # type: ignore[call-overload]
            raise PayloadError(
                f"num-classes={reply.meta.get('num-classes')} != {ctx.num_classes}"
            )

    def server_work(self, replies: list[Reply], ctx: ServerContext) -> ServerOutput:
        out = ServerOutput()
        # Same synthetic-set size as OSCAR: images-per-class per client per class.
        n = ctx.cfg.images_per_class * max(1, len(replies))
        names = None if ctx.class_names[:1] == ["zero"] else ctx.class_names
        prompts = [class_name_prompt(c, names) for c in range(ctx.num_classes)]
        emb = ctx.text_encoder.encode(prompts, ctx.cfg.embedding)
        cond = emb.repeat_interleave(n, dim=0)
        y = torch.arange(ctx.num_classes).repeat_interleave(n)
        images = synthesize(ctx, cond, y, torch.full_like(y, -1), out)
        train_global(ctx, images, y, out)
        out.extra["num_synthetic"] = len(y)
        return out
