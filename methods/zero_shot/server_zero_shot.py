"""Zero-shot: what the stack's own encoders know of the classes, with no client
and no training (CLIP zero-shot, Radford et al., ICML 2021, arXiv 2103.00020).

The floor beside ``public-only``: clients do no work and upload nothing but the
reply's envelope (class names, example count, domain). The server

1. encodes the prompts with the text tower of the ``text-encoder`` CLIP
   (``zero-shot-prompts``): the dataset's class prompt, one per class, as
   ``class-names`` prompts the generator; or the dataset's phrase bank (the
   captions the clients' retrieval captioner ranks), averaged per class or
   each kept as a prompt of its class;
2. takes the image tower of the same CLIP (the two are aligned by its
   contrastive training) and makes the global model
   ``logits_k(x) = s * max_{m in class k} cos(f_img(x), t_m)``
   (``model_zero_shot``): an image gets the class of the nearest prompt;
3. hands it to the round as every global classifier: the round evaluates it on
   the global test set, writes it to ``global_model/`` and pushes it to the
   clients, which evaluate it on their held-out splits.

Deviation from CLIP's evaluation: the prompts are the dataset's (the embedded
stack's caption templates for the digits), not CLIP's 80 ImageNet templates;
``caption-nearest`` (a class scored by its best prompt, not by the mean of its
prompts) is not in the paper.
"""

from __future__ import annotations

import time

import torch

from common.config import ConfigError
from common.contract import Reply

from ..base import OneShotMethod, ServerContext, ServerOutput
from .config_zero_shot import ZeroShotConfig
from .model_zero_shot import ARCH, ZeroShotClassifier, prompt_embeddings


class ZeroShot(OneShotMethod, config=ZeroShotConfig):
    """No client work, no training; the global model is the CLIP zero-shot
    classifier over the class prompts (``ZeroShotClassifier``)."""

    def check(self, ctx: ServerContext) -> None:
        """The ``text-encoder`` checkpoint must be a CLIP with an image tower."""
        if not hasattr(ctx.text_encoder.model, "get_image_features"):
            raise ConfigError(
                f"method='zero-shot' needs a CLIP with an image tower aligned to its "
                f"text tower, and text-encoder={ctx.cfg.text_encoder!r} is a text "
                "tower only; set text-encoder to a CLIPModel (embedded, a folder, "
                "or e.g. openai/clip-vit-large-patch14)"
            )

    def server_work(self, replies: list[Reply], ctx: ServerContext) -> ServerOutput:
        """Encode the prompts, wrap the same CLIP's image tower around them."""
        from common.captioner import load_image_encoder

        out = ServerOutput()
        assert ctx.info is not None  # the round learned the classes before this
        t0 = time.perf_counter()
        k = ctx.num_classes
        # 1. The prompts and the class each names
        how = ctx.cfg.options(ZeroShotConfig).zero_shot_prompts
        if how == "class-name":
            texts = [ctx.info.class_prompt(c) for c in range(k)]
            ids = torch.arange(k)
        else:
            texts, bank_ids = ctx.info.phrase_bank()
            ids = torch.as_tensor(bank_ids, dtype=torch.int64)
        emb = ctx.text_encoder.encode(texts, "pooled")[:, 0, :]
        if how == "caption-mean":
            emb, ids = prompt_embeddings(emb, ids, k), torch.arange(k)
        # 2. The same CLIP's image tower (with its checkpoint's pixel statistics)
        encoder = load_image_encoder(ctx.cfg.text_encoder)
        model = ZeroShotClassifier.from_clip(
            encoder.model, emb, ids, k, ctx.channels, encoder.processor_cfg
        )
        out.model_state = {n: t.detach().cpu() for n, t in model.state_dict().items()}
        out.arch = ARCH
        out.timings["encode"] = time.perf_counter() - t0
        out.extra["zero_shot"] = {
            "prompts": how,
            "texts": len(texts),
            "prompt_vectors": len(ids),
            "encoder": ctx.cfg.text_encoder,
            "logit_scale": float(model.logit_scale),
        }
        return out
