"""The pretraining schedule, the public split's captions and style-balanced sampling."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from common.mnist_domains import STYLES, phrase_bank

NUM_CLASSES = 10

IMAGE_SIZE = 16


@dataclass
class Schedule:
    """How much of each stage to run (``--quick`` shrinks everything)."""

    num_public: int = 30_000
    num_heldout: int = 2_000
    clip_steps: int = 1_000
    clip_batch: int = 512
    clip_lr: float = 2e-3
    plain_share: float = 0.35  # of sampled training images (CLIP and generator)
    gen_steps: int = 1_400
    gen_batch: int = 128
    gen_lr: float = 1e-3
    gen_warmup: int = 100
    gen_blocks: tuple[int, ...] = (32, 64, 64)
    gen_layers_per_block: int = 1
    ema_decay: float = 0.999
    cond_dropout: float = 0.1
    mean_cond_prob: float = 0.5
    judge_epochs: int = 4
    num_test: int = 10_000  # MNIST test images per style for the judge
    eval_samples: int = 32  # per (style, class)
    eval_steps: int = 20
    guidance_scale: float = 3.0
    grid_rows: int = 4  # samples per style in samples.png


QUICK = Schedule(
    num_public=3_000,
    num_heldout=500,
    clip_steps=20,
    clip_batch=256,
    gen_steps=15,
    gen_batch=64,
    gen_warmup=3,
    gen_blocks=(16, 32),
    judge_epochs=1,
    num_test=1_000,
    eval_samples=2,
    eval_steps=4,
    grid_rows=1,
)


def log(msg: str) -> None:
    """One timestamped progress line of the pretraining."""
    print(f"[pretrain {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class CaptionTable:
    """The phrase bank grouped by (class, style): group id = class * len(STYLES) + style."""

    texts: list[str]
    labels: torch.Tensor  # [M]
    groups: torch.Tensor  # [M]
    members: list[torch.Tensor]  # group id -> bank indices


def caption_table() -> CaptionTable:
    """The phrase bank of every (class, style), grouped (``CaptionTable``)."""
    texts, labels, styles = phrase_bank(NUM_CLASSES, STYLES)
    groups = torch.as_tensor(
        [
            int(c) * len(STYLES) + STYLES.index(s)
            for c, s in zip(labels, styles, strict=True)
        ]
    )
    members = [
        torch.nonzero(groups == g)[:, 0] for g in range(NUM_CLASSES * len(STYLES))
    ]
    return CaptionTable(texts, torch.as_tensor(labels), groups, members)


def sample_captions(
    table: CaptionTable, groups: torch.Tensor, g: torch.Generator
) -> torch.Tensor:
    """One random bank caption (template and style word) per image of ``groups``."""
    sizes = torch.as_tensor([len(table.members[int(k)]) for k in groups])
    pick = (torch.rand(len(groups), generator=g) * sizes).long()
    return torch.stack(
        [table.members[int(k)][int(p)] for k, p in zip(groups, pick, strict=True)]
    )


def image_groups(labels: torch.Tensor, styles: list[str]) -> torch.Tensor:
    """Per image: its (class, style) group id, ``class * len(STYLES) + style``."""
    return labels * len(STYLES) + torch.as_tensor([STYLES.index(s) for s in styles])


def balanced_indices(
    styles: list[str], n: int, plain_share: float, g: torch.Generator
) -> torch.Tensor:
    """``n`` random image indices; ``plain`` drawn with probability ``plain_share``,
    the rare styles equally often. Rare styles are what OSCAR clients hold, so the
    stack spends more of its small budget on them than their 8% share of the data."""
    is_plain = torch.as_tensor([s == "plain" for s in styles])
    n_rare_styles = len(STYLES) - 1
    w = torch.where(
        is_plain,
        plain_share / is_plain.sum(),
        (1 - plain_share) / n_rare_styles / _rare_count(styles),
    )
    return torch.multinomial(w, n, replacement=True, generator=g)


def _rare_count(styles: list[str]) -> torch.Tensor:
    """Per image: how many images share its (rare) style."""
    counts = {s: styles.count(s) for s in set(styles)}
    return torch.as_tensor([float(counts[s]) for s in styles])
