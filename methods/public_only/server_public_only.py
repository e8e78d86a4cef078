"""Public only: what the server knows from its own public data, with no client.

The floor beside ``zero-shot``: clients do no work and upload nothing but the
reply's envelope (class names, example count, domain). The server trains the
global classifier on public images (``common.datasets.public_pairs``: for the
digits, MNIST train[:30000] in every style, the split the embedded stack was
pretrained on) with the settings every method's global classifier gets
(``classifier``, ``train-epochs``, ``train-batch-size``, ``learning-rate``,
``seed``: ``steps.train_global``):

* as many images as ``class-names`` synthesizes (``images-per-class`` per client
  per class, at most ``synth-budget``): real public images against synthetic
  ones, image for image; or ``public-only-images``;
* labelled by their captions through the dataset's phrase bank (as ``guha``'s
  ``server-cv`` reads them): a public caption names its class.

A method that does not beat this row on the global test set learned nothing
from its clients that the server's public data did not already hold.
"""

from __future__ import annotations

import torch

from common.config import ConfigError
from common.contract import Reply
from common.datasets import DatasetInfo, dataset_info, public_pairs

from ..base import OneShotMethod, ServerContext, ServerOutput
from ..steps import train_global
from .config_public_only import PublicOnlyConfig

ALL = 1_000_000  # more than any dataset's public split: all of it


def caption_labels(captions: list[str], info: DatasetInfo) -> torch.Tensor | None:
    """The class id each caption names, by the dataset's phrase bank; ``None``
    when some caption is not in the bank (the captions do not name classes)."""
    texts, ids = info.phrase_bank()
    index = dict(zip(texts, ids.tolist(), strict=True))
    if not all(c in index for c in captions):
        return None
    return torch.tensor([index[c] for c in captions], dtype=torch.int64)


def train_size(ctx: ServerContext, clients: int) -> int:
    """``public-only-images``, or what class-names synthesizes for ``clients``
    clients: ``images-per-class x clients x classes``, at most ``synth-budget``
    (0: unlimited); ``clients=0``: the most it can be before they are known."""
    cfg = ctx.cfg
    n = cfg.options(PublicOnlyConfig).public_only_images
    if n:
        return n
    n = cfg.images_per_class * clients * ctx.num_classes if clients else ALL
    return min(n, cfg.synth_budget) if cfg.synth_budget else n


def labelled_public_set(
    ctx: ServerContext, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``n`` public images ``[N, C, S, S]`` in ``[-1, 1]`` and their labels
    ``[N]``; ``ConfigError`` where the dataset has no labelled public images."""
    args = ctx.cfg.data_args()
    pairs = public_pairs(args, n)
    info = ctx.info or dataset_info(args)
    if pairs is None or info is None:
        raise ConfigError(
            f"method='public-only' trains on public images the server holds, and "
            f"dataset={ctx.cfg.dataset!r} has none; use dataset='mnist-domains' or "
            "'mnist'"
        )
    images, captions = pairs
    labels = caption_labels(captions, info)
    if labels is None:
        raise ConfigError(
            f"dataset={ctx.cfg.dataset!r}: its public captions do not name classes "
            "of its phrase bank, so public-only has no labels to train on"
        )
    if images.shape[1] != info.channels:
        raise ConfigError(
            f"dataset={ctx.cfg.dataset!r}: public images have {images.shape[1]} "
            f"channels, the clients' {info.channels}"
        )
    return images, labels


class PublicOnly(OneShotMethod):
    """No client work; the global classifier trained on labelled public images."""

    name = "public-only"
    config = PublicOnlyConfig

    def check(self, ctx: ServerContext) -> None:
        """Load the labelled public images (as many as it may train on): fail
        before any client works where the dataset has none."""
        self._public = labelled_public_set(ctx, train_size(ctx, 0))

    def server_work(self, replies: list[Reply], ctx: ServerContext) -> ServerOutput:
        """Train the global classifier on ``train_size`` of the public images."""
        out = ServerOutput()
        public = getattr(self, "_public", None)
        n = train_size(ctx, max(1, len(replies)))
        images, labels = public if public is not None else labelled_public_set(ctx, n)
        if n < len(labels):  # a seeded draw of the n it trains on
            g = torch.Generator().manual_seed(ctx.cfg.seed)
            keep = torch.randperm(len(labels), generator=g)[:n].sort().values
            images, labels = images[keep], labels[keep]
        train_global(ctx, images, labels, out)
        out.extra["public_only"] = {
            "images": len(labels),
            "per_class": torch.bincount(labels, minlength=ctx.num_classes).tolist(),
        }
        return out
