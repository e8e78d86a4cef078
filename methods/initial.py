"""Where every classifier a run trains starts (``classifier-init``), and the server's
labelled public set.

``classifier-init = random``: the run's ``classifier`` as the run ``seed`` initialises it.
``classifier-init = public``: the classifier ``public-only`` trains on the server's public
data (the same images, draw, seed and settings; its set size as for
``min-clients`` clients), computed once per run. Every method that trains a
classifier starts from it: the server's global training of the synthesizing
methods (``steps.train_global``) and the weights the weight-uploading methods
send down (FedAvg, DENSE, FedHydra, Guha, DOSFL and FedDiff clients fine-tune
it). So a comparison under one ``classifier-init`` gives every method the same start.

Left out, by their papers' design: FedLMG's and ``local``'s clients train their
own architectures from a seeded init, and a FedHydra client whose architecture
is not ``classifier`` does too.
"""

from __future__ import annotations

import time

import torch

from common.config import ConfigError
from common.datasets import DatasetInfo, dataset_info, public_pairs
from common.models import build_classifier

from .base import ServerContext

ALL = 1_000_000  # more than any dataset's public split: all of it


def caption_labels(captions: list[str], info: DatasetInfo) -> torch.Tensor | None:
    """The class id each caption names, by the dataset's phrase bank; ``None``
    when some caption is not in the bank (the captions do not name classes)."""
    texts, ids = info.phrase_bank()
    index = dict(zip(texts, ids.tolist(), strict=True))
    if not all(c in index for c in captions):
        return None
    return torch.tensor([index[c] for c in captions], dtype=torch.int64)


def public_set_size(ctx: ServerContext, clients: int, fixed: int = 0) -> int:
    """How many public images the public classifier trains on: ``fixed`` if set,
    else what ``class-names`` synthesizes for ``clients`` clients
    (``images-per-class x clients x classes``, at most ``synth-budget``; 0:
    unlimited); ``clients=0``: the most it can be before they are known."""
    if fixed:
        return fixed
    cfg = ctx.cfg
    n = cfg.images_per_class * clients * ctx.num_classes if clients else ALL
    return min(n, cfg.synth_budget) if cfg.synth_budget else n


def labelled_public_set(
    ctx: ServerContext, n: int, who: str = "method='public-only'"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``n`` public images ``[N, C, S, S]`` in ``[-1, 1]`` and their labels
    ``[N]``; ``ConfigError``, naming ``who`` needs them, where the dataset has no
    labelled public images."""
    args = ctx.cfg.data_args()
    pairs = public_pairs(args, n)
    info = ctx.info or dataset_info(args)
    if pairs is None or info is None:
        raise ConfigError(
            f"{who} trains on public images the server holds, and "
            f"dataset={ctx.cfg.dataset!r} has none; use dataset='mnist-domains' or "
            "'mnist'"
        )
    images, captions = pairs
    labels = caption_labels(captions, info)
    if labels is None:
        raise ConfigError(
            f"dataset={ctx.cfg.dataset!r}: its public captions do not name classes "
            f"of its phrase bank, so {who} has no labels to train on"
        )
    if images.shape[1] != info.channels:
        raise ConfigError(
            f"dataset={ctx.cfg.dataset!r}: public images have {images.shape[1]} "
            f"channels, the clients' {info.channels}"
        )
    return images, labels


def seeded_draw(
    images: torch.Tensor, labels: torch.Tensor, n: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` of the images, drawn by ``seed`` (in their order); all if fewer."""
    if n >= len(labels):
        return images, labels
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(labels), generator=g)[:n].sort().values
    return images[keep], labels[keep]


def check_init(ctx: ServerContext) -> None:
    """``ConfigError`` before any client works where ``classifier-init = public`` has no
    labelled public images to train on."""
    if ctx.cfg.classifier_init == "public":
        labelled_public_set(ctx, 1, "classifier-init='public'")


def random_state(ctx: ServerContext) -> dict[str, torch.Tensor]:
    """The run's classifier as the run seed initialises it."""
    torch.manual_seed(ctx.cfg.seed)
    model = build_classifier(ctx.cfg.classifier, ctx.channels, ctx.num_classes)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def public_state(ctx: ServerContext) -> dict[str, torch.Tensor]:
    """public-only's classifier for ``min-clients`` clients; trained once per
    run (``ctx.memo``), its seconds in ``ctx.memo['init-s']``."""
    if "public-init" not in ctx.memo:
        from .steps import fit_classifier

        t0 = time.perf_counter()
        who = "classifier-init='public'"
        n = public_set_size(ctx, ctx.cfg.min_clients)
        images, labels = seeded_draw(
            *labelled_public_set(ctx, ALL, who), n, ctx.cfg.seed
        )
        model = fit_classifier(
            ctx.cfg,
            ctx.channels,
            ctx.num_classes,
            images,
            labels,
            epochs=ctx.cfg.train_epochs,
            seed=ctx.cfg.seed,
            device=ctx.device,
            progress=True,
            desc="train the public init",
        )
        ctx.memo["public-init"] = {
            k: v.detach().cpu().clone() for k, v in model.state_dict().items()
        }
        ctx.memo["init-s"] = time.perf_counter() - t0
    return ctx.memo["public-init"]


def initial_state(ctx: ServerContext) -> dict[str, torch.Tensor]:
    """The weights every classifier of the run starts from (``classifier-init``).

    Parameters
    ----------
    ctx : ServerContext
        With the federation's classes known (``ctx.info``).

    Returns
    -------
    dict of str to Tensor
        The state dict (detached copies; under ``public`` one per run).
    """
    return (
        public_state(ctx) if ctx.cfg.classifier_init == "public" else random_state(ctx)
    )
