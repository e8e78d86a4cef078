"""results.json of one run, and the report step: it writes results.json, then
(``final``) the plots (``server_app.plots``), report.html
(``server_app.report_html``) and logs the per-client table
(``server_app.tables``)."""

from __future__ import annotations

from logging import INFO
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.common.logger import log

from common.contract import safe_text

from .collect import Collected
from .persist import atomic_write_json
from .plots import plot_accuracy, plot_label, plot_samples
from .report_html import write_report_html
from .tables import TABLE_ROWS, client_order, format_domain_table, format_table

if TYPE_CHECKING:
    from methods.base import OneShotMethod, ServerContext, ServerOutput


def write_results(run_dir: Path, results: dict[str, Any]) -> Path:
    """Write ``run_dir/results.json`` atomically and return its path."""
    path = run_dir / "results.json"
    atomic_write_json(path, results)
    return path


def privacy_class(method: OneShotMethod) -> str | None:
    """The privacy class of what the method's clients upload (pixels, weights,
    features, statistics, none), as its card declares (``methods/card.py``)."""
    from methods.docs import method_card

    card = method_card(type(method))
    return card.privacy if card is not None else None


def dp_spent(metrics: dict[str, float]) -> dict[str, float] | None:
    """The (epsilon, delta) a client reports as spent on its whole upload
    (``common.dp``: composed over classes, prototypes and releases), or None
    where it sent no privacy account (no privacy guard)."""
    eps, delta = metrics.get("dp-epsilon"), metrics.get("dp-delta")
    if not eps or delta is None:
        return None
    return {"epsilon": float(eps), "delta": float(delta)}


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
    """results.json, the plots, the per-client table and report.html of one round.

    Everything taken from a client is escaped and truncated (``safe_text``): a
    rejected client's reply can hold anything, and the report must not fail.
    ``global_eval``: the ``global_*`` entries (``round.evaluate_global``);
    ``fleet``: the collection window's account of the nodes; ``final=False``
    writes results.json alone (before the push: a push that never ends loses
    no result); the final call adds the plots and report.html, one page that
    embeds them (``server_app.report_html``).
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
                "dp": dp_spent(r.metrics),
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
        # the most revealing thing a client sends (the method's card)
        "privacy_class": privacy_class(method),
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
    domains = {
        c["partition_id"]: c.get("domain") or ""
        for c in clients
        if not client_order(c)[0]
    }
    ga = res.get("global_accuracy")
    plots = {
        "accuracy": plot_accuracy(
            ctx.run_dir,
            clients,
            f"{cfg.method} on {plot_label(cfg.dataset, 40)}",
            ga if isinstance(ga, float) else None,
            res.get("global_accuracy_per_domain"),
            res.get("global_test_size") or 0,
        ),
        "samples": plot_samples(ctx.run_dir, out.samples, ctx.class_names, domains),
    }
    write_report_html(ctx.run_dir, res, plots, table_rows=TABLE_ROWS)
    log(
        INFO,
        "\n%s",
        format_table(clients)
        if len(clients) <= TABLE_ROWS
        else format_domain_table(clients),
    )
    log(
        INFO,
        "mean client accuracy %s, global accuracy %s on %d test images, "
        "upload %d B total; results in %s (open report.html)",
        res["mean_accuracy"],
        res.get("global_accuracy"),
        res.get("global_test_size", 0),
        res["upload_bytes_total"],
        ctx.run_dir,
    )
    return res
