"""Stages 2-4 (dual encoder, generator, judge) and FedDiff's folder."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.mnist_domains import public_styled_set, vocabulary

from .card import folder_size
from .clip import train_clip
from .data import IMAGE_SIZE, NUM_CLASSES, QUICK, CaptionTable, Schedule, log
from .generator import conditioning_table, sampling_config, train_generator


def count(model: torch.nn.Module) -> int:
    """Parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def train_stages(
    args: argparse.Namespace,
    sch: Schedule,
    out: Path,
    images: torch.Tensor,
    styles: list[str],
    labels: torch.Tensor,
    groups: torch.Tensor,
    table: CaptionTable,
    wall: dict[str, float],
    previous: dict[str, Any],
) -> None:
    """Stages 2-4: dual encoder, generator, judge (saved under ``out``)."""
    from common.generator import build_generator, save_generator
    from common.models import SmallCNN, save_classifier
    from common.text_encoder import build_clip, build_tokenizer, load_text_encoder
    from common.train import train_classifier

    # 2. Dual encoder
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    tok = build_tokenizer(vocabulary())
    clip = build_clip(
        len(tok),
        image_size=IMAGE_SIZE,
        channels=1,
        hidden=64,
        layers=2,
        heads=4,
        projection_dim=64,
        patch_size=4,
    )
    clip_losses = train_clip(clip, tok, images, styles, groups, table, sch, args.seed)
    clip.save_pretrained(out / "clip")
    tok.save_pretrained(out / "clip")
    wall["clip"] = time.perf_counter() - t0
    log(f"clip done in {wall['clip']:.0f} s")

    # 3. Generator, conditioned on the frozen text encoder
    t0 = time.perf_counter()
    encoder = load_text_encoder(str((out / "clip").resolve()))
    bank, uncond = conditioning_table(encoder, table)
    torch.manual_seed(args.seed)
    unet, sched = build_generator(
        image_size=IMAGE_SIZE,
        channels=1,
        cond_dim=bank.shape[-1],
        block_out_channels=sch.gen_blocks,
        layers_per_block=sch.gen_layers_per_block,
    )
    log(f"generator: {count(unet):,} parameters")
    ema, gen_losses = train_generator(
        unet, sched, images, styles, groups, bank, uncond, table, sch, args.seed
    )
    save_generator(out / "generator", ema, sampling_config(sched), "pooled")
    wall["generator"] = time.perf_counter() - t0
    log(f"generator done in {wall['generator']:.0f} s")

    # 4. Judge
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    judge = SmallCNN(1, NUM_CLASSES)
    train_classifier(
        judge,
        images,
        labels,
        epochs=sch.judge_epochs,
        seed=args.seed,
        progress=True,
        desc="judge",
    )
    save_classifier(judge, out / "judge", "cnn", 1, NUM_CLASSES)
    wall["judge"] = time.perf_counter() - t0

    previous["losses"] = {
        "clip_first_last": [
            float(np.mean(clip_losses[:20])),
            float(np.mean(clip_losses[-50:])),
        ],
        "generator_first_last": [
            float(np.mean(gen_losses[:20])),
            float(np.mean(gen_losses[-200:])),
        ],
    }


def build_feddiff_stage(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """FedDiff (methods/feddiff): a weight pool of the classifier trained with SGD on
    the public split, an autoencoder over its parameter subset and a latent DDPM,
    saved under ``<out>/feddiff/``. The pool is ranked on the public held-out images
    (the same split as the other stages': never a client's data)."""
    from methods.feddiff.model_feddiff import BuildSettings, build_feddiff

    s = BuildSettings()
    if args.quick:
        s = BuildSettings(pool_steps=60, ae_steps=30, denoiser_train_steps=30)
    if args.feddiff_params:
        s.params = args.feddiff_params
    sch = QUICK if args.quick else Schedule()
    full = public_styled_set(image_size=IMAGE_SIZE, plain_fraction=0.6, seed=args.seed)
    n_pub = min(sch.num_public, len(full.labels))
    n_train = n_pub - sch.num_heldout
    ho = slice(n_train, min(n_pub, n_train + s.eval_images))
    log(
        f"feddiff: {args.classifier} on {n_train} public images, pool ranked on "
        f"{ho.stop - ho.start} held-out ones; generated subset {s.params!r}"
    )
    torch.manual_seed(args.seed)
    cfg = build_feddiff(
        out / "feddiff",
        full.images[:n_train],
        full.labels[:n_train],
        full.images[ho],
        full.labels[ho],
        s,
        arch=args.classifier,
        in_channels=1,
        num_classes=NUM_CLASSES,
        seed=args.seed,
        log=log,
    )
    log(
        f"feddiff done in {cfg['wall_s']['total']:.0f} s; "
        f"{folder_size(out / 'feddiff') / 1e6:.2f} MB"
    )
    return cfg
