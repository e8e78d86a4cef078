"""Classifier training and evaluation loops (Flower-free)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .optim import AdamW, OneCycle
from .synthesis import from_uint8


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 1/8 of the image: cheap and label-preserving for digits."""
    pad = max(1, x.shape[-1] // 8)
    xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=g).tolist()
    return xp[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]]


def train_classifier(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    device: torch.device | str = "cpu",
    augment_shifts: bool = True,
    progress: bool = False,
    desc: str = "train classifier",
    soft_targets: torch.Tensor | None = None,
) -> list[float]:
    """Train with AdamW + one-cycle schedule; returns the mean loss per epoch.

    ``soft_targets`` ``[N, K]`` (teacher probabilities) adds knowledge distillation:
    ``loss = CE(z, y) + mean_i sum_k -q_ik log softmax(z_i)_k`` (Hinton et al. 2015
    at temperature 1, as FedLMG's ``md``/``sd`` aggregations).

    The whole set moves to ``device`` once (uint8 images stay uint8 there and are
    converted per batch); batches, shifts and the forward pass all run on the
    device, with no DataLoader. On CUDA: bf16 autocast and channels_last.
    """
    if len(images) == 0:
        raise ValueError("train_classifier: no training images")
    if len(images) != len(labels):
        raise ValueError(
            f"train_classifier: {len(images)} images but {len(labels)} labels"
        )
    device = torch.device(device)
    cuda = device.type == "cuda"
    model.to(device).train()
    if cuda:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    images, labels = images.to(device), labels.to(device)
    if soft_targets is not None:
        if tuple(soft_targets.shape[:1]) != (len(labels),):
            raise ValueError(
                f"train_classifier: soft_targets {tuple(soft_targets.shape)} for "
                f"{len(labels)} images"
            )
        soft_targets = soft_targets.float().to(device)
    g = torch.Generator().manual_seed(seed)
    # torch.optim.AdamW + OneCycleLR, without their import of torch._dynamo in
    # every training ClientApp process (common/optim.py)
    steps_per_epoch = max(1, (len(images) + batch_size - 1) // batch_size)
    schedule = OneCycle(lr, max(1, epochs * steps_per_epoch), pct_start=0.15)
    opt = AdamW(model.parameters(), lr=lr, weight_decay=1e-4, schedule=schedule)
    history: list[float] = []
    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        perm = torch.randperm(len(images), generator=g)
        total, n = 0.0, 0
        for i in range(0, len(images), batch_size):
            idx = perm[i : i + batch_size].to(device)
            x = images[idx]
            x = from_uint8(x)
            if augment_shifts:
                x = augment(x, g)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            y = labels[idx]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                logits = model(x).float()
                loss = F.cross_entropy(logits, y)
                if soft_targets is not None:
                    loss = loss + soft_cross_entropy(logits, soft_targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            n += len(idx)
        history.append(total / n)
        bar.set_postfix(loss=f"{history[-1]:.3f}")
    return history


def soft_cross_entropy(logits: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``mean_i sum_k -q_ik log softmax(logits_i)_k``: cross-entropy to soft labels."""
    return -(q * F.log_softmax(logits, dim=1)).sum(1).mean()


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Predicted class ids ``[N]`` of ``images`` (uint8 or float in ``[-1, 1]``)."""
    model.to(device).eval()
    out = [
        model(from_uint8(images[i : i + batch_size]).to(device)).argmax(1).cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512
) -> float:
    """Fraction of ``images`` predicted as ``labels``; NaN for no labels."""
    if len(labels) == 0:
        return float("nan")
    return float((predict(model, images, batch_size) == labels).float().mean())


@torch.no_grad()
def features(
    model: nn.Module, images: torch.Tensor, batch_size: int = 512
) -> torch.Tensor:
    """Penultimate-layer features (``model.embed``) for the FID-proxy."""
    model.eval()
    feats = [
        model.embed(from_uint8(images[i : i + batch_size]))  # type: ignore[operator]
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(feats)
