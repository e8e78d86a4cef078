"""The centralized oracle, in-process: one classifier on the union of the
clients' real training data, scored as the round scores the global model."""

from __future__ import annotations

import time
from typing import Any

from .config import ORACLE


def run_centralized(cfg: Any, num_clients: int) -> tuple[dict[str, Any], float]:
    """The oracle: one classifier trained on the union of all clients' real training
    data, evaluated on the global test set of the clients' domains (the function
    and the domains the round uses) and on each client's held-out split. Returns a
    results-like dict."""
    import torch

    from client_app.app import client_data
    from common.datasets import (
        dataset_info,
        global_test_set,
        participating_domains,
    )
    from common.models import build_classifier
    from common.train import accuracy, predict, train_classifier

    t0 = time.perf_counter()
    # 1. The clients' data, exactly as the ClientApp loads it
    parts = [client_data(cfg, pid, num_clients) for pid in range(num_clients)]
    x = torch.cat([p.train_images for p in parts])
    y = torch.cat([p.train_labels for p in parts])
    # 2. Train on the union (same classifier and schedule as the server)
    torch.manual_seed(cfg.seed)
    model = build_classifier(cfg.classifier, int(x.shape[1]), parts[0].num_classes)
    train_classifier(
        model,
        x,
        y,
        epochs=cfg.train_epochs,
        batch_size=cfg.train_batch_size,
        lr=cfg.learning_rate,
        seed=cfg.seed,
    )
    # 3. Evaluate on every client's held-out split
    clients: list[dict[str, Any]] = [
        {
            "partition_id": pid,
            "domain": p.domain,
            "accuracy": accuracy(model, p.test_images, p.test_labels),
        }
        for pid, p in enumerate(parts)
    ]
    # 4. Evaluate on the global test set, as the round's step 7b does
    domains = participating_domains(
        dataset_info(cfg.data_args()), [p.domain for p in parts]
    )
    test = (
        global_test_set(cfg.data_args(), domains, cfg.global_test_per_class)
        if domains
        else None
    )
    glob, glob_per_domain = (
        test.score(predict(model, test.images)) if test is not None else (None, {})
    )
    wall = time.perf_counter() - t0
    res = {
        "method": ORACLE,
        "clients": clients,
        "mean_accuracy": sum(c["accuracy"] for c in clients) / len(clients),
        "global_accuracy": glob,
        "global_accuracy_per_domain": glob_per_domain,
        "global_test_size": len(test) if test is not None else 0,
        "upload_bytes_per_client": None,
        "timings_s": {"total": round(wall, 3)},
        "num_train_examples": len(y),
    }
    return res, wall
