"""What a client does, free of Flower: the ClientApp handlers only parse,
call one of these functions and pack the reply.

Clients stay light (a 2-core edge CPU): OSCAR clients run one small image
encoder pass for retrieval captioning and one text-encoder pass per caption;
they train nothing.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

import torch

from common.config import RunConfig
from common.data import ClientData, caption, load_client_data, phrase_bank
from common.maths import per_class_mean, private_class_means
from common.models import build_classifier
from common.train import accuracy, train_classifier


@functools.lru_cache(maxsize=4)
def client_data(cfg: RunConfig, partition_id: int, num_partitions: int) -> ClientData:
    return load_client_data(
        cfg.dataset,
        cfg.partition,
        partition_id,
        num_partitions,
        image_size=cfg.image_size,
        alpha=cfg.dirichlet_alpha,
        classes_per_client=cfg.classes_per_client,
        domains=cfg.domain_list,
        max_examples=cfg.max_examples_per_client,
        test_fraction=cfg.test_fraction,
        seed=cfg.seed,
    )


def data_meta(data: ClientData, partition_id: int) -> dict[str, Any]:
    return {
        "partition-id": partition_id,
        "domain": data.domain,
        "num-classes": data.num_classes,
        "class-names": ",".join(data.class_names),
        "channels": int(data.train_images.shape[1]),
    }


# ---------------------------------------------------------------- OSCAR


@dataclass
class EmbedResult:
    class_ids: torch.Tensor
    means: torch.Tensor  # [K, L, D] float16
    counts: torch.Tensor
    captions: list[str]
    caption_s_per_image: float
    encode_s: float
    dp_sigma: float


def caption_images(cfg: RunConfig, data: ClientData) -> tuple[list[str], float]:
    """Caption the client's training images; returns captions and s/image."""
    t0 = time.perf_counter()
    if cfg.captioner == "oracle":
        # Exact style-and-class captions: the reference retrieval is measured against.
        caps = [caption(int(y), data.domain) for y in data.train_labels]
    else:
        from common.foundation import load_captioner

        texts, labels, _ = phrase_bank(data.num_classes)
        if data.num_classes != 10 or data.class_names[0] != "zero":
            texts = [f"a photo of a {c}" for c in data.class_names]
            labels = torch.arange(data.num_classes).numpy()
        captioner = load_captioner(cfg.captioner, texts, torch.as_tensor(labels))
        given = data.train_labels if cfg.caption_with_labels else None
        caps = captioner.caption(data.train_images, given)
    return caps, (time.perf_counter() - t0) / max(1, len(data.train_labels))


def embed_classes(cfg: RunConfig, data: ClientData, seed: int = 0) -> EmbedResult:
    """OSCAR client: caption -> CLIP text embedding -> per-class mean (-> DP noise)."""
    from common.foundation import load_text_encoder

    caps, cap_s = caption_images(cfg, data)
    t0 = time.perf_counter()
    encoder = load_text_encoder(cfg.text_encoder)
    # Identical captions are frequent: encode each distinct caption once.
    distinct = sorted(set(caps))
    table = encoder.encode(distinct, cfg.embedding)
    index = {c: i for i, c in enumerate(distinct)}
    emb = table[torch.tensor([index[c] for c in caps])]
    sigma = 0.0
    if cfg.dp_epsilon > 0:
        g = torch.Generator().manual_seed(seed)
        ids, means, counts, sigma = private_class_means(
            emb, data.train_labels, data.num_classes,
            epsilon=cfg.dp_epsilon, delta=cfg.dp_delta, clip=cfg.dp_clip, generator=g,
        )  # fmt: skip
    else:
        ids, means, counts = per_class_mean(emb, data.train_labels, data.num_classes)
    return EmbedResult(
        class_ids=ids,
        means=means.to(torch.float16),
        counts=counts,
        captions=caps,
        caption_s_per_image=cap_s,
        encode_s=time.perf_counter() - t0,
        dp_sigma=sigma,
    )


# ---------------------------------------------------------------- classifiers


def train_local_model(
    cfg: RunConfig,
    data: ClientData,
    init_state: dict[str, torch.Tensor] | None,
    seed: int,
) -> torch.nn.Module:
    """Train the classifier on local data (one-shot FedAvg / no-federation baseline)."""
    torch.manual_seed(seed)
    model = build_classifier(
        cfg.classifier, data.train_images.shape[1], data.num_classes
    )
    if init_state is not None:
        model.load_state_dict(init_state)
    train_classifier(
        model,
        data.train_images,
        data.train_labels,
        epochs=cfg.local_epochs,
        batch_size=cfg.train_batch_size,
        lr=cfg.learning_rate,
        seed=seed,
    )
    return model


def evaluate_state(
    cfg: RunConfig,
    data: ClientData,
    state: dict[str, torch.Tensor],
    arch: str,
    num_classes: int,
) -> float:
    """Accuracy of a received global classifier on the client's held-out split."""
    model = build_classifier(arch, data.test_images.shape[1], num_classes)
    model.load_state_dict(state)
    return accuracy(model, data.test_images, data.test_labels)


# ---------------------------------------------------------------- federated LoRA


@dataclass
class LoraResult:
    adapter: dict[str, torch.Tensor]
    embed: EmbedResult
    base_fingerprint: str
    losses: list[float]
    train_s: float


def train_client_lora(cfg: RunConfig, data: ClientData, seed: int) -> LoraResult:
    """Fine-tune a LoRA adapter of the generator's UNet on the client's images and
    their captions (FedDDPM-style personalisation, arXiv 2503.06426)."""
    from common.foundation import (
        generator_fingerprint,
        load_generator,
        load_text_encoder,
    )
    from common.lora import attach_lora, get_lora_state, train_lora

    emb = embed_classes(cfg, data, seed=seed)
    t0 = time.perf_counter()
    gen = load_generator(cfg.generator, "ddpm")
    fingerprint = generator_fingerprint(gen.unet)
    encoder = load_text_encoder(cfg.text_encoder)
    distinct = sorted(set(emb.captions))
    table = encoder.encode(distinct, cfg.embedding)
    index = {c: i for i, c in enumerate(distinct)}
    cond = table[torch.tensor([index[c] for c in emb.captions])]
    images = data.train_images
    if gen.vae is not None:  # latent diffusion: train on latents
        with torch.no_grad():
            px = images.expand(-1, gen.vae.config.in_channels, -1, -1)
            images = (
                gen.vae.encode(px).latent_dist.sample() * gen.vae.config.scaling_factor
            )
    # "shared": every client starts from the adapter the run seed draws (FedIT's
    # common initial adapter); "client": each client from its own.
    init_seed = cfg.seed if cfg.lora_init == "shared" else seed
    unet = attach_lora(
        gen.unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_list, seed=init_seed
    )
    losses = train_lora(
        unet,
        gen.scheduler,
        images,
        cond,
        steps=cfg.lora_steps,
        lr=cfg.lora_learning_rate,
        batch_size=cfg.lora_batch_size,
        seed=seed,
        uncond=encoder.encode([""], cfg.embedding),
    )
    return LoraResult(
        adapter=get_lora_state(unet),
        embed=emb,
        base_fingerprint=fingerprint,
        losses=losses,
        train_s=time.perf_counter() - t0,
    )


def evaluate_lora(
    cfg: RunConfig,
    data: ClientData,
    adapter: dict[str, torch.Tensor],
    rank: int,
    alpha: float,
    seed: int,
    samples_per_class: int = 16,
) -> dict[str, float]:
    """FID-proxy of the merged generator's samples for this client's classes and
    captions against the client's own held-out images (judge feature space)."""
    from common.foundation import embedded_dir, load_generator, load_text_encoder
    from common.lora import set_lora_state
    from common.maths import fid_proxy
    from common.models import load_classifier
    from common.train import features

    emb = embed_classes(cfg, data, seed=seed)
    gen = load_generator(cfg.generator, cfg.scheduler)
    if adapter:
        set_lora_state(gen.unet, adapter, rank, alpha, cfg.lora_target_list)
    uncond = load_text_encoder(cfg.text_encoder).encode([""], cfg.embedding)
    cond = emb.means.float().repeat_interleave(samples_per_class, dim=0)
    fake = gen.sample(
        cond,
        uncond,
        guidance_scale=cfg.guidance_scale,
        num_inference_steps=cfg.num_inference_steps,
        seed=seed,
        batch_size=cfg.synth_batch_size,
    )
    from common.foundation import to_dataset_format

    fake = to_dataset_format(fake, data.test_images.shape[1], cfg.image_size)
    judge = load_classifier(embedded_dir() / "judge")
    real = data.test_images
    return {"fid-proxy": fid_proxy(features(judge, real), features(judge, fake))}
