"""Server steps shared by the synthesis-based methods.

``synthesize_set``: a labelled conditioning set -> images through the one
synthesis engine (``common.synthesis``), in the clients' image format, with a few
kept per (client, class) for the sample grid. ``train_global``: the global
classifier on the synthetic set.
"""

from __future__ import annotations

import time
from logging import INFO
from typing import Any

import torch
from flwr.common.logger import log

from common.models import build_classifier
from common.synthesis import (
    GeneratorSpec,
    LatentGuidance,
    from_uint8,
    sample_on_workers,
    synthesize,
)
from common.train import train_classifier

from .base import ServerContext, ServerOutput

SAMPLES_PER_CELL = 6  # images kept per (client, class) for the sample grid


def engine_kwargs(ctx: ServerContext, **over: Any) -> dict[str, Any]:
    """The engine's settings from the run config (``over`` wins)."""
    cfg = ctx.cfg
    return {
        "guidance_scale": cfg.guidance_scale,
        "num_inference_steps": cfg.num_inference_steps,
        "guidance_cutoff": cfg.guidance_cutoff,
        "seed": cfg.seed,
        "batch_size": cfg.synth_batch_size,
        "static_shapes": cfg.compile,
    } | over


def synth_workers(ctx: ServerContext) -> int:
    """``synth-workers``: ``auto`` is one per visible GPU, 1 on a CPU."""
    w = ctx.cfg.synth_workers
    if w == "auto":
        return max(1, torch.cuda.device_count()) if ctx.device.type == "cuda" else 1
    return int(w)


def sample_images(
    ctx: ServerContext, conds: torch.Tensor, desc: str = "synthesize", **over: Any
) -> tuple[torch.Tensor, float]:
    """Conditioning rows -> uint8 images in the dataset's format, on this process's
    device or sharded over Ray workers (``synth-workers``); ``(images, seconds)``."""
    kw = engine_kwargs(ctx, **over) | {
        "resize_to": (ctx.channels, ctx.cfg.image_size),
        "as_uint8": True,
    }
    workers = synth_workers(ctx)
    if workers > 1 and over.get("latent_guidance") is not None:
        log(INFO, "Latent guidance holds the clients' models: sampling in-process")
        workers = 1
    if workers > 1:
        t0 = time.perf_counter()
        log(INFO, "Synthesis sharded over %d Ray workers", workers)
        spec = GeneratorSpec.of(
            ctx.generator, ctx.cfg.scheduler, ctx.cfg.precision, ctx.cfg.decoder
        )
        x = sample_on_workers(
            spec, conds, ctx.uncond, workers=workers, ray_address=ctx.cfg.synth_ray_address,
            gpus_per_worker=1.0 if ctx.device.type == "cuda" else 0.0, **kw,
        )  # fmt: skip
        return x, time.perf_counter() - t0
    return synthesize(
        ctx.sampling_generator, conds, ctx.uncond, desc=desc, decoder=ctx.decoder, **kw
    )


def synthesize_set(
    ctx: ServerContext,
    conds: torch.Tensor,
    labels: torch.Tensor,
    owners: torch.Tensor,
    out: ServerOutput,
    desc: str = "synthesize",
    guidance_scale: float | None = None,
    extra_conds: list[tuple[torch.Tensor, float]] | None = None,
    latent_guidance: LatentGuidance | None = None,
) -> torch.Tensor:
    """Sample one image per row of ``conds`` ``[M, L, D]``; keep a few per cell.

    ``owners`` is the partition id each row comes from (-1: no client);
    ``guidance_scale`` overrides ``guidance-scale`` (1.0: the conditional model);
    ``extra_conds`` adds guidance terms, ``latent_guidance`` a loss on the predicted
    image (``common.synthesis.sample``). Returns uint8 images in the dataset's
    format (channels, image-size).
    """
    cfg = ctx.cfg
    w = cfg.guidance_scale if guidance_scale is None else guidance_scale
    log(INFO, "Synthesizing %d images on %s (%s), %d steps, guidance %.1f",
        len(conds), ctx.device, ctx.dtype, cfg.num_inference_steps, w)  # fmt: skip
    over: dict[str, Any] = {"guidance_scale": w}
    if extra_conds:
        over["extra_conds"] = extra_conds
    if latent_guidance is not None:
        over["latent_guidance"] = latent_guidance
    images, seconds = sample_images(ctx, conds, desc=desc, **over)
    out.timings["synthesize"] = out.timings.get("synthesize", 0.0) + seconds
    for o in owners.unique().tolist():
        for c in labels.unique().tolist():
            idx = torch.nonzero((owners == o) & (labels == c)).flatten()
            if len(idx):
                out.samples[(int(o), int(c))] = from_uint8(
                    images[idx[:SAMPLES_PER_CELL]]
                )
    return images


def per_class_rows(
    means: torch.Tensor, class_ids: torch.Tensor, owner: int, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` conditioning rows per uploaded class: ``(conds, labels, owners)``."""
    conds = means.float().repeat_interleave(n, dim=0)
    labels = class_ids.repeat_interleave(n)
    return conds, labels, torch.full_like(labels, owner)


def train_global(
    ctx: ServerContext,
    images: torch.Tensor,
    labels: torch.Tensor,
    out: ServerOutput,
    soft_targets: torch.Tensor | None = None,
) -> None:
    """Train the global classifier on the synthetic set (server device);
    ``soft_targets``: teacher probabilities distilled beside the labels."""
    cfg = ctx.cfg
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = build_classifier(cfg.classifier, ctx.channels, ctx.num_classes)
    train_classifier(
        model, images, labels, epochs=cfg.train_epochs,
        batch_size=cfg.train_batch_size, lr=cfg.learning_rate, seed=cfg.seed,
        device=ctx.device, progress=True, desc="train global classifier",
        soft_targets=soft_targets,
    )  # fmt: skip
    out.model_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out.arch = cfg.classifier
    out.timings["train"] = time.perf_counter() - t0
