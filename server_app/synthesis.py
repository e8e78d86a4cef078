"""Server work shared by the synthesis-based methods: sample a synthetic training
set with classifier-free guidance, then train the global classifier on it."""

from __future__ import annotations

import time
from logging import INFO

import torch
from flwr.common.logger import log
from tqdm.auto import tqdm

from common.foundation import to_dataset_format
from common.models import build_classifier
from common.train import train_classifier

from .context import ServerContext, ServerOutput

SAMPLES_PER_CELL = 6  # images kept per (client, class) for the sample grid


def synthesize(
    ctx: ServerContext,
    conds: torch.Tensor,
    labels: torch.Tensor,
    owners: torch.Tensor,
    out: ServerOutput,
    desc: str = "synthesize",
    guidance_scale: float | None = None,
) -> torch.Tensor:
    """Sample one image per row of ``conds`` ``[M, L, D]``; keep a few per cell for plots.

    ``guidance_scale`` overrides ``guidance-scale`` (1.0: the plain conditional model).
    """
    cfg = ctx.cfg
    gen = ctx.generator
    w = cfg.guidance_scale if guidance_scale is None else guidance_scale
    uncond = ctx.text_encoder.encode([""], cfg.embedding)
    t0 = time.perf_counter()
    log(INFO, "Synthesizing %d images on %s (%s), %d steps, guidance %.1f",
        len(conds), ctx.device, ctx.dtype, cfg.num_inference_steps, w)  # fmt: skip
    with tqdm(total=len(conds), desc=desc, unit="img") as bar:
        images = gen.sample(
            conds,
            uncond,
            guidance_scale=w,
            num_inference_steps=cfg.num_inference_steps,
            seed=cfg.seed,
            batch_size=cfg.synth_batch_size,
            progress=bar.update,
        )
    images = to_dataset_format(images, ctx.channels, cfg.image_size)
    out.timings["synthesize"] = (
        out.timings.get("synthesize", 0.0) + time.perf_counter() - t0
    )
    for o in owners.unique().tolist():
        for c in labels.unique().tolist():
            idx = torch.nonzero((owners == o) & (labels == c)).flatten()[
                :SAMPLES_PER_CELL
            ]
            if len(idx):
                out.samples[(int(o), int(c))] = images[idx]
    return images


def train_global(
    ctx: ServerContext, images: torch.Tensor, labels: torch.Tensor, out: ServerOutput
) -> None:
    """Train the global classifier on the synthetic set (server device)."""
    cfg = ctx.cfg
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = build_classifier(cfg.classifier, ctx.channels, ctx.num_classes)
    train_classifier(
        model,
        images,
        labels,
        epochs=cfg.train_epochs,
        batch_size=cfg.train_batch_size,
        lr=cfg.learning_rate,
        seed=cfg.seed,
        device=ctx.device,
        progress=True,
        desc="train global classifier",
    )
    out.model_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out.arch = cfg.classifier
    out.timings["train"] = time.perf_counter() - t0
