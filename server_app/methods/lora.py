"""One-shot federated LoRA of the diffusion generator.

Clients fine-tune a LoRA adapter of the shared generator's UNet and upload it
once, with their per-class caption embeddings. The server merges the adapters
(``lora-merge``) and pushes the merged adapter back; it also synthesizes a
dataset with the merged generator and trains the global classifier, so every
client gets both a generator that covers all clients and a classifier.

Merges: ``fedavg`` (FedIT, average of A and B separately), ``stack`` (FLoRA,
arXiv 2409.05976: the weighted factors concatenated, the exact weighted sum of
the updates at rank N·r), ``svd`` (the exact weighted mean of ΔW re-factorised
to ``lora-merge-rank``), ``ties``/``dare`` (peft's merge utilities on ΔW), and
``generative`` (FedDDPM, arXiv 2503.06426: sample an auxiliary set from each
client's adapted generator with that client's captions and correct the ``svd``
merge on the union).
"""

from __future__ import annotations

import time
from logging import INFO

import torch
from flwr.app import RecordDict
from flwr.common.logger import log

from common import contract as C
from common.contract import PayloadError, Reply
from common.lora import attach_lora, get_lora_state, set_lora_state, train_lora
from common.lora_merge import merge_adapters

from ..context import ServerContext, ServerOutput
from ..synthesis import synthesize, train_global
from .base import OneShotMethod

ADAPTER = "adapter/"
EMB = "emb/"


def split_payload(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    adapter = {
        k[len(ADAPTER) :]: v for k, v in tensors.items() if k.startswith(ADAPTER)
    }
    emb = {k[len(EMB) :]: v for k, v in tensors.items() if k.startswith(EMB)}
    return adapter, emb


class Lora(OneShotMethod):
    name = "lora"
    collect_type = C.TRAIN_LORA
    payload_key = C.KEY_LORA
    evaluate_type = C.EVALUATE_LORA

    def check(self, ctx: ServerContext) -> None:
        from common.foundation import generator_fingerprint

        self.fingerprint = generator_fingerprint(ctx.generator.unet)
        # The adapter every client must send: keys and shapes of rank lora-rank.
        cfg = ctx.cfg
        attach_lora(
            ctx.generator.unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_list
        )
        self.reference = get_lora_state(ctx.generator.unet)
        ctx.generator.unet.unload_lora()

    def validate(self, reply: Reply, ctx: ServerContext) -> None:
        if reply.meta.get("base-model") != self.fingerprint:
            raise PayloadError(
                f"adapter is for base model {reply.meta.get('base-model')!r}, "
                f"the server's generator is {self.fingerprint!r}"
            )
        adapter, emb = split_payload(reply.tensors)
        got, want = set(adapter), set(self.reference)
        if got != want:
            raise PayloadError(
                f"adapter modules differ: unexpected {sorted(got - want)[:3]}, "
                f"missing {sorted(want - got)[:3]}"
            )
        for k, ref in self.reference.items():
            if tuple(adapter[k].shape) != tuple(ref.shape):
                raise PayloadError(
                    f"adapter tensor {k!r} has shape {tuple(adapter[k].shape)}, expected "
                    f"{tuple(ref.shape)} (lora-rank={ctx.cfg.lora_rank})"
                )
        C.check_finite(adapter)
        sub = Reply(reply.node_id, reply.partition_id, reply.num_examples,
                    reply.upload_bytes, reply.meta, reply.metrics, emb)  # fmt: skip
        probe = ctx.text_encoder.encode([""], ctx.cfg.embedding)
        C.validate_embeddings(
            sub,
            num_classes=ctx.num_classes,
            tokens=int(probe.shape[1]),
            dim=int(ctx.generator.cond_dim),
            max_bytes=int(ctx.cfg.max_upload_mb * 2**20),
        )

    def merge(
        self, replies: list[Reply], ctx: ServerContext, out: ServerOutput
    ) -> tuple[dict, int, float]:
        """Merge the clients' adapters; returns ``(merged, rank, alpha)``."""
        cfg = ctx.cfg
        adapters = [
            {k: v.float() for k, v in split_payload(r.tensors)[0].items()}
            for r in replies
        ]
        weights = [float(r.num_examples) for r in replies]
        scal = [cfg.lora_alpha / cfg.lora_rank] * len(adapters)
        t0 = time.perf_counter()
        # generative corrects the exact (svd) merge; every other merge is maths only
        maths = "svd" if cfg.lora_merge == "generative" else cfg.lora_merge
        merged, info = merge_adapters(
            adapters, weights, maths, rank=cfg.lora_merge_rank, seed=cfg.seed,
            scalings=scal,
        )  # fmt: skip
        rank, alpha = int(info["rank"]), float(info["lora_alpha"])
        if cfg.lora_merge == "generative":
            merged = self.generative_correction(
                replies, adapters, merged, rank, alpha, ctx
            )
        out.timings["merge"] = time.perf_counter() - t0
        out.extra["lora"] = {
            "merge": cfg.lora_merge,
            "merged_rank": rank,
            "merged_alpha": alpha,
            "energy_kept": info.get("energy_kept"),
            "merge_s": round(out.timings["merge"], 3),
            "client_adapter_bytes": int(
                sum(v.numel() * 2 for v in adapters[0].values())
            ),
            "merged_adapter_bytes": int(sum(v.numel() * 2 for v in merged.values())),
        }
        log(
            INFO,
            "Merged %d adapters with %s -> rank %d",
            len(adapters),
            cfg.lora_merge,
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
        ``lora-steps`` steps of the denoising loss. Returns the corrected state.
        """
        cfg = ctx.cfg
        unet = ctx.generator.unet
        # 1. The auxiliary set: each client's adapter, each client's classes/captions
        images, conds = [], []
        for r, adapter in zip(replies, adapters, strict=True):
            set_lora_state(
                unet, adapter, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_list
            )
            _, emb = split_payload(r.tensors)
            n = cfg.lora_samples_per_class
            cond = emb["mean"].float().repeat_interleave(n, dim=0)
            labels = emb["class_ids"].repeat_interleave(n)
            owners = torch.full_like(labels, r.partition_id)
            images.append(
                synthesize(
                    ctx,
                    cond,
                    labels,
                    owners,
                    ServerOutput(),
                    desc=f"aux set client {r.partition_id}",
                    # the client's conditional model itself: guided samples would
                    # be guided twice once the corrected adapter samples with CFG
                    guidance_scale=1.0,
                )
            )
            conds.append(cond)
        # 2. Fine-tune the merged adapter on the union of the auxiliary sets
        set_lora_state(unet, merged, rank, alpha, cfg.lora_target_list)
        train_lora(
            unet, _training_scheduler(ctx), torch.cat(images).to(ctx.device, ctx.dtype),
            torch.cat(conds).to(ctx.device, ctx.dtype), steps=cfg.lora_steps,
            lr=cfg.lora_learning_rate, batch_size=cfg.lora_batch_size, seed=cfg.seed,
            uncond=ctx.text_encoder.encode([""], cfg.embedding).to(ctx.device, ctx.dtype),
        )  # fmt: skip
        corrected = get_lora_state(unet)
        unet.unload_lora()
        return corrected

    def server_work(self, replies: list[Reply], ctx: ServerContext) -> ServerOutput:
        out = ServerOutput()
        cfg = ctx.cfg
        # 1. Merge the adapters
        merged, rank, alpha = self.merge(replies, ctx, out)
        # 2. Synthesize with the merged generator, each client's classes and captions
        set_lora_state(ctx.generator.unet, merged, rank, alpha, cfg.lora_target_list)
        n = cfg.images_per_class
        conds, labels, owners = [], [], []
        for r in replies:
            _, emb = split_payload(r.tensors)
            conds.append(emb["mean"].float().repeat_interleave(n, dim=0))
            labels.append(emb["class_ids"].repeat_interleave(n))
            owners.append(torch.full_like(labels[-1], r.partition_id))
        y = torch.cat(labels)
        images = synthesize(ctx, torch.cat(conds), y, torch.cat(owners), out)
        ctx.generator.unet.unload_lora()
        # 3. Train the global classifier on the synthetic set
        train_global(ctx, images, y, out)
        out.push_arrays[C.KEY_LORA] = {ADAPTER + k: v for k, v in merged.items()}
        out.extra["num_synthetic"] = len(y)
        self.rank, self.alpha = rank, alpha
        return out

    def push_content(self, out: ServerOutput, ctx: ServerContext) -> RecordDict:
        content = super().push_content(out, ctx)
        lora = out.extra["lora"]
        config = dict(content.config_records[C.KEY_CONFIG])
        config["lora-rank"] = int(lora["merged_rank"])
        config["lora-alpha"] = float(lora["merged_alpha"])
        content[C.KEY_CONFIG] = C.config_record(config)
        return content


def _training_scheduler(ctx: ServerContext):  # type: ignore[no-untyped-def]
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(ctx.generator.scheduler.config)
