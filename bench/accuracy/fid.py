"""The generator's quality per client domain: FID-proxy in judge features."""

from __future__ import annotations

import math
import time
from typing import Any

from bench.report import mean, say


def generator_fid(
    cfg: Any,
    per_class: int,
    seed: int = 0,
    num_client_images: int = 1000,
    oracle_captions: bool = True,
) -> dict[str, Any]:
    """FID-proxy of the generator per client domain (judge features).

    For each domain ``d``: a client holding ``num_client_images`` client-pool
    images rendered in ``d`` computes its OSCAR upload (``embed_classes``: its
    captioner, text encoder, per-class mean); ``per_class`` samples per class
    conditioned on it are compared with ``per_class x classes`` disjoint real
    images of ``d``. The same with oracle captions (if ``oracle_captions``), and
    with class-name prompts (plain style, the same samples for every domain). ``real_vs_real`` compares
    two disjoint real sets of the same size: the floor at this sample size.
    """
    import numpy as np
    import torch
    from transformers.utils import logging as hf_logging

    from common.datasets import ClientData, DatasetInfo
    from common.generator import load_generator
    from common.maths import fid_proxy
    from common.mnist_domains import (
        DIGIT_NAMES,
        class_name_prompt,
        mnist_client_pool,
        render_style,
    )
    from common.models import load_classifier
    from common.synthesis import sample as engine_sample
    from common.synthesis import to_dataset_format
    from common.synthesis_settings import SynthesisSettings
    from common.text_encoder import load_text_encoder
    from common.train import features, predict
    from common.weights import embedded_dir
    from methods.oscar.client_oscar import embed_classes

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per upload otherwise
    t0 = time.perf_counter()
    num_classes = len(DIGIT_NAMES)
    gen = load_generator(cfg.generator, cfg.scheduler)
    enc = load_text_encoder(cfg.text_encoder)
    uncond = enc.encode([""], cfg.embedding)
    judge = load_classifier(embedded_dir() / "judge")

    # the run's sampler settings, guidance cut-off included; each call its own seed
    settings = SynthesisSettings.from_config(cfg, static_shapes=False)

    def sample(cond: torch.Tensor, s: int) -> torch.Tensor:
        x = engine_sample(gen, cond, uncond, **settings.replace(seed=s).kwargs())
        return to_dataset_format(x, 1, cfg.image_size)

    # 1. Real images: a client part (captioned) and a disjoint reference part
    raw, labels = mnist_client_pool()
    perm = np.random.default_rng(seed).permutation(len(labels))
    n_ref = per_class * num_classes
    client_idx = np.sort(perm[:num_client_images])
    ref_idx = np.sort(perm[num_client_images : num_client_images + n_ref])
    floor_idx = np.sort(perm[num_client_images + n_ref : num_client_images + 2 * n_ref])

    # 2. Class-name prompts: plain-style samples, compared with every domain
    prompts = [class_name_prompt(c) for c in range(num_classes)]
    cn_cond = enc.encode(prompts, cfg.embedding).repeat_interleave(per_class, dim=0)
    cn_fake = sample(cn_cond, seed)
    cn_feats = features(judge, cn_fake)
    cn_want = torch.arange(num_classes).repeat_interleave(per_class)
    cn_acc = float((predict(judge, cn_fake) == cn_want).float().mean())

    per_domain: dict[str, dict[str, Any]] = {}
    for k, d in enumerate(cfg.domain_list):
        real = render_style(raw[ref_idx], d, cfg.image_size, seed=seed + 1)
        real_feats = features(judge, real)
        floor = features(
            judge, render_style(raw[floor_idx], d, cfg.image_size, seed=seed + 2)
        )
        data = ClientData(
            train_images=render_style(raw[client_idx], d, cfg.image_size, seed=seed),
            train_labels=torch.as_tensor(labels[client_idx]),
            test_images=real,
            test_labels=torch.as_tensor(labels[ref_idx]),
            domain=d,
            info=DatasetInfo("mnist-domains", DIGIT_NAMES, digits=True),
        )
        row: dict[str, Any] = {
            "real_vs_real": fid_proxy(real_feats, floor),
            "class_names": fid_proxy(real_feats, cn_feats),
        }
        variants = [("oscar", cfg.captioner)]
        if oracle_captions:
            variants.append(("oscar_oracle", "oracle"))
        for key, captioner in variants:
            c = cfg.model_copy(update={"captioner": captioner, "dp_epsilon": 0.0})
            up = embed_classes(c, data, seed=seed)
            cond = up.embeddings.means.float().repeat_interleave(per_class, dim=0)
            want = up.embeddings.class_ids.repeat_interleave(per_class)
            fake = sample(cond, seed + 100 * (k + 1))
            row[key] = fid_proxy(real_feats, features(judge, fake))
            row[f"{key}_judge_accuracy"] = float(
                (predict(judge, fake) == want).float().mean()
            )
            if key == "oscar":
                row["example_caption"] = up.captions[0] if up.captions else ""
        per_domain[d] = row
        say(
            f"FID-proxy {d:>9}: real vs real {row['real_vs_real']:.2f}, oscar "
            f"{row['oscar']:.2f}, oracle captions {row.get('oscar_oracle', math.nan):.2f},"
            f" class names {row['class_names']:.2f}"
        )
    keys = (
        "real_vs_real",
        "oscar",
        "oscar_oracle",
        "class_names",
        "oscar_judge_accuracy",
        "oscar_oracle_judge_accuracy",
    )
    return {
        "per_domain": per_domain,
        "mean": {k: mean(r.get(k) for r in per_domain.values()) for k in keys},
        "class_names_judge_accuracy": cn_acc,
        "samples_per_class": per_class,
        "real_images_per_domain": n_ref,
        "client_images_per_domain": num_client_images,
        "features": "judge classifier embed() (penultimate layer)",
        **{k: v for k, v in settings.kwargs().items() if k != "seed"},
        "seed": seed,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
