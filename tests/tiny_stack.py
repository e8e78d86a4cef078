"""Tiny random foundation models saved in HF format, loaded through the same
``from_pretrained`` path as hub models and the embedded stack."""

from __future__ import annotations

from pathlib import Path

import torch

from common.data import vocabulary
from common.foundation import (
    build_clip,
    build_generator,
    build_tokenizer,
    save_generator,
)
from common.models import SmallCNN, save_classifier


def make_tiny_stack(root: Path, cond_dim: int = 16) -> Path:
    torch.manual_seed(0)
    tok = build_tokenizer(vocabulary())
    clip = build_clip(len(tok), hidden=32, layers=1, heads=2, projection_dim=cond_dim)
    clip.save_pretrained(root / "clip")
    tok.save_pretrained(root / "clip")
    unet, sched = build_generator(
        cond_dim=cond_dim, block_out_channels=(16, 32), attention_head_dim=4
    )
    save_generator(root / "generator", unet, sched, "pooled")
    save_classifier(SmallCNN(1, 10, width=8), root / "judge", "cnn", 1, 10)
    return root
