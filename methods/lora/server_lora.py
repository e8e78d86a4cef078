"""One-shot federated LoRA of the diffusion generator.

Clients fine-tune a LoRA adapter of the shared generator's UNet and upload it
once, with their per-class caption embeddings. The server merges the adapters
(``lora-merge``) and pushes the merged adapter back; it also synthesizes a
dataset with the merged generator and trains the global classifier, so every
client gets both a generator that covers all clients and a classifier.

Merges (``common.lora_merge``): ``fedavg`` (FedIT, average of A and B
separately), ``stack`` (FLoRA, arXiv 2409.05976: the weighted factors
concatenated, the exact weighted sum of the updates at rank N·r), ``svd`` (the
exact weighted mean of ΔW re-factorised to ``lora-merge-rank``), ``ties`` /
``dare`` (peft's TIES / DARE on ΔW, ``lora-merge-density``), and ``generative``
(FedDDPM, arXiv 2503.06426: the ``svd`` merge fine-tuned on samples of every
client's own adapter). Client weights are example counts, no share above
``max-weight-share``.
"""

from __future__ import annotations

import time
from logging import INFO
from typing import Any

import torch
from flwr.common.logger import log

from common.contract import PayloadError, Reply
from common.lora import attach_lora, get_lora_state, set_lora_state, train_lora
from common.lora_merge import merge_adapters
from common.synthesis import sample
from common.synthesis_settings import SynthesisSettings

from .. import steps
from ..base import ServerContext, ServerOutput
from ..fedavg.server_fedavg import capped_shares
from . import client_lora
from . import payload_lora as P
from .config_lora import LoraConfig


class Lora(steps.SynthesisMethod, payload=P, client=client_lora, config=LoraConfig):
    """One-shot federated LoRA: clients upload a LoRA adapter of the generator's
    UNet with their per-class caption embeddings; the server merges the adapters,
    pushes the merged one back and trains the global classifier on its samples."""

    evaluate_type = "evaluate.lora"

    def check(self, ctx: ServerContext) -> None:
        """Refuse a generator not conditioned on the run's ``embedding`` kind;
        keep the generator's fingerprint and the adapter every client must send
        (keys and shapes at ``lora-rank``)."""
        super().check(ctx)
        lcfg = ctx.cfg.options(LoraConfig)
        self.fingerprint = ctx.generator.fingerprint()
        # The adapter every client must send: keys and shapes of rank lora-rank.
        unet = ctx.generator.unet
        attach_lora(unet, lcfg.lora_rank, lcfg.lora_alpha, lcfg.target_list)
        self.reference = get_lora_state(unet)
        unet.unload_lora()

    def unpack(self, reply: Reply, ctx: ServerContext) -> tuple[dict, Any]:
        """``(adapter, caption embeddings)`` of a reply, checked: an adapter for
        the server's base generator (meta ``base-model``), that fits the
        reference adapter (set by ``check``) and the conditioning shape;
        ``PayloadError`` names what is wrong."""
        if reply.meta.get("base-model") != self.fingerprint:
            raise PayloadError(
                f"adapter is for base model {reply.meta.get('base-model')!r}, "
                f"the server's generator is {self.fingerprint!r}"
            )
        tokens, dim = steps.embedding_shape(ctx)
        return P.unpack(
            reply.tensors,
            self.reference,
            num_classes=ctx.num_classes,
            tokens=tokens,
            dim=dim,
        )

    def validate(self, reply: Reply, ctx: ServerContext) -> None:
        """Reject what ``unpack`` rejects, naming the run's ``lora-rank``."""
        try:
            self.unpack(reply, ctx)
        except PayloadError as e:
            raise PayloadError(
                f"{e} (lora-rank={ctx.cfg.options(LoraConfig).lora_rank})"
            ) from None

    def merge(
        self, replies: list[Reply], ctx: ServerContext, out: ServerOutput
    ) -> tuple[dict, int, float]:
        """Merge the clients' adapters; returns ``(merged, rank, alpha)``."""
        lcfg = ctx.cfg.options(LoraConfig)
        adapters = [
            {k: v.float() for k, v in self.unpack(r, ctx)[0].items()} for r in replies
        ]
        shares = capped_shares(replies, ctx)
        scal = [lcfg.lora_alpha / lcfg.lora_rank] * len(adapters)
        t0 = time.perf_counter()
        # generative corrects the exact (svd) merge; every other merge is maths only
        maths = "svd" if lcfg.lora_merge == "generative" else lcfg.lora_merge
        merged, info = merge_adapters(
            adapters,
            shares,
            maths,
            rank=lcfg.lora_merge_rank,
            seed=ctx.cfg.seed,
            scalings=scal,
            density=lcfg.lora_merge_density,
        )
        rank, alpha = int(info["rank"]), float(info["lora_alpha"])
        if lcfg.lora_merge == "generative":
            merged = self.generative_correction(
                replies, adapters, merged, rank, alpha, ctx
            )
        out.timings["merge"] = time.perf_counter() - t0
        out.extra["lora"] = {
            "merge": lcfg.lora_merge,
            "merged_rank": rank,
            "merged_alpha": alpha,
            "energy_kept": info.get("energy_kept"),
            "client_adapter_bytes": int(
                sum(v.numel() * 2 for v in adapters[0].values())
            ),
            "merged_adapter_bytes": int(sum(v.numel() * 2 for v in merged.values())),
        }
        log(
            INFO,
            "Merged %d adapters with %s -> rank %d",
            len(adapters),
            lcfg.lora_merge,
            rank,
        )
        return merged, rank, alpha

    def generative_correction(
        self,
        replies: list[Reply],
        adapters: list[dict],
        merged: dict,
        rank: int,
        alpha: float,
        ctx: ServerContext,
    ) -> dict:
        """FedDDPM-style one-shot correction (arXiv 2503.06426) of a merged adapter.

        FedDDPM corrects the aggregated model with auxiliary data generated by the
        clients' uploaded models. Here: sample ``lora-samples-per-class`` images
        per (client, class) from each client's own adapter with that client's
        caption embeddings, without guidance (the clients' conditional models),
        then fine-tune ``merged`` (rank ``rank``) on their union for
        ``lora-steps`` steps of the denoising loss. The samples stay in the space
        the UNet denoises (latents for a latent generator, the generator's own
        resolution in pixel space). Returns the corrected state.
        """
        cfg, lcfg = ctx.cfg, ctx.cfg.options(LoraConfig)
        gen = ctx.generator
        # 1. The auxiliary set: each client's adapter, each client's classes/captions
        latents, conds = [], []
        for r, adapter in zip(replies, adapters, strict=True):
            set_lora_state(
                gen.unet, adapter, lcfg.lora_rank, lcfg.lora_alpha, lcfg.target_list
            )
            emb = self.unpack(r, ctx)[1]
            cond, _, _ = steps.per_class_rows(
                emb.means, emb.class_ids, r.partition_id, lcfg.lora_samples_per_class
            )
            # the client's conditional model itself: guided samples would be
            # guided twice once the corrected adapter samples with CFG
            latents.append(
                sample(
                    gen,
                    cond,
                    ctx.uncond,
                    **SynthesisSettings.from_config(
                        ctx.cfg, guidance_scale=1.0, static_shapes=False
                    ).kwargs(),
                    output="latents",
                )
            )
            conds.append(cond)
        # 2. Fine-tune the merged adapter on the union of the auxiliary sets
        from diffusers import DDPMScheduler

        set_lora_state(gen.unet, merged, rank, alpha, lcfg.target_list)
        train_lora(
            gen.unet,
            DDPMScheduler.from_config(gen.scheduler.config),
            torch.cat(latents).to(ctx.device, ctx.dtype),
            torch.cat(conds).to(ctx.device, ctx.dtype),
            steps=lcfg.lora_steps,
            lr=lcfg.lora_learning_rate,
            batch_size=lcfg.lora_batch_size,
            seed=cfg.seed,
            uncond=ctx.uncond.to(ctx.device, ctx.dtype),
        )
        corrected = get_lora_state(gen.unet)
        gen.unet.unload_lora()
        return corrected

    def server_work(self, replies: list[Reply], ctx: ServerContext) -> ServerOutput:
        """Merge the adapters (``lora-merge``); sample ``images-per-class`` images
        per (client, class) from the merged generator with the client's caption
        embeddings (within ``synth-budget``); train the global classifier on them and
        push the merged adapter back."""
        out = ServerOutput()
        lcfg = ctx.cfg.options(LoraConfig)
        # 1. Merge the adapters
        merged, rank, alpha = self.merge(replies, ctx, out)
        # 2. Synthesize with the merged generator, each client's classes and captions
        #    (within synth-budget: over it, k-means centres of a class's captions)
        set_lora_state(ctx.generator.unet, merged, rank, alpha, lcfg.target_list)
        parts = []
        for r in replies:
            emb = self.unpack(r, ctx)[1]
            parts.append(
                steps.class_units(
                    emb.means,
                    emb.class_ids,
                    r.partition_id,
                    ctx.cfg.images_per_class,
                    r.num_examples,
                )
            )
        conds, labels, owners, _ = steps.budget_rows(
            ctx, steps.CondUnits.cat(parts), out
        ).expand()
        images = steps.synthesize_set(
            ctx, conds, labels, owners, out, source="lora:merged-adapter"
        )
        ctx.generator.unet.unload_lora()
        # 3. Train the global classifier on the synthetic set
        steps.train_global(ctx, images, labels, out)
        out.push_arrays[P.RECORD] = P.layout(merged, None)
        out.push_config = {"lora-rank": rank, "lora-alpha": alpha}
        out.extra["num_synthetic"] = len(labels)
        return out

    def summary(self, replies: list[Reply]) -> dict[str, Any]:
        """Upload bytes per (client, class): the whole upload, adapter included,
        over the classes of its caption embeddings."""
        return steps.classes_uploaded(replies, key=P.EMB + "class_ids")
