"""The OSCAR round in-process, for sweeps: the clients' uploads once per seed,
then one server run per variant of the server's settings (sampler, guidance,
images per class, ...), through the app's own client and server code.

Each variant reports the global classifier's accuracy on the global test set
(``common.datasets.global_test_set``: the MNIST test split in every client's
domain, as the papers measure), its mean accuracy on the clients' held-out
splits, the FID-proxy of each client's synthetic images against its held-out
images, and the synthesis speed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


def say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


@dataclass
class Federation:
    """One seed's clients and their uploads (computed once, shared by variants)."""

    base: dict[str, Any]  # the run config of the seed
    datas: list[Any]
    uploads: list[Any]
    real_features: list[torch.Tensor]
    judge: Any
    test: Any  # GlobalTestSet | None


def federation(base: dict[str, Any], num_clients: int) -> Federation:
    from client_app.app import client_data
    from common.datasets import dataset_info, global_test_set, participating_domains
    from common.models import load_classifier
    from common.train import features
    from common.weights import embedded_dir
    from methods import build_config
    from methods.oscar.client_oscar import embed_classes

    cfg = build_config(base)
    datas = [client_data(cfg, pid, num_clients) for pid in range(num_clients)]
    ups = [embed_classes(cfg, d, seed=cfg.seed * 1000 + p) for p, d in enumerate(datas)]
    judge = load_classifier(embedded_dir() / "judge")
    info = dataset_info(cfg.data_args())
    domains = participating_domains(info, [d.domain for d in datas])
    test = global_test_set(cfg.data_args(), domains) if domains else None
    real = [features(judge, d.test_images) for d in datas]
    return Federation(base, datas, ups, real, judge, test)


def run_variant(fed: Federation, over: dict[str, Any], label: str) -> dict[str, Any]:
    """The server's work for one variant of the run config; one result row."""
    from common.datasets import dataset_info
    from common.maths import fid_proxy
    from common.models import build_classifier
    from common.train import features, predict
    from methods import build_config
    from methods.base import ServerContext, ServerOutput, classifier_accuracy
    from methods.steps import per_class_rows, synthesize_set, train_global

    cfg = build_config(fed.base | over)
    ctx = ServerContext(cfg, Path("."), info=dataset_info(cfg.data_args()))
    parts = [
        per_class_rows(
            u.embeddings.means, u.embeddings.class_ids, pid, cfg.images_per_class
        )
        for pid, u in enumerate(fed.uploads)
    ]
    conds, labels, owners = (torch.cat(p) for p in zip(*parts, strict=True))
    out = ServerOutput()
    images = synthesize_set(ctx, conds, labels, owners, out, desc=label)
    train_global(ctx, images, labels, out)
    assert out.model_state is not None
    accs, fids = [], []
    for pid, d in enumerate(fed.datas):
        accs.append(classifier_accuracy(out.model_state, out.arch, ctx.num_classes, d))
        fids.append(
            fid_proxy(
                fed.real_features[pid], features(fed.judge, images[owners == pid])
            )
        )
    global_acc, per_domain = None, {}
    if fed.test is not None:
        model = build_classifier(out.arch, ctx.channels, ctx.num_classes)
        model.load_state_dict(out.model_state)
        global_acc, per_domain = fed.test.score(predict(model, fed.test.images))
    row = {
        "variant": label,
        "seed": cfg.seed,
        "images": len(labels),
        "img_s": len(labels) / out.timings["synthesize"],
        "synthesize_s": out.timings["synthesize"],
        "train_s": out.timings["train"],
        "global_accuracy": global_acc,
        "global_accuracy_per_domain": per_domain,
        "accuracy": sum(accs) / len(accs),
        "fid_proxy": sum(fids) / len(fids),
    }
    say(
        f"seed {cfg.seed} {label}: {row['img_s']:.1f} img/s, global acc "
        f"{global_acc if global_acc is None else round(global_acc, 3)}, client acc "
        f"{row['accuracy']:.3f}, FID-proxy {row['fid_proxy']:.2f}"
    )
    return row
