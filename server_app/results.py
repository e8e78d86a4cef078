"""results.json, plots and the per-client table of one run."""

from __future__ import annotations

from logging import INFO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from flwr.common.logger import log

from common.contract import safe_text

from .persist import atomic_write_json

if TYPE_CHECKING:
    from methods.base import OneShotMethod, ServerContext, ServerOutput

    from .round import Collected


def write_results(run_dir: Path, results: dict[str, Any]) -> Path:
    path = run_dir / "results.json"
    atomic_write_json(path, results)
    return path


def _pid_key(c: dict[str, Any]) -> tuple[bool, int]:
    pid = c.get("partition_id")
    ok = isinstance(pid, int) and not isinstance(pid, bool)
    return (not ok, pid if ok else 0)  # type: ignore[return-value]


def report(
    method: OneShotMethod,
    ctx: ServerContext,
    got: Collected,
    out: ServerOutput,
    evals: dict[int, dict[str, Any]],
    timings: dict[str, float],
    download: dict[str, int],
    global_eval: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """results.json, the plots and the per-client table of one round.

    Everything taken from a client is escaped and truncated (``safe_text``): a
    rejected client's reply can hold anything, and the report must not fail.
    ``global_eval``: the ``global_*`` entries (``round.evaluate_global``).
    """
    cfg = ctx.cfg
    clients: list[dict[str, Any]] = []
    for r in got.replies:
        own = r.metrics if method.evaluate_type is None else {}
        ev = evals.get(r.node_id, own)
        acc = ev.get("accuracy")
        clients.append(
            {
                "partition_id": r.partition_id,
                "node_id": r.node_id,
                "domain": safe_text(r.meta.get("domain", ""), 40),
                "num_examples": r.num_examples,
                "upload_bytes": r.upload_bytes,
                "accuracy": float(acc) if acc is not None else None,
                "status": "ok" if acc is not None else "no evaluation",
                "metrics": r.metrics,
                "evaluation": {
                    k: v for k, v in ev.items() if k not in ("domain", "partition_id")
                },
            }
        )
    for bad in got.rejected + got.missing:
        ev = evals.get(bad["node_id"], {})
        clients.append(
            {
                "partition_id": bad.get("partition_id", ev.get("partition_id")),
                "node_id": bad["node_id"],
                "domain": ev.get("domain"),
                "num_examples": 0,
                "upload_bytes": 0,
                "accuracy": float(ev["accuracy"]) if "accuracy" in ev else None,
                "status": f"excluded: {safe_text(bad['reason'], 300)}",
            }
        )
    accs = [c["accuracy"] for c in clients if c["accuracy"] is not None]
    uploads = [c["upload_bytes"] for c in clients if c["upload_bytes"]]
    fids = [
        c["evaluation"]["fid-proxy"]
        for c in clients
        if "fid-proxy" in c.get("evaluation", {})
    ]
    res: dict[str, Any] = {
        "method": cfg.method,
        "dataset": cfg.dataset,
        "partition": cfg.partition,
        "num_clients": len(got.replies),
        "clients": clients,
        "rejected": got.rejected,
        "missing": got.missing,
        "mean_accuracy": sum(accs) / len(accs) if accs else None,
        "global_accuracy": None,  # (round.evaluate_global fills these in)
        "global_accuracy_per_domain": {},
        "global_test_size": 0,
        **(global_eval or {}),
        "mean_fid_proxy": sum(fids) / len(fids) if fids else None,
        "upload_bytes_total": sum(uploads),
        "upload_bytes_per_client": sum(uploads) / len(uploads) if uploads else 0,
        "upload_bytes_per_class": None,
        # what each node receives: the collect message (+ weights) and the push
        "download_bytes_per_client": sum(download.values()),
        "download_bytes": dict(download),
        "timings_s": {k: round(v, 3) for k, v in timings.items()}
        | {
            k: 0.0
            for k in ("collect", "synthesize", "train", "evaluate")
            if k not in timings
        },
        "config": cfg.to_flat() | {"num-classes": ctx.num_classes},
        "class_names": ctx.class_names,
        "device": str(ctx.device),
        **method.summary(got.replies),
        **out.extra,
    }
    write_results(ctx.run_dir, res)
    domains = {c["partition_id"]: c.get("domain") or "" for c in clients
               if not _pid_key(c)[0]}  # fmt: skip
    plot_accuracy(ctx.run_dir, clients, f"{cfg.method} on {safe_text(cfg.dataset, 40)}")
    plot_samples(ctx.run_dir, out.samples, ctx.class_names, domains)
    log(INFO, "\n%s", format_table(clients))
    log(INFO, "mean client accuracy %s, global accuracy %s on %d test images, "
        "upload %d B total; results in %s", res["mean_accuracy"],
        res.get("global_accuracy"), res.get("global_test_size", 0),
        res["upload_bytes_total"], ctx.run_dir / "results.json")  # fmt: skip
    return res


def format_table(clients: list[dict[str, Any]]) -> str:
    head = f"{'partition':>9} {'node':>20} {'domain':>9} {'examples':>8} {'upload B':>9} {'accuracy':>8}  status"
    rows = [head, "-" * len(head)]
    for c in sorted(clients, key=_pid_key):
        acc = c.get("accuracy")
        acc_s = f"{acc:8.4f}" if isinstance(acc, float) else f"{'-':>8}"
        rows.append(
            f"{'-' if _pid_key(c)[0] else c['partition_id']:>9} "
            f"{str(c.get('node_id', '-')):>20} "
            f"{safe_text(c.get('domain', '-'), 20):>9} {c.get('num_examples', 0):>8} "
            f"{c.get('upload_bytes', 0):>9} {acc_s}  {c.get('status', '')}"
        )
    return "\n".join(rows)


def plot_accuracy(
    run_dir: Path, clients: list[dict[str, Any]], title: str
) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [c for c in clients if isinstance(c.get("accuracy"), float)
            and not _pid_key(c)[0]]  # fmt: skip
    if not rows:
        return None
    rows.sort(key=lambda c: c["partition_id"])
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(rows) + 2), 3.2))
    names = [
        f"{c['partition_id']}\n{safe_text(c.get('domain') or '', 20)}" for c in rows
    ]
    accs = [c["accuracy"] for c in rows]
    bars = ax.bar(names, accs, color="#4C72B0")
    ax.bar_label(bars, labels=[f"{a:.2f}" for a in accs], fontsize=8)
    mean = sum(accs) / len(accs)
    ax.axhline(mean, color="k", ls="--", lw=1, label=f"mean {mean:.3f}")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("client (partition, domain)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = run_dir / "accuracy_per_client.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_samples(
    run_dir: Path, samples: dict[tuple[int, int], torch.Tensor], class_names: list[str],
    domains: dict[int, str],
) -> Path | None:  # fmt: skip
    """Grid of synthetic samples: one row per client, one column per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not samples:
        return None
    owners = sorted({o for o, _ in samples})
    classes = sorted({c for _, c in samples})
    k = max(len(v) for v in samples.values())
    per_row = min(k, 3)
    fig, axes = plt.subplots(
        len(owners), len(classes), figsize=(1.1 * len(classes) * per_row / 2 + 1, 1.2 * len(owners) + 0.6),
        squeeze=False,
    )  # fmt: skip
    for i, o in enumerate(owners):
        for j, c in enumerate(classes):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            imgs = samples.get((o, c))
            if imgs is not None:
                tile = torch.cat(list(imgs[:per_row]), dim=-1)  # [C, H, W*k]
                arr = ((tile + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()
                ax.imshow(
                    arr.squeeze(-1) if arr.shape[-1] == 1 else arr,
                    cmap="gray",
                    vmin=0,
                    vmax=1,
                )
            else:
                ax.set_facecolor("#eeeeee")
            if i == 0:
                name = class_names[c] if c < len(class_names) else str(c)
                ax.set_title(name, fontsize=8)
            if j == 0:
                label = "class names" if o < 0 else f"client {o}\n{domains.get(o, '')}"
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle("synthetic samples per client (rows) and class (columns)", fontsize=9)
    fig.tight_layout()
    path = run_dir / "synthetic_samples.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
