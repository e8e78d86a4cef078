"""The real round in-process, for sweeps of the server's settings.

Per seed, the clients' uploads are recorded once: the real ClientApp's collect
on every partition, through ``deploy.inprocess``'s Grid
(``bench.replay.record_replies``). Each variant of the server's settings
(sampler, guidance, images per class, ...) then runs the whole one-shot round,
``deploy.inprocess.run_round``, with a ``ReplayClient`` in place of the
ClientApp: it answers the collect message with the recorded upload and runs the
real ClientApp's evaluation of the pushed model. The server side is the app's
own: validation, server work (budget included), global evaluation, results.

Each variant reports the global classifier's accuracy on the global test set
(results.json's ``global_accuracy``), its mean accuracy on the clients'
held-out splits (their evaluations: ``mean_accuracy``), the FID-proxy of each
client's synthetic images (the round's ``save-synthetic`` set) against its
held-out images, and the synthesis speed.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.replay import ReplayClient, record_replies
from bench.report import mean, say


@dataclass
class Federation:
    """One seed's clients: their recorded uploads (computed once, replayed to
    every variant) and what the FID-proxy compares their synthetic images with.
    """

    base: dict[str, Any]  # the run config of the seed
    num_clients: int
    replies: list[bytes]  # partition p's collect reply, Flower's wire format
    info: dict[str, Any]  # bench.replay.record_replies' info
    real_features: list[torch.Tensor]  # judge features of each held-out split
    judge: Any

    def client(self) -> ReplayClient:
        """The recorded uploads as a ClientApp; evaluations run the real one."""
        from client_app.app import app

        return ReplayClient.of(self.replies, self.info, evaluate=app)

    def vector_bytes_per_class(self) -> float | None:
        """fp16 bytes of the conditioning vectors one client uploads for one
        class (mean over clients), from the recorded OSCAR payloads."""
        from common import contract as C

        key = self.info.get("payload_key")
        per_client = []
        for raw in self.replies:
            r = C.unpack_reply(0, _content(raw), key)
            ids = r.tensors.get("class_ids")
            if ids is not None and len(ids):
                per_client.append(2 * r.tensors["mean"].numel() / len(ids.unique()))
        return mean(per_client)


def _content(raw: bytes) -> Any:
    from flwr.common.serde import ProtoRecordDict, recorddict_from_proto

    return recorddict_from_proto(ProtoRecordDict.FromString(raw))


def federation(base: dict[str, Any], num_clients: int) -> Federation:
    """Record the uploads of ``num_clients`` clients under the run config ``base``.

    Parameters
    ----------
    base
        The full run config of the seed (defaults, the bench's keys, the seed).
    num_clients
        Partitions of the benchmark split; one device each.

    Returns
    -------
    Federation
        The recorded replies and the judge features of each client's held-out
        images (the ClientApp's own ``client_data``).
    """
    from client_app.app import client_data
    from common.models import load_classifier
    from common.train import features
    from common.weights import embedded_dir
    from methods import build_config

    cfg = build_config(base)
    replies, info = record_replies(base, num_clients)
    judge = load_classifier(embedded_dir() / "judge")
    datas = [client_data(cfg, pid, num_clients) for pid in range(num_clients)]
    real = [features(judge, d.test_images) for d in datas]
    return Federation(dict(base), num_clients, replies, info, real, judge)


def load_synthetic(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A saved synthetic set (``common.synthetic_set``) as ``(images, clients)``:
    uint8 ``[N, C, H, W]`` (the PNGs hold the round's uint8 images exactly) and
    the partition id each row's condition came from."""
    import datasets
    import numpy as np

    from common.datasets.huggingface import column

    ds = datasets.load_from_disk(str(path))
    x = torch.from_numpy(np.stack([np.asarray(im) for im in ds["image"]]))
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return x.contiguous(), torch.as_tensor(column(ds, "client"))


def run_variant(fed: Federation, over: dict[str, Any], label: str) -> dict[str, Any]:
    """The whole round for one variant of the run config; one result row.

    Parameters
    ----------
    fed
        The seed's recorded uploads (``federation``).
    over
        Run-config keys of this variant over ``fed.base``.
    label
        The row's ``variant`` name.

    Returns
    -------
    dict
        ``variant``, ``seed``, ``images``, ``img_s``, ``synthesize_s``,
        ``train_s``, ``global_accuracy`` (and per domain), ``accuracy`` (mean
        over clients) and ``fid_proxy`` (mean over clients).
    """
    from common.maths import fid_proxy
    from common.train import features
    from deploy.inprocess import partition_fleet, run_round

    rc = fed.base | over | {"save-synthetic": True}
    # 1. The round: recorded uploads, the server's real work, real evaluations
    with tempfile.TemporaryDirectory(prefix="bench-variant-") as tmp:
        res, _ = run_round(
            partition_fleet(fed.num_clients),
            rc | {"output-dir": tmp},
            "variant",
            client_app=fed.client(),
        )
        images, owners = load_synthetic(Path(res["synthetic_set"]["path"]))
    # 2. FID-proxy of each client's synthetic images against its held-out ones
    fids = [
        fid_proxy(fed.real_features[pid], features(fed.judge, images[owners == pid]))
        for pid in range(fed.num_clients)
    ]
    t = res["timings_s"]
    row = {
        "variant": label,
        "seed": res["config"]["seed"],
        "images": len(owners),
        "img_s": len(owners) / t["synthesize"],
        "synthesize_s": t["synthesize"],
        "train_s": t["train"],
        "global_accuracy": res["global_accuracy"],
        "global_accuracy_per_domain": res["global_accuracy_per_domain"],
        "accuracy": res["mean_accuracy"],
        "fid_proxy": sum(fids) / len(fids),
    }
    g = row["global_accuracy"]
    say(
        f"seed {row['seed']} {label}: {row['img_s']:.1f} img/s, global acc "
        f"{g if g is None else round(g, 3)}, client acc "
        f"{row['accuracy']:.3f}, FID-proxy {row['fid_proxy']:.2f}"
    )
    return row
