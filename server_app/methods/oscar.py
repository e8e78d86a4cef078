"""OSCAR (Zaland et al. 2025, arXiv 2502.08488): one-shot FL with a text-conditioned
diffusion model. Clients upload one CLIP text embedding per class (the mean of
their images' caption embeddings); the server samples ``images-per-class``
images per (client, class) with classifier-free guidance and trains the global
classifier on them."""

from __future__ import annotations

import torch

from common import contract as C
from common.config import ConfigError
from common.contract import PayloadError, Reply

from ..context import ServerContext, ServerOutput
from ..synthesis import synthesize, train_global
from .base import OneShotMethod


class Oscar(OneShotMethod):
    name = "oscar"
    collect_type = C.TRAIN_EMBED
    payload_key = C.KEY_EMBEDDINGS

    def check(self, ctx: ServerContext) -> None:
        gen = ctx.generator
        if gen.embedding != ctx.cfg.embedding:
            raise ConfigError(
                f"embedding={ctx.cfg.embedding!r} but generator={ctx.cfg.generator!r} is "
                f"conditioned on {gen.embedding!r} embeddings; set embedding={gen.embedding!r}"
            )

    def expected_shape(self, ctx: ServerContext) -> tuple[int, int]:
        probe = ctx.text_encoder.encode([""], ctx.cfg.embedding)
        return int(probe.shape[1]), int(ctx.generator.cond_dim)

    def validate(self, reply: Reply, ctx: ServerContext) -> None:
        tokens, dim = self.expected_shape(ctx)
        if reply.meta.get("embedding") != ctx.cfg.embedding:
            raise PayloadError(
                f"embedding kind {reply.meta.get('embedding')!r} != {ctx.cfg.embedding!r}"
            )
        C.validate_embeddings(
            reply,
            num_classes=ctx.num_classes,
            tokens=tokens,
            dim=dim,
            max_bytes=int(ctx.cfg.max_upload_mb * 2**20),
        )

    def server_work(self, replies: list[Reply], ctx: ServerContext) -> ServerOutput:
        out = ServerOutput()
        n = ctx.cfg.images_per_class
        conds, labels, owners = [], [], []
        for r in replies:
            mean = r.tensors["mean"].float()
            for i, c in enumerate(r.tensors["class_ids"].tolist()):
                conds.append(mean[i : i + 1].expand(n, -1, -1))
                labels += [c] * n
                owners += [r.partition_id] * n
        cond = torch.cat(conds)
        y = torch.tensor(labels)
        images = synthesize(ctx, cond, y, torch.tensor(owners), out)
        train_global(ctx, images, y, out)
        out.extra["num_synthetic"] = len(y)
        return out
