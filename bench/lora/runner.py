"""One seed of the LoRA bench, in-process through the app's own code paths."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.report import mean

from .world import MERGES, say


def run_seed(
    overrides: dict[str, Any],
    seed: int,
    num_clients: int,
    variants: Sequence[str],
    work: Path,
    probes: int = 3,
) -> list[dict[str, Any]]:
    """Every variant of one seed; one record per variant.

    Parameters
    ----------
    overrides
        The run config (defaults, the world, the mode, ``--set``); the seed comes
        on top.
    seed
        The seed of the clients' data, their adapters and the server's sampling.
    num_clients
        Clients of the benchmark split.
    variants
        Names from ``VARIANTS``: ``none``, a merge of ``MERGES``, or ``own``.
    work
        Run folder of the server context (``<work>/seed<seed>``).
    probes
        Global classifiers trained per variant, from different inits.

    Returns
    -------
    list of dict
        Per variant: per-client FID-proxy and accuracy, their means, bytes, merge
        time, merged rank and energy kept.
    """
    from client_app.app import client_data
    from common import contract as C
    from common.datasets import dataset_info
    from common.lora import set_lora_state
    from common.maths import fid_proxy
    from common.models import load_classifier
    from common.train import features
    from common.weights import embedded_dir
    from methods import build_config
    from methods.base import ServerContext, ServerOutput, classifier_accuracy
    from methods.lora import payload_lora as PL
    from methods.lora.client_lora import train_client_lora
    from methods.lora.config_lora import LoraConfig
    from methods.lora.server_lora import Lora
    from methods.steps import synthesize_set, train_global

    cfg = build_config(overrides | {"seed": seed})
    lcfg = cfg.options(LoraConfig)
    datas = [client_data(cfg, pid, num_clients) for pid in range(num_clients)]
    # 1. clients: fine-tune and upload once
    replies, own, train_s = [], {}, []
    for pid, data in enumerate(datas):
        say(f"seed {seed}: client {pid} ({data.domain}) fine-tunes its adapter")
        r = train_client_lora(cfg, data, seed=seed * 1000 + pid)
        train_s.append(r.train_s)
        own[pid] = r.adapter
        tensors = {
            k: v.half() if v.is_floating_point() else v
            for k, v in PL.layout(r.adapter, r.embed.embeddings).items()
        }
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        replies.append(
            C.Reply(
                pid + 1,
                pid,
                len(data.train_labels),
                nbytes,
                {"base-model": r.base_fingerprint},
                {},
                tensors,
            )
        )
    # 2. server: validate
    ctx = ServerContext(cfg, work / f"seed{seed}", info=dataset_info(cfg.data_args()))
    method = Lora()
    method.check(ctx)
    for rep in replies:
        method.validate(rep, ctx)
    judge = load_classifier(embedded_dir() / "judge")
    real_feats = [features(judge, d.test_images) for d in datas]
    unet, targets = ctx.generator.unet, lcfg.target_list
    n = cfg.images_per_class

    records = []
    for v in variants:
        t0 = time.perf_counter()
        # 3. one adapter per client (or none)
        merge_s = rank = energy = None
        download = 0
        # per client: (adapter, rank, alpha), or None for the base generator
        per_client: dict[int, tuple[dict[str, torch.Tensor], int, float] | None]
        if v in MERGES:
            ctx.cfg = cfg.replace(lora_merge=v)
            out = ServerOutput()
            merged, rank, alpha = method.merge(replies, ctx, out)
            merge_s, energy = out.timings["merge"], out.extra["lora"]["energy_kept"]
            download = out.extra["lora"]["merged_adapter_bytes"]
            per_client = {pid: (merged, rank, alpha) for pid in range(num_clients)}
            ctx.cfg = cfg
        elif v == "own":
            per_client = {p: (own[p], lcfg.lora_rank, lcfg.lora_alpha) for p in own}
        else:
            per_client = {p: None for p in own}
        # 4. sample per (client, class); FID-proxy per client; downstream accuracy
        images, labels = [], []
        clients: list[dict[str, Any]] = []
        for pid, rep in enumerate(replies):
            unet.unload_lora()
            adapter = per_client[pid]
            if adapter is not None:
                a, rk, al = adapter
                set_lora_state(unet, a, rk, al, targets)
            cond = rep.tensors[PL.EMB + "mean"].float().repeat_interleave(n, dim=0)
            y = rep.tensors[PL.EMB + "class_ids"].repeat_interleave(n)
            x = synthesize_set(
                ctx,
                cond,
                y,
                torch.full_like(y, pid),
                ServerOutput(),
                desc=f"seed {seed} {v} client {pid}",
            )
            images.append(x)
            labels.append(y)
            clients.append(
                {
                    "partition_id": pid,
                    "domain": datas[pid].domain,
                    "fid_proxy": fid_proxy(real_feats[pid], features(judge, x)),
                }
            )
        unet.unload_lora()
        # 5. downstream probe: the app's global classifier from `probes` inits
        # (seed + 1000 k; k = 0 is the app's own), accuracy averaged over them
        x_all, y_all = torch.cat(images), torch.cat(labels)
        for c in clients:
            c["accuracy_probes"] = []
        for k in range(probes):
            ctx.cfg = cfg.replace(seed=cfg.seed + 1000 * k)
            out = ServerOutput()
            train_global(ctx, x_all, y_all, out)
            assert out.model_state is not None
            for c, data in zip(clients, datas, strict=True):
                c["accuracy_probes"].append(
                    classifier_accuracy(
                        out.model_state, out.arch, ctx.num_classes, data
                    )
                )
        ctx.cfg = cfg
        for c in clients:
            c["accuracy"] = mean(c["accuracy_probes"])
        rec = {
            "variant": v,
            "seed": seed,
            "clients": clients,
            "mean_fid_proxy": mean([c["fid_proxy"] for c in clients]),
            "mean_accuracy": mean([c["accuracy"] for c in clients]),
            "upload_bytes_per_client": mean([float(r.upload_bytes) for r in replies]),
            "download_bytes_per_client": download,
            "merge_s": merge_s,
            "merged_rank": rank,
            "energy_kept": energy,
            "client_train_s": mean(train_s),
            "variant_s": time.perf_counter() - t0,
        }
        say(
            f"seed {seed} {v:>10}: FID-proxy {rec['mean_fid_proxy']:.2f}, "
            f"accuracy {rec['mean_accuracy']:.3f} ({rec['variant_s']:.0f} s)"
        )
        records.append(rec)
    return records
