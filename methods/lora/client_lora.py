"""Federated LoRA's client work, free of Flower: fine-tune a LoRA adapter of the
shared generator's UNet on the client's images and captions (FedDDPM-style
personalisation, arXiv 2503.06426), and score a pushed adapter by the
FID-proxy of its samples against the client's held-out images.

Real work on the client, as in the papers: a UNet forward and backward pass per
step (``lora-steps`` steps of ``lora-batch-size``); ``lora-train-s`` measures it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from common.config import RunConfig
from common.datasets import ClientData

from ..base import ClientJob, ClientResult
from ..oscar import payload_oscar
from ..oscar.client_oscar import EmbedResult, embed_classes, encode_captions
from . import payload_lora as P
from .config_lora import LoraConfig


@dataclass
class LoraResult:
    adapter: dict[str, torch.Tensor]
    embed: EmbedResult
    base_fingerprint: str
    losses: list[float]
    train_s: float


def train_client_lora(cfg: RunConfig, data: ClientData, seed: int) -> LoraResult:
    """Fine-tune a LoRA adapter of the generator's UNet on the client's data."""
    from common.generator import load_generator
    from common.lora import attach_lora, get_lora_state, train_lora
    from common.text_encoder import load_text_encoder

    lcfg = cfg.options(LoraConfig)
    # one caption mean per class: the server samples each client's classes with them
    emb = embed_classes(cfg, data, seed=seed, prototypes=1)
    t0 = time.perf_counter()
    gen = load_generator(cfg.generator, "ddpm")
    fingerprint = gen.fingerprint()
    cond = encode_captions(cfg, emb.captions)
    # latent diffusion trains on z = E(x) * scaling_factor; pixel space on x
    images = gen.encode(data.train_images)
    # "shared": every client starts from the adapter the run seed draws (FedIT's
    # common initial adapter); "client": each client from its own.
    init_seed = cfg.seed if lcfg.lora_init == "shared" else seed
    unet = attach_lora(
        gen.unet, lcfg.lora_rank, lcfg.lora_alpha, lcfg.target_list, seed=init_seed
    )
    losses = train_lora(
        unet,
        gen.scheduler,
        images,
        cond,
        steps=lcfg.lora_steps,
        lr=lcfg.lora_learning_rate,
        batch_size=lcfg.lora_batch_size,
        seed=seed,
        uncond=load_text_encoder(cfg.text_encoder).encode([""], cfg.embedding),
    )
    return LoraResult(
        adapter=get_lora_state(unet),
        embed=emb,
        base_fingerprint=fingerprint,
        losses=losses,
        train_s=time.perf_counter() - t0,
    )


def collect(job: ClientJob) -> ClientResult:
    """Upload the adapter once (fp16) with the per-class caption embeddings."""
    t0 = time.perf_counter()
    cfg, lcfg = job.cfg, job.cfg.options(LoraConfig)
    r = train_client_lora(cfg, job.data, job.seed)
    last = r.losses[-10:]
    return ClientResult(
        payload=P.layout(r.adapter, r.embed.embeddings),
        meta={
            "embedding": cfg.embedding,
            "base-model": r.base_fingerprint,
            "lora-rank": lcfg.lora_rank,
            "lora-alpha": lcfg.lora_alpha,
        },
        metrics={
            "num-examples": float(len(job.data.train_labels)),
            "lora-final-loss": float(sum(last) / max(1, len(last))),
            "lora-train-s": r.train_s,
            "client-s": time.perf_counter() - t0,
        },
        half=True,
    )


def fid_proxy_of_adapter(
    cfg: RunConfig,
    data: ClientData,
    emb: payload_oscar.ClassEmbeddings,
    adapter: dict[str, torch.Tensor],
    rank: int,
    alpha: float,
    seed: int,
) -> float:
    """FID-proxy of the adapted generator's samples for this client's classes and
    caption means against the client's own held-out images (judge features)."""
    from common.generator import load_generator
    from common.lora import set_lora_state
    from common.maths import fid_proxy
    from common.models import load_classifier
    from common.synthesis import sample, to_dataset_format
    from common.synthesis_settings import SynthesisSettings
    from common.text_encoder import load_text_encoder
    from common.train import features
    from common.weights import embedded_dir

    lcfg = cfg.options(LoraConfig)
    gen = load_generator(cfg.generator, cfg.scheduler)
    if adapter:
        set_lora_state(gen.unet, adapter, rank, alpha, lcfg.target_list)
    uncond = load_text_encoder(cfg.text_encoder).encode([""], cfg.embedding)
    cond = emb.means.float().repeat_interleave(lcfg.lora_samples_per_class, dim=0)
    # the run's sampler settings (guidance cut-off included), this client's seed
    settings = SynthesisSettings.from_config(cfg, seed=seed, static_shapes=False)
    fake = sample(gen, cond, uncond, **settings.kwargs())
    fake = to_dataset_format(fake, data.channels, cfg.image_size)
    judge = load_classifier(embedded_dir() / "judge")
    return fid_proxy(features(judge, data.test_images), features(judge, fake))


def evaluate(job: ClientJob) -> dict[str, float]:
    """Score the merged adapter (FID-proxy) and the pushed global classifier."""
    from ..base import evaluate_classifier

    # The caption means this node uploaded (kept in its state) are the prompts;
    # a node without them (state lost) captions its images again.
    if job.memory:
        emb = payload_oscar.ClassEmbeddings(
            job.memory[P.EMB + "class_ids"],
            job.memory[P.EMB + "mean"],
            job.memory[P.EMB + "counts"],
        )
    else:
        emb = embed_classes(job.cfg, job.data, seed=job.seed, prototypes=1).embeddings
    adapter = {k: v.float() for k, v in P.adapter_of(job.arrays[P.RECORD]).items()}
    fid = fid_proxy_of_adapter(
        job.cfg,
        job.data,
        emb,
        adapter,
        int(job.config["lora-rank"]),
        float(job.config["lora-alpha"]),
        job.seed,
    )
    return evaluate_classifier(job) | {"fid-proxy": fid}
