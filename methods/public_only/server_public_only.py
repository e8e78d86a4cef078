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
from its clients that the server's public data did not already hold. Under
``classifier-init = public`` every method starts from this classifier (trained for
``min-clients`` clients: ``methods/initial.py``).
"""

from __future__ import annotations

import torch

from common.contract import Reply

from ..base import OneShotMethod, ServerContext, ServerOutput
from ..initial import ALL, labelled_public_set, public_set_size, seeded_draw
from ..steps import train_global
from .config_public_only import PublicOnlyConfig


def train_size(ctx: ServerContext, clients: int) -> int:
    """``public-only-images``, or what class-names synthesizes for ``clients``
    clients (``initial.public_set_size``)."""
    fixed = ctx.cfg.options(PublicOnlyConfig).public_only_images
    return public_set_size(ctx, clients, fixed)


class PublicOnly(OneShotMethod, config=PublicOnlyConfig):
    """No client work; the global classifier trained on labelled public images."""

    def check(self, ctx: ServerContext) -> None:
        """Load the labelled public images (all: it draws from them as the
        public init does): fail before any client works where the dataset has
        none."""
        self._public = labelled_public_set(ctx, ALL)

    def server_work(self, replies: list[Reply], ctx: ServerContext) -> ServerOutput:
        """Train the global classifier on ``train_size`` of the public images."""
        out = ServerOutput()
        public = getattr(self, "_public", None)
        n = train_size(ctx, max(1, len(replies)))
        images, labels = public if public is not None else labelled_public_set(ctx, ALL)
        images, labels = seeded_draw(images, labels, n, ctx.cfg.seed)
        # It is the public init itself: from a random start under either init.
        train_global(ctx, images, labels, out, from_init=False)
        out.extra["public_only"] = {
            "images": len(labels),
            "per_class": torch.bincount(labels, minlength=ctx.num_classes).tolist(),
        }
        return out
