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
    fleet: dict[str, Any] | None = None,
    final: bool = True,
) -> dict[str, Any]:
    """results.json, the plots and the per-client table of one round.

    Everything taken from a client is escaped and truncated (``safe_text``): a
    rejected client's reply can hold anything, and the report must not fail.
    ``global_eval``: the ``global_*`` entries (``round.evaluate_global``);
    ``fleet``: the collection window's account of the nodes; ``final=False``
    writes results.json alone (before the push: a push that never ends loses
    no result).
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
        # the collection window: nodes asked, valid, rejected, missing, late
        "fleet": fleet or {},
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
    if not final:  # written before the push: results.json only
        return res
    domains = {c["partition_id"]: c.get("domain") or "" for c in clients
               if not _pid_key(c)[0]}  # fmt: skip
    plot_accuracy(ctx.run_dir, clients, f"{cfg.method} on {safe_text(cfg.dataset, 40)}")
    plot_samples(ctx.run_dir, out.samples, ctx.class_names, domains)
    log(INFO, "\n%s", format_table(clients) if len(clients) <= TABLE_ROWS
        else format_domain_table(clients))  # fmt: skip
    log(INFO, "mean client accuracy %s, global accuracy %s on %d test images, "
        "upload %d B total; results in %s", res["mean_accuracy"],
        res.get("global_accuracy"), res.get("global_test_size", 0),
        res["upload_bytes_total"], ctx.run_dir / "results.json")  # fmt: skip
    return res


TABLE_ROWS = 20  # above this many clients the log summarizes them by domain
PLOT_BARS = 20  # above this many clients the accuracy plot shows domains
GRID_ROWS = 12  # above this many clients the sample grid shows a few per domain


def format_domain_table(clients: list[dict[str, Any]]) -> str:
    """The per-client table summarized by domain (fleets; results.json keeps all)."""
    by: dict[str, list[dict[str, Any]]] = {}
    for c in clients:
        by.setdefault(safe_text(c.get("domain") or "-", 20), []).append(c)
    head = (f"{'domain':>12} {'clients':>7} {'used':>5} {'excluded':>8} "
            f"{'examples':>9} {'upload B':>11} {'mean acc':>8}")  # fmt: skip
    rows = [head, "-" * len(head)]
    for d in sorted(by):
        cs = by[d]
        used = [c for c in cs if c.get("status") in ("ok", "no evaluation")]
        accs = [c["accuracy"] for c in used if isinstance(c.get("accuracy"), float)]
        acc_s = f"{sum(accs) / len(accs):8.4f}" if accs else f"{'-':>8}"
        rows.append(
            f"{d:>12} {len(cs):>7} {len(used):>5} {len(cs) - len(used):>8} "
            f"{sum(c.get('num_examples', 0) for c in cs):>9} "
            f"{sum(c.get('upload_bytes', 0) for c in cs):>11} {acc_s}"
        )
    excluded: dict[str, int] = {}
    for c in clients:
        status = str(c.get("status", ""))
        if status.startswith("excluded"):
            key = status[:80]
            excluded[key] = excluded.get(key, 0) + 1
    for why, n in sorted(excluded.items(), key=lambda kv: -kv[1])[:10]:
        rows.append(f"  {n} x {why}")
    rows.append(f"({len(clients)} clients; each is listed in results.json)")
    return "\n".join(rows)


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
    accs = [c["accuracy"] for c in rows]
    mean = sum(accs) / len(accs)
    if len(rows) > PLOT_BARS:  # a fleet: one box of client accuracies per domain
        doms = sorted({safe_text(c.get("domain") or "-", 20) for c in rows})
        groups = [[c["accuracy"] for c in rows
                   if safe_text(c.get("domain") or "-", 20) == d] for d in doms]  # fmt: skip
        fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(doms) + 2), 3.2))
        ax.boxplot(groups, showmeans=True)
        ax.set_xticks(range(1, len(doms) + 1),
                      [f"{d}\n({len(g)} clients)" for d, g in zip(doms, groups, strict=True)])  # fmt: skip
        ax.set_xlabel("domain")
    else:
        fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(rows) + 2), 3.2))
        names = [
            f"{c['partition_id']}\n{safe_text(c.get('domain') or '', 20)}" for c in rows
        ]
        bars = ax.bar(names, accs, color="#4C72B0")
        ax.bar_label(bars, labels=[f"{a:.2f}" for a in accs], fontsize=8)
        ax.set_xlabel("client (partition, domain)")
    ax.axhline(mean, color="k", ls="--", lw=1, label=f"mean {mean:.3f}")
    ax.set_ylim(0, 1.05)
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
    if len(owners) > GRID_ROWS:  # a fleet: the first few clients of each domain
        per_domain = max(1, GRID_ROWS // max(1, len(set(domains.values()))))
        kept: list[int] = []
        for d in sorted(set(domains.get(o, "") for o in owners)):
            kept += [o for o in owners if domains.get(o, "") == d][:per_domain]
        owners = sorted(kept)[:GRID_ROWS]
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
