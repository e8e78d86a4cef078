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

from common.config import ConfigError
from common.contract import PayloadError, Reply

from ..base import ClientResult, OneShotMethod, ServerContext, ServerOutput
from ..steps import CondUnits, budget_rows, class_units, synthesize_set, train_global
from . import client_oscar
from . import payload_oscar as P
from .config_oscar import OscarConfig


def embedding_shape(ctx: ServerContext) -> tuple[int, int]:
    """``(tokens, dim)`` of one conditioning vector for this server's models."""
    return int(ctx.uncond.shape[1]), int(ctx.generator.cond_dim)


def check_embedding_kind(ctx: ServerContext) -> None:
    gen = ctx.generator
    if gen.embedding != ctx.cfg.embedding:
        raise ConfigError(
            f"embedding={ctx.cfg.embedding!r} but generator={ctx.cfg.generator!r} is "
            f"conditioned on {gen.embedding!r} embeddings; set embedding={gen.embedding!r}"
        )


class Oscar(OneShotMethod):
    name = "oscar"
    config = OscarConfig
    collect_type = "train.embed"
    payload_key = P.RECORD

    @staticmethod
    def client_collect(job: Any) -> ClientResult:
        return client_oscar.collect(job)

    def check(self, ctx: ServerContext) -> None:
        check_embedding_kind(ctx)
        if (
            ctx.cfg.options(OscarConfig).prototypes_per_class > 1
            and ctx.cfg.dp_epsilon > 0
        ):
            raise ConfigError(
                "prototypes-per-class > 1 with dp-epsilon > 0: the privacy guard covers "
                "per-class means only; set dp-epsilon=0 or prototypes-per-class=1"
            )

    def validate(self, reply: Reply, ctx: ServerContext) -> None:
        if reply.meta.get("embedding") != ctx.cfg.embedding:
            raise PayloadError(
                f"embedding kind {reply.meta.get('embedding')!r} != {ctx.cfg.embedding!r}"
            )
        tokens, dim = embedding_shape(ctx)
        P.unpack(
            reply.tensors,
            num_classes=ctx.num_classes,
            tokens=tokens,
            dim=dim,
            per_class=ctx.cfg.options(OscarConfig).prototypes_per_class,
        )

    def server_work(self, replies: list[Reply], ctx: ServerContext) -> ServerOutput:
        out = ServerOutput()
        tokens, dim = embedding_shape(ctx)
        k = ctx.cfg.options(OscarConfig).prototypes_per_class
        # images-per-class per (client, class), over its vectors by their counts
        parts = []
        for r in replies:
            e = P.unpack(
                r.tensors,
                num_classes=ctx.num_classes,
                tokens=tokens,
                dim=dim,
                per_class=k,
            )
            parts.append(
                class_units(
                    e.means,
                    e.class_ids,
                    r.partition_id,
                    ctx.cfg.images_per_class,
                    r.num_examples,
                    counts=e.counts,
                )
            )
        units = CondUnits.cat(parts)
        conds, labels, owners, _ = budget_rows(ctx, units, out).expand()
        images = synthesize_set(
            ctx, conds, labels, owners, out, source="oscar:caption-embedding"
        )
        train_global(ctx, images, labels, out)
        out.extra["num_synthetic"] = len(labels)
        return out

    def summary(self, replies: list[Reply]) -> dict[str, Any]:
        return classes_uploaded(replies)


def classes_uploaded(replies: list[Reply], key: str = "class_ids") -> dict[str, Any]:
    """Upload bytes per uploaded (client, class) (the 2 KB-per-class budget)."""
    n = sum(len(r.tensors[key].unique()) for r in replies if key in r.tensors)
    total = sum(r.upload_bytes for r in replies)
    return {"upload_bytes_per_class": total / n if n else None}
