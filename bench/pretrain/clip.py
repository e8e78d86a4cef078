"""Stage 2: the dual encoder (CLIP), trained contrastively; retrieval metrics."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from common.mnist_domains import STYLES

from .data import CaptionTable, Schedule, balanced_indices, log


def train_clip(
    clip: Any,
    tok: Any,
    images: torch.Tensor,
    styles: list[str],
    groups: torch.Tensor,
    table: CaptionTable,
    sch: Schedule,
    seed: int,
) -> list[float]:
    """Contrastive training (Radford et al. 2021) with multi-positive soft targets.

    Each step contrasts a batch of images with the WHOLE phrase bank (440 captions,
    the set retrieval captioning ranks). Many captions describe an image, so the
    one-hot InfoNCE target becomes ``T[i, j] = 1[group(i) == group(j)] / #positives(i)``
    (group = (class, style)); the loss is symmetric (images -> captions and
    captions -> images, over captions whose group is in the batch).
    """
    from common.train import augment

    g = torch.Generator().manual_seed(seed)
    ids = tok(table.texts, padding="max_length", max_length=16, return_tensors="pt")
    opt = torch.optim.AdamW(clip.parameters(), lr=sch.clip_lr, weight_decay=0.05)
    warm = max(1, sch.clip_steps // 20)

    def lr_at(s: int) -> float:  # linear warm-up over 5% of the steps, then cosine
        return (
            min(1.0, (s + 1) / warm)
            * 0.5
            * (1 + math.cos(math.pi * s / sch.clip_steps))
        )

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    clip.train()
    losses: list[float] = []
    bar = tqdm(range(sch.clip_steps), desc="clip", mininterval=5)
    for step in bar:
        idx = balanced_indices(styles, sch.clip_batch, sch.plain_share, g)
        x = augment(images[idx], g)
        grp = groups[idx]
        out = clip(
            input_ids=ids["input_ids"],
            attention_mask=ids["attention_mask"],
            pixel_values=x,
        )
        logits = out.logits_per_image  # [B, M]; learnable temperature inside CLIPModel
        pos = (grp[:, None] == table.groups[None, :]).float()
        loss_i = F.cross_entropy(logits, pos / pos.sum(1, keepdim=True))
        seen = pos.sum(0) > 0
        pos_t = pos.T[seen]
        loss_t = F.cross_entropy(logits.T[seen], pos_t / pos_t.sum(1, keepdim=True))
        loss = 0.5 * (loss_i + loss_t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():  # CLIP clamps the logit scale at 100
            clip.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if step % 50 == 0 or step == sch.clip_steps - 1:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
            if step % 250 == 0 or step == sch.clip_steps - 1:
                log(
                    f"clip step {step} loss {np.mean(losses[-50:]):.4f} "
                    f"scale {float(clip.logit_scale.exp()):.1f}"
                )
    clip.eval()
    return losses


def retrieval_metrics(
    captioner: Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    styles: list[str],
    table: CaptionTable,
) -> dict[str, Any]:
    """Class and style accuracy of retrieval captioning, with and without the label."""
    text_to_bank = {t: i for i, t in enumerate(table.texts)}
    out: dict[str, Any] = {}
    for mode, lab in (("with_label", labels), ("without_label", None)):
        caps = captioner.caption(images, lab)
        grp = table.groups[[text_to_bank[c] for c in caps]]
        pred_style = [STYLES[int(k) % len(STYLES)] for k in grp]
        pred_class = grp // len(STYLES)
        style_ok = np.asarray([p == s for p, s in zip(pred_style, styles, strict=True)])
        per_style = {
            s: float(style_ok[[t == s for t in styles]].mean())
            for s in STYLES
            if s in styles
        }
        out[mode] = {
            "style_accuracy": float(style_ok.mean()),
            "class_accuracy": float((pred_class == labels).float().mean()),
            "style_accuracy_per_style": per_style,
        }
    return out
